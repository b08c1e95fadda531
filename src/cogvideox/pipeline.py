"""CogVideoX generation: prompt -> T5 -> expert transformer denoising with a v-prediction scheduler -> VAE.

`Pipeline` holds the four components, loads and saves them in the official diffusers layout, checks a
request before any heavy work, and runs the reference sampler (see `sampling.py`) seed for seed. Besides
text-to-video it starts from a first frame (image-to-video models) or from a noised input video
(video-to-video); what those add lives in `conditioning.py`.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import secrets
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cogvideox import conditioning, loading, weights
from cogvideox.autoencoder import decode_latents
from cogvideox.errors import InputError, OutOfMemoryError
from cogvideox.models.config import TransformerConfig
from cogvideox.request import (
    GenerationRequest,
    check_flag,
    check_last_image,
    check_request,
    default_fps,
    default_size,
    frames_to_read,
    latent_frame_count,
)
from cogvideox.sampling import DenoiseInputs, denoise, guidance_schedule
from cogvideox.schedulers import SCHEDULERS, randn
from cogvideox.windows import WindowedDenoiser, check_windows, rescheduled_noise

SCHEDULER_KINDS = ("ddim", "dpm")
OUTPUT_TYPES = ("np", "latent")

# The class name written into scheduler_config.json for each of our schedulers.
_SCHEDULER_CLASS_NAMES = {"DDIMScheduler": "CogVideoXDDIMScheduler", "DPMScheduler": "CogVideoXDPMScheduler"}


@dataclass
class VideoOutput:
    """The result of one `Pipeline` call.

    frames: one uint8 array [F, H, W, 3] per video (prompt-major: p0 v0, p0 v1, p1 v0, ...), or None for
        output_type="latent".
    latents: the final latents [B, F, C, h, w] as the loop leaves them, in the pipeline dtype. For
        CogVideoX 1.5 they include `padding_frames` extra latent frames at the front, which decoding drops
        (`decode(output.latents, padding_frames=output.padding_frames)`).
    seed: the seed the noise was drawn from (None when the caller passed generators).
    timings: seconds spent per stage ("text", "encode" for an image or video input, "denoise", "decode").
    """

    frames: list[np.ndarray] | None
    latents: torch.Tensor
    seed: int | None = None
    padding_frames: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Placement:
    """How a pipeline's modules are offloaded: shared by the pipelines that share the modules."""

    offload: object = None  # a `cogvideox.fast.offload.Offload`, or None: every weight resident
    offload_choice: str = ""
    offload_auto: bool = False
    auto_tiling: bool = False  # VAE tiling that "auto" turned on (the user had not): off again in `to()`


class _OnPlacement:
    """A `Pipeline` attribute kept in its `_Placement`, under the same name."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, pipe, owner=None):
        return self if pipe is None else getattr(pipe._placement, self.name)

    def __set__(self, pipe, value) -> None:
        setattr(pipe._placement, self.name, value)


class Pipeline:
    """CogVideoX text-to-video, image-to-video and video-to-video.

    Build it with `Pipeline.from_pretrained(...)` (a folder, a Hugging Face repo id, or None for the
    embedded demo model) or from components; call it with a prompt (and a first frame for the
    image-to-video models, or a video to redraw) to get frames.
    """

    def __init__(self, transformer: torch.nn.Module, vae: torch.nn.Module, text_encoder, scheduler) -> None:
        loading.check_components(transformer.config, vae.config, text_encoder.model.config.d_model)
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.scheduler = scheduler
        self._placement = _Placement()
        # The guidance arguments' defaults: the model folder's `sampling.json`, else the reference's.
        self.sampling_defaults = dict(loading.SAMPLING_FALLBACKS)

    # The offloading lives on the modules, so pipelines sharing them (`with_scheduler`) share its record too:
    # one that re-applied it (around `load_lora`, say) would otherwise leave the other a removed `Offload`.
    offload = _OnPlacement()  # a `cogvideox.fast.offload.Offload` while weights are offloaded, else None
    offload_choice = _OnPlacement()  # what `enable_offload` chose, and why
    offload_auto = _OnPlacement()  # whether "auto" chose the mode: `accelerate` then chooses again after quantising
    auto_tiling = _OnPlacement()  # whether "auto" turned the VAE's tiling on: `to()` turns it off again

    def release_weights(self) -> None:
        """With offloading, send every weight back to host memory, as a call does when it ends."""
        if self.offload is not None:
            self.offload.release_all()

    # -------------------------------------------------------------------------------------------------
    # Loading and saving

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | Path | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        scheduler: str | object | None = None,
        *,
        revision: str | None = None,
        variant: str | None = None,
        local_files_only: bool = False,
        lora=None,
        offload: str | None = None,
        text_device: str | torch.device | None = None,
        vae_tiling: bool = False,
        vae_slicing: bool = False,
    ) -> Pipeline:
        """Load a CogVideoX model in the official diffusers layout.

        path_or_repo_id: a local model folder, a Hugging Face repo id (`THUDM/CogVideoX-5b`; taken from the
            cache when present, else downloaded), or None for the embedded demo model.
        dtype: "bf16" / "fp16" / "fp32" (or a torch dtype); default bf16 on GPU, fp32 on CPU.
        device: default CUDA when available, else CPU.
        revision: the hub revision (branch, tag or commit) of a repo id.
        variant: read the weights of this variant (`diffusion_pytorch_model.fp16.safetensors`,
            `model.fp16-00001-of-00002.safetensors`, ... for "fp16") where a component has them, its plain
            weights where not, as diffusers' `variant=` does; a variant no component has is an error.
        scheduler: "ddim" or "dpm" to override the model's scheduler class (same schedule config), or a
            scheduler object; default: the one named in `scheduler/scheduler_config.json`.
        lora: LoRA weights to apply (see `load_lora`): a file or folder, a (path, scale) pair, or a list
            of either.
        offload: "none" (default), "model", "stream", "sequential" or "auto" (see `enable_offload`); the
            weights are then read into host memory, never all onto the device.
        text_device: where T5 lives and runs, e.g. "cpu" (default: `device`).
        vae_tiling / vae_slicing: decode in overlapping tiles (less memory, results match the
            reference's tiled decode) / one video of a batch at a time.
        """
        from cogvideox.fast.memory_plan import check_host_memory, choose_for_folder, folder_sizes
        from cogvideox.fast.offload import check_mode

        offload = check_mode(offload)
        vae_tiling, vae_slicing = check_flag(vae_tiling, "vae_tiling"), check_flag(vae_slicing, "vae_slicing")
        _scheduler_kind(scheduler)  # reject an unknown name before touching the disk or the network
        _lora_entries(lora)
        device = loading.choose_device(device)
        text_device = None if text_device is None else loading.choose_device(text_device, "text_device")
        loading.parse_dtype(dtype)
        variant = loading.check_variant(variant)
        folder = loading.resolve_model_dir(
            path_or_repo_id, revision=revision, local_files_only=local_files_only, variant=variant
        )
        configs = loading.read_model_configs(folder, variant=variant)
        chosen_dtype = loading.choose_dtype(dtype, device, configs.transformer)
        if dtype is None:
            chosen_dtype = _dtype_that_fits(folder, chosen_dtype, device, offload, text_device, variant)
        dtype = chosen_dtype

        reason, auto_tiling = "", False
        if offload == "auto":
            choice = choose_for_folder(folder, configs, dtype, device, text_device, vae_tiling, vae_slicing,
                                       variant=variant)  # fmt: skip
            offload, reason = choice.mode, choice.reason
            auto_tiling = choice.vae_tiling and not vae_tiling
            vae_tiling = vae_tiling or choice.vae_tiling
        # Before reading any weight: a process the kernel kills for memory gets no error message at all.
        check_host_memory(offload, folder_sizes(folder, dtype, variant), device, text_device, dtype)
        pipe = cls._assemble(folder, dtype, device if offload == "none" else torch.device("cpu"), scheduler,
                             variant=variant)  # fmt: skip
        for path, scale in _lora_entries(lora):
            pipe.load_lora(path, scale)
        if vae_tiling:
            pipe.vae.enable_tiling()
        if vae_slicing:
            pipe.vae.enable_slicing()
        if offload != "none" or text_device is not None:
            pipe.enable_offload(offload, device, text_device=text_device)
        pipe.offload_choice = reason or pipe.offload_choice
        pipe.offload_auto, pipe.auto_tiling = bool(reason), auto_tiling
        return pipe

    @classmethod
    def from_sat(
        cls,
        checkpoint: str | Path,
        base: str | Path,
        *,
        vae: str | Path | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        scheduler: str | object | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        trust_pickle: bool = False,
        variant: str | None = None,
    ) -> Pipeline:
        """Load an original SAT checkpoint, converting its names on the fly (see `cogvideox.sat`).

        checkpoint: a SAT `.pt` file or checkpoint folder holding the transformer, the VAE (`3d-vae.pt`)
            or both; `vae` names a separate VAE file.
        base: the diffusers-format model (folder or repo id) the checkpoint belongs to, e.g. the one it was
            fine-tuned from. Its configs say what to build; its T5, tokenizer, scheduler and any component
            the checkpoint lacks complete the pipeline.
        trust_pickle: read `.pt` files holding Python objects besides tensors (runs their pickled code).
        variant: read the base's weights of this variant ("fp16") where a component has them, as
            `from_pretrained(variant=)` does.
        """
        from cogvideox import sat

        _scheduler_kind(scheduler)
        device = loading.choose_device(device)
        loading.parse_dtype(dtype)
        variant = loading.check_variant(variant)
        folder = loading.resolve_model_dir(base, revision=revision, local_files_only=local_files_only,
                                           variant=variant)  # fmt: skip
        configs = loading.read_model_configs(folder, variant=variant)
        dtype = loading.choose_dtype(dtype, device, configs.transformer)
        transformer, vae_model = sat.load_components(checkpoint, configs, dtype, device, vae, trust_pickle)
        return cls._assemble(folder, dtype, device, scheduler, transformer, vae_model, variant)

    @classmethod
    def _assemble(
        cls, folder: Path, dtype, device, scheduler=None, transformer=None, vae=None, variant: str | None = None
    ) -> Pipeline:
        """The pipeline of a model folder (its `variant`'s weights where it has them); components given
        (already loaded) replace the folder's."""
        kind = _scheduler_kind(scheduler)
        if kind is None and scheduler is not None:
            scheduler_object = scheduler
        else:
            scheduler_object = loading.load_scheduler(folder, kind)
        text_encoder = loading.load_text_encoder(folder, dtype, device, variant)
        if transformer is None:
            transformer = loading.load_transformer(folder, dtype, device, variant)
        if vae is None:
            vae = loading.load_vae(folder, dtype, device, variant)
        pipe = cls(transformer, vae, text_encoder, scheduler_object)
        pipe.sampling_defaults = loading.read_sampling_defaults(folder)
        return pipe

    def save_pretrained(self, folder: str | Path, max_shard_size: int | str = "10GB") -> Path:
        """Write the pipeline in the official diffusers layout (readable by us and by diffusers)."""
        folder = Path(folder)
        if self.acceleration is not None and self.acceleration.quantize:
            raise InputError(
                f"cannot save a pipeline whose transformer is quantised ({self.acceleration.quantize}): its "
                "weights are no longer the official ones; save before accelerate(quantize=...)"
            )
        if folder.exists() and not folder.is_dir():
            raise InputError(f"cannot save to {folder}: it is a file; give a folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot save to {folder}: {e.strerror or e}") from None
        for name, module in (("transformer", self.transformer), ("vae", self.vae)):
            (folder / name).mkdir(exist_ok=True)
            module.config.save(folder / name / "config.json")
            weights.save_weights(module, folder / name, max_shard_size=max_shard_size)
        # transformers writes a single file or shards but leaves the other layout's files behind.
        if (folder / "text_encoder").is_dir():
            weights.remove_weight_files(folder / "text_encoder", "model")
        self.text_encoder.model.save_pretrained(folder / "text_encoder", max_shard_size=max_shard_size)
        self.text_encoder.tokenizer.save_pretrained(folder / "tokenizer")
        (folder / "scheduler").mkdir(exist_ok=True)
        scheduler_class = _SCHEDULER_CLASS_NAMES.get(type(self.scheduler).__name__, "CogVideoXDDIMScheduler")
        scheduler_config = self.scheduler.config.to_dict() | {"_class_name": scheduler_class}
        text = json.dumps(scheduler_config, indent=2, sort_keys=True) + "\n"
        (folder / loading.SCHEDULER_CONFIG).write_text(text)
        pipeline_class = "CogVideoXImageToVideoPipeline" if self.config.is_image_to_video else "CogVideoXPipeline"
        index = loading.model_index(
            pipeline_class, scheduler_class, type(self.text_encoder.model).__name__,
            type(self.text_encoder.tokenizer).__name__, self.transformer.config.class_name,
            self.vae.config.class_name,
        )
        (folder / loading.MODEL_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        recommended = {k: v for k, v in self.sampling_defaults.items() if v != loading.SAMPLING_FALLBACKS[k]}
        if recommended:
            (folder / loading.SAMPLING_DEFAULTS).write_text(json.dumps(recommended, indent=2) + "\n")
        return folder

    # -------------------------------------------------------------------------------------------------
    # LoRA (see `cogvideox.train.lora`)

    def load_lora(self, path: str | Path, scale: float = 1.0, name: str | None = None) -> str:
        """Add a LoRA in the diffusers layout (`pytorch_lora_weights.safetensors` or its folder) to the
        transformer at `scale`; several can be active at once. Returns the adapter's name: `name`, else the
        folder's name or the file's stem ("style" for runs/style and runs/style/pytorch_lora_weights.safetensors),
        made unique."""
        from cogvideox.train import lora

        if self.acceleration is not None:
            raise InputError(
                "load LoRAs before accelerate(): the fast paths have rewritten the transformer's linear layers "
                "(fused QKV, quantised), which a LoRA cannot attach to"
            )
        with self._offload_lifted():  # the LoRA layers replace linear layers the offload hooks sit on
            return lora.load_lora(self.transformer, path, scale=scale, name=name)

    def set_lora_scale(self, scale: float, name: str | None = None) -> None:
        """Change the scale of LoRA `name` (every LoRA for None); not while fused."""
        from cogvideox.train import lora

        self._lora_call(lora.set_lora_scale, scale, name)

    def set_adapters(self, names: str | Sequence[str], weights: float | Sequence[float] | None = None) -> None:
        """Run only the LoRAs `names` (the others stay loaded, skipped at no cost), at `weights` (one per
        name, or one for all; default 1); `[]` runs the model without any. For a service that picks its
        LoRAs per request; as diffusers' `set_adapters`."""
        from cogvideox.train import lora

        if not isinstance(names, str | Sequence):
            raise InputError(f"names must be a LoRA's name or a list of them, got {type(names).__name__}")
        names = [names] if isinstance(names, str) else list(names)
        if weights is None or isinstance(weights, numbers.Real):
            weights = [1.0 if weights is None else weights] * len(names)
        weights = list(weights)
        if len(weights) != len(names):
            raise InputError(f"{len(weights)} LoRA weights for {len(names)} names")
        if len(set(names)) != len(names):
            raise InputError(f"a LoRA is named twice in {names}")
        self._lora_call(lora.activate_lora, dict(zip(names, weights)))

    def fuse_lora(self, names: str | Sequence[str] | None = None, keep_original: bool = False) -> None:
        """Fold the LoRAs `names` (default: those that run, see `set_adapters`) into the transformer weights
        (no cost per step); `keep_original` keeps a CPU copy so that `unfuse_lora` restores them exactly."""
        from cogvideox.train import lora

        self._lora_call(lora.fuse_lora, names, keep_original, lift=True)

    def unfuse_lora(self, names: str | Sequence[str] | None = None) -> None:
        """Take the fused LoRAs `names` (every fused one for None) out of the weights again."""
        from cogvideox.train import lora

        self._refuse_folded("unfuse")
        self._lora_call(lora.unfuse_lora, names, lift=True)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove LoRA `name` (every LoRA for None), unfusing it first."""
        from cogvideox.train import lora

        self._refuse_folded("unload")
        self._lora_call(lora.remove_lora, name, lift=True)

    def _refuse_folded(self, what: str) -> None:
        """An `InputError` where `accelerate` folded LoRAs in for good: unloading or unfusing "every LoRA"
        would otherwise do nothing, without a word, and leave them in the video."""
        folded = getattr(self.acceleration, "folded_loras", ())
        if folded:
            raise InputError(
                f"cannot {what} LoRA {', '.join(map(repr, folded))}: accelerate() folded it into the weights for "
                "good; load a fresh pipeline to run without it"
            )

    def _lora_call(self, function, *args, lift: bool = False) -> None:
        """Run a `cogvideox.train.lora` function on the transformer. `lift`: it writes weights or replaces
        layers, so the offloading (if any) is undone around it, as for `load_lora`: the packed host copy is
        what offloading reads (a weight written in place elsewhere would be lost), and a layer put back
        in "sequential" mode would have no hook to fetch its weights."""
        try:
            with self._offload_lifted() if lift else contextlib.nullcontext():
                function(self.transformer, *args)
        except InputError as error:
            if self.acceleration is None:
                raise
            # accelerate() folded every LoRA into the weights for good: say so, not just "not loaded".
            raise InputError(
                f"{error}; accelerate() folded the LoRAs into the weights, where they can no longer be "
                "changed: load a fresh pipeline to change them"
            ) from None

    def with_scheduler(self, scheduler: str | object) -> Pipeline:
        """The same model (modules shared, not copied) sampling with another scheduler: "ddim", "dpm"
        (built from this one's schedule config) or a scheduler object."""
        kind = _scheduler_kind(scheduler)
        if kind is not None:
            from cogvideox.schedulers import make_scheduler

            scheduler = make_scheduler(self.scheduler.config, kind)
        if scheduler is None:
            raise InputError("with_scheduler needs a scheduler: \"ddim\", \"dpm\" or a scheduler object")
        pipe = type(self)(self.transformer, self.vae, self.text_encoder, scheduler)
        pipe._placement = self._placement  # the hooks live on the modules
        pipe.sampling_defaults = dict(self.sampling_defaults)  # the model's recommendation, not the scheduler's
        return pipe

    def to(self, device: str | torch.device) -> Pipeline:
        """Every weight resident on `device`, leaving offloading and what "auto" chose with it: VAE tiling that
        "auto" turned on is off again (tiling the user turned on stays)."""
        device = loading.choose_device(device)
        if self.offload is not None:  # everything resident again
            self.offload.remove()
            self.offload, self.offload_choice = None, ""
        if self.auto_tiling:
            self._drop_auto_tiling()
            self.offload_choice = ""
        self.offload_auto = False
        self.transformer.to(device)
        self.vae.to(device)
        self.text_encoder.model.to(device)
        return self

    def enable_offload(
        self,
        mode: str = "auto",
        device: str | torch.device | None = None,
        *,
        text_device: str | torch.device | None = None,
        lookahead: int | None = None,
    ) -> Pipeline:
        """Keep weights in host memory and move them to `device` (default: the current one) only while
        they are used; returns the pipeline. Outputs do not change. See `cogvideox.fast.offload`.

        mode: "none" (all resident), "model" (one component at a time), "stream" (T5 and transformer
            blocks copied a few ahead on a side stream, overlapping compute), "sequential" (each layer
            alone: the least memory, the slowest) or "auto" (the fastest that fits the free GPU memory,
            with VAE tiling turned on if only the decode would not fit, and off again in `to()` or in
            another mode asked for later; "none" on the CPU; `offload_choice` says what it chose and why).
        text_device: where T5 lives and runs, e.g. "cpu" (default: `device`).
        lookahead: blocks copied ahead in "stream" mode (default 2).
        Offloading moves the weights that exist: `load_lora`, `fuse_lora`, `unfuse_lora`, `unload_lora` and
        `accelerate` called afterwards lift it and apply it again around their change.
        """
        from cogvideox.fast import offload as offloading
        from cogvideox.fast.memory_plan import choose_for_pipeline

        mode = offloading.check_mode(mode)
        device = self.device if device is None else loading.choose_device(device)
        text_device = None if text_device is None else loading.choose_device(text_device, "text_device")
        if self.offload is not None:
            self.offload.remove()
            self.offload = None
        self._drop_auto_tiling()  # the user's own tiling again: "auto" below chooses from it
        reason = ""
        self.offload_auto = mode == "auto"
        if mode == "auto":
            choice = choose_for_pipeline(self, device, text_device)
            mode, reason = choice.mode, choice.reason
            if choice.vae_tiling and not self.vae.use_tiling:
                self.vae.enable_tiling()
                self.auto_tiling = True
        self._apply_offload(mode, device, text_device, lookahead)
        self.offload_choice = reason or f"offload {mode!r}" + (f", T5 on {text_device}" if text_device else "")
        return self

    def _apply_offload(self, mode: str, device: torch.device, text_device, lookahead: int | None) -> None:
        from cogvideox.fast import offload as offloading

        self.offload = offloading.apply(
            self, mode, device, text_device=text_device,
            lookahead=offloading.DEFAULT_LOOKAHEAD if lookahead is None else lookahead,
        )

    def _drop_auto_tiling(self) -> None:
        """Turn off the VAE tiling that "auto" turned on (tiling the user turned on stays)."""
        if self.auto_tiling:
            self.vae.disable_tiling()
            self.auto_tiling = False

    def accelerate(
        self,
        *,
        quantize: str | None = None,
        compile: bool | str = False,
        cache: float | None = None,
        fuse_qkv: bool = True,
        attention: str | None = "auto",
        quantize_text: str | None = None,
    ) -> Pipeline:
        """Speed up the transformer in place (see `cogvideox.fast`); returns the pipeline.

        quantize: None, "int8" (weight-only) or "fp8" (NVIDIA GPU of compute capability 8.9+, bf16).
        compile: True or a torch.compile mode, applied per block. cache: first-block step cache threshold
        (0 computes every step; larger skips more); its counters are in `pipe.acceleration.cache`.
        fuse_qkv, the SDPA attention backends ("auto": cuDNN first on CUDA) and "fa3" (FlashAttention-3's
        Hopper kernel, CUDA, bf16) are lossless up to rounding; attention="sage" (8-bit attention: the sageattention package, CUDA, bf16/fp16) changes the video
        slightly, as quantising does, and "sage-emulated" runs its math in plain PyTorch (for checks);
        "fa3-fp8" (FlashAttention-3's FP8 kernel, Hopper, bf16) changes it more, "fa3-fp8-emulated" its math.
        Move the pipeline to its device first; a quantised transformer is for inference, not for saving.
        Fused QKV, quantising and compiling rewrite the linear layers the LoRAs attach to: with any of
        them, the LoRAs that run are folded into the weights for good first, at their current scales
        (`acceleration.folded_loras` names them; unloading or unfusing them is then an error). With the
        attention backend and the step cache alone, LoRAs stay live (`set_adapters` still chooses them).
        Load every LoRA before calling this. quantize_text: "int8" for T5's linears too
        (weight-only: half its bf16 memory, the text states changed by rounding), as the model card's INT8.
        """
        from cogvideox import fast
        from cogvideox.fast.quantize import check_text_quantize
        from cogvideox.train import lora

        check_text_quantize(quantize_text)  # before the transformer is touched
        device = self.device  # where the transformer computes, even while offloading keeps it in host memory
        with self._offload_lifted():  # rewrite the layers at home, then offload the rewritten ones
            folded = ()
            if quantize or compile or fuse_qkv:
                folded = tuple(lora.running_adapters(self.transformer))
                lora.fold_lora(self.transformer)
            done = fast.apply(
                self, quantize=quantize, compile=compile, cache=cache, fuse_qkv=fuse_qkv, attention=attention,
                device=device,
            )
            done.folded_loras = folded
            if quantize_text is not None:
                fast.quantize_text_encoder(self.text_encoder.model, quantize_text)
                done.quantize_text = quantize_text
        if (quantize or quantize_text) and self.offload_auto and self.offload is not None:
            self._choose_offload_again()
        return self

    def _choose_offload_again(self) -> None:
        """"auto" again for weights that quantising shrank: a faster mode may fit now (int8 everywhere
        takes a 5B model's weights from 19.7 to 10.2 GiB: T5 8.87 -> 4.56, transformer 10.38 -> 5.21, VAE 0.40)."""
        offload = self.offload
        text_device = None if "text_encoder" in offload.components else self.text_encoder.model.device
        before = offload.mode
        self.enable_offload("auto", offload.device, text_device=text_device, lookahead=offload.lookahead)
        if self.offload is None or self.offload.mode != before:
            self.offload_choice = f"after quantising, {self.offload_choice}"

    @contextlib.contextmanager
    def _offload_lifted(self):
        """Undo the offloading (if any) for the duration, then offload again as it was. Offloading packs
        the tensors that exist when it is applied and hooks the modules of that time: layers replaced or
        added meanwhile (LoRA wrappers, fused or quantised linears) would stay on the host, unhooked."""
        offload = self.offload
        if offload is None:
            yield
            return
        text_device = None if "text_encoder" in offload.components else self.text_encoder.model.device
        choice, auto = self.offload_choice, self.offload_auto
        offload.remove()
        self.offload = None
        try:
            yield
        finally:  # as it was: the mode, what "auto" chose and why, and the tiling it turned on
            self._apply_offload(offload.mode, offload.device, text_device, offload.lookahead)
            self.offload_choice, self.offload_auto = choice, auto

    @property
    def acceleration(self):
        """What `accelerate` did (a `cogvideox.fast.Acceleration`), or None."""
        return getattr(self.transformer, "acceleration", None)

    # -------------------------------------------------------------------------------------------------
    # What the model is

    @property
    def config(self) -> TransformerConfig:
        return self.transformer.config

    @property
    def device(self) -> torch.device:
        """Where the model computes (with offloading, not where its weights rest)."""
        if self.offload is not None:
            return self.offload.device
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def version(self) -> str:
        """"1.0" (CogVideoX-2b/5b) or "1.5" (CogVideoX1.5-5B)."""
        return self.config.version

    @property
    def spatial_compression(self) -> int:
        return self.vae.config.spatial_compression

    @property
    def default_num_frames(self) -> int:
        return self.config.sample_frames

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) the official demos use: 480x720 for CogVideoX 1.0, 768x1360 for 1.5."""
        return default_size(self.config, self.vae.config)

    @property
    def default_fps(self) -> int:
        """The frame rate the model was trained at: 8 for CogVideoX 1.0, 16 for 1.5."""
        return default_fps(self.config)

    def check_request(self, prompt: str | Sequence[str], **kwargs) -> GenerationRequest:
        """Validate a request (the arguments of `__call__` that shape the video; for image- and
        video-to-video `task=` and `video_frames=`, see `request.check_request`) against this model;
        raise `InputError` saying what to change. Runs no model."""
        train_steps = self.scheduler.config.num_train_timesteps
        return check_request(self.config, self.vae.config, prompt, num_train_timesteps=train_steps, **kwargs)

    # -------------------------------------------------------------------------------------------------
    # Running

    def encode_prompts(
        self, prompts: list[str], max_sequence_length: int, videos_per_prompt: int = 1
    ) -> torch.Tensor:
        """T5 embeddings [len(prompts) * videos_per_prompt, L, D] in the pipeline dtype, prompt-major."""
        with self._memory_guard("text"):
            embeds = self.text_encoder.encode(prompts, max_sequence_length, device=self.device, dtype=self.dtype)
        return embeds.repeat_interleave(videos_per_prompt, dim=0)

    def decode(
        self, latents: torch.Tensor, progress: bool = False, padding_frames: int | None = None
    ) -> list[np.ndarray]:
        """Latents [B, F, C, h, w] -> one uint8 video [T, H, W, 3] per sample (see
        `autoencoder.decode_latents`: one VAE call for the batch, tiles again rather than lose the latents
        when out of GPU memory). Latents elsewhere (the CPU, say) are moved to the pipeline's device; with
        offloading, the VAE goes back to the host afterwards, as after a call.

        padding_frames: latent frames at the front to drop first: a CogVideoX 1.5 call's latents carry
            `VideoOutput.padding_frames` of them. None: none, except that for a 1.5 model latents whose
            frame count is a multiple of its temporal patch (the padded form; also that of an 8k+5-frame
            video, which has no padding) are refused, since which they are cannot be told from the tensor."""
        channels, size = self.vae.config.latent_channels, self.spatial_compression
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5 or latents.shape[2] != channels:
            got = list(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise InputError(f"decode takes latents [batch, frames, {channels}, height/{size}, width/{size}] (one "
                             f"video's alone: latents[None]), got {got}")  # fmt: skip
        if latents.numel() == 0 or not latents.is_floating_point():
            raise InputError(f"decode takes non-empty float latents, got {latents.dtype} {list(latents.shape)}")
        if latents.device.type not in ("cpu", "cuda"):
            raise InputError(f"decode takes latents on the CPU or a GPU, got them on {latents.device}")
        if not torch.isfinite(latents).all():  # decoded, they are a video of garbage, not an error
            raise InputError("the latents hold NaN or infinite values: they came from a run that failed; make them "
                             "again")  # fmt: skip
        progress = check_flag(progress, "progress")
        latents = latents[:, self._padding_frames(latents.shape[1], padding_frames) :]
        try:
            return decode_latents(self.vae, latents.to(self.device), self.dtype, self._memory_guard, progress)
        finally:
            self.release_weights()

    def _padding_frames(self, frames: int, padding_frames: int | None) -> int:
        """How many of `frames` latent frames `decode` drops at the front (see there)."""
        patch = self.config.patch_size_t
        if padding_frames is None:
            if patch is not None and frames % patch == 0:
                raise InputError(
                    f"these latents have {frames} frames, a multiple of this CogVideoX 1.5 model's temporal patch "
                    f"({patch}): a call's latents carry padding frames at the front that decoding must drop, those "
                    "of an 8k+5-frame video have none; say which with decode(..., padding_frames=N): the call's "
                    "VideoOutput.padding_frames, or 0"
                )
            return 0
        if not isinstance(padding_frames, int) or isinstance(padding_frames, bool) or not 0 <= padding_frames < frames:
            raise InputError(f"padding_frames must be a whole number from 0 to {frames - 1} (the latents have {frames} "
                             f"frames), got {padding_frames!r}")  # fmt: skip
        return padding_frames

    def _memory_guard(self, stage: str, batch: int = 1):
        """Out of GPU memory in `stage` becomes an `OutOfMemoryError` saying what would fit."""
        from cogvideox.fast.oom import oom_guard

        return oom_guard(stage, self, batch)

    def _check_host_room(self, request: GenerationRequest, decode: bool, windowed: bool) -> None:
        """On the CPU, where running out of memory is no error but the kernel killing the process (no
        message, the work lost), an `OutOfMemoryError` up front for a request whose activations cannot fit
        in the memory the host has left. The estimates are floors (the transformer's are about half of what
        the CPU's kernels take), so a request refused here could not have run; the decode is counted in
        tiles, which `decode_latents` turns to when the untiled one would not fit."""
        from cogvideox.fast.memory_plan import activation_bytes, decode_bytes, host_room
        from cogvideox.values import in_units

        vae = self.vae.config
        frames = min(request.num_frames, self.config.sample_frames) if windowed else request.num_frames
        stages = {
            "denoise": activation_bytes(
                self.config, torch.empty((), dtype=self.dtype).element_size(), frames, request.height,
                request.width, batch=request.batch_size, guidance=request.use_guidance,
                temporal_compression=vae.temporal_compression, spatial_compression=vae.spatial_compression,
            )["denoise"],
        }  # fmt: skip
        if decode:
            stages["decode"] = decode_bytes(self.vae, request.batch_size, request.height, request.width, self.dtype,
                                            tiled=True)  # fmt: skip
        for stage, need in stages.items():
            available = host_room(need)
            if available is not None:
                what = "denoising" if stage == "denoise" else "decoding"
                raise OutOfMemoryError(
                    f"not enough memory on the CPU for this request: {what} {request.num_frames} frames at "
                    f"{request.width}x{request.height} needs at least {in_units(need)} beyond the weights, and "
                    f"this machine has {in_units(available)} available; try a smaller --height/--width "
                    "or fewer --frames, or a GPU",
                    stage=stage, requested_bytes=need, suggestion="a smaller --height/--width",
                )

    def _start(self, request: GenerationRequest, generator, shape, picture=None, source=None, latents=None, last=None):
        """Where denoising starts: (latents [B, F, C, h, w], the denoiser, the timesteps to run)."""
        device, dtype = self.device, self.dtype
        self.scheduler.set_timesteps(request.num_inference_steps, device=device)
        timesteps, model = self.scheduler.timesteps, self.transformer
        size = (request.height, request.width)
        # The image's or the video's posterior draw comes before the noise draw, as in the reference.
        if request.task == "image":
            pixels = conditioning.prepare_image(picture, *size, request.resize).to(device, dtype)
            if last is not None:
                last = conditioning.prepare_image(last, *size, request.resize).to(device, dtype)
            condition = conditioning.image_latents(
                self.vae, pixels, generator, request.batch_size, request.latent_frames, dtype, last
            )
            model = conditioning.ImageConditioned(self.transformer, condition)
        elif request.task == "video":
            pixels = conditioning.prepare_video(source[: request.num_frames], *size, request.resize)
            clean = conditioning.video_latents(
                self.vae, pixels.to(device, dtype), generator, request.batch_size, dtype, request.padding_frames
            )
            timesteps = conditioning.strength_timesteps(timesteps, request.strength)
            latents = conditioning.noised_video_latents(clean, self.scheduler, timesteps[0], generator)
            return latents, model, timesteps
        if latents is not None:
            return latents.to(device, dtype), model, timesteps
        # Drawn on the generator's device (the CPU for a seed) in the pipeline dtype, then moved.
        return randn(shape, generator, device=device, dtype=dtype), model, timesteps

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        use_dynamic_cfg: bool | None = None,
        dynamic_cfg: str | None = None,
        seed: int | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        num_videos_per_prompt: int = 1,
        max_sequence_length: int | None = None,
        output_type: str = "np",
        progress: bool = True,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        image=None,
        video=None,
        strength: float | None = None,
        resize: str = "stretch",
        latents: torch.Tensor | None = None,
        riflex: bool = False,
        last_image=None,
        window_stride: int | None = None,
        reschedule_noise: bool = True,
    ) -> VideoOutput:
        """Generate videos for one prompt or a list of prompts.

        num_frames / height / width default to the model's own (49 frames at 480x720 for CogVideoX 1.0,
        81 frames at 768x1360 for 1.5). Guidance is classifier-free with the negative prompt ("" by
        default) as the unconditional branch, off when guidance_scale <= 1. `use_dynamic_cfg` schedules the
        scale over the steps, with the reference's timestep clock ("reference") or the step index
        ("smooth"). The three default to the model's recommendation (`sampling_defaults`, from the
        folder's `sampling.json`), else to the reference's 6, off and "reference". `max_sequence_length`
        (T5 tokens per prompt) defaults to the model's, 226 for the released ones. Noise comes from `torch.Generator("cpu").manual_seed(seed)` (a random seed, reported in
        the output, when neither seed nor generator is given). `callback(step, timestep, latents)` runs
        after every step.

        image: the first frame, for image-to-video models (which need one): a file path, a PIL image or
            a uint8 array [H, W, 3]. It is resized to height x width (the model's size by default).
        last_image: with `image`, the last frame, in the same forms: its latent takes the last latent
            frame of the conditioning, as CogVideoX-Interpolation (a 5B-I2V fine-tuned for keyframes)
            was trained; the released I2V models were not, and follow it loosely if at all.
        video: the video to redraw (video-to-video): a file path, uint8 frames [T, H, W, 3] or a list of
            frames. Its first `num_frames` frames are used (default: the model's frame count, or the
            longest 8k+1 prefix of a shorter video), each resized to height x width. `strength` (default
            0.8) is the fraction of the schedule that runs: the video's latents are noised to the first
            timestep of the last int(n * strength).
        resize: "stretch" (the reference's plain resize, default) or "crop" (keep the aspect ratio: cut
            the centred region of the video's shape, then resize).
        latents: the starting noise [B, F, C, h, w] (F with the 1.5 padding frame) instead of a draw,
            e.g. the result of `cogvideox.inversion.invert`.
        riflex: for videos longer than the model's own length (RoPE models), RIFLEx's slowed temporal
            frequency, so that the video goes on instead of repeating its start (`riflex_frequencies`);
            no change at the model's length or shorter.
        window_stride: for videos longer than the model's own (text- and video-to-video, CogVideoX 1.0),
            denoise windows of its own length this many latent frames apart and blend them (see
            `cogvideox.windows`); any model, any length. With `reschedule_noise` (default), the starting
            noise past the first window repeats the first window's, shuffled (FreeNoise).
        """
        if image is not None and video is not None:
            raise InputError("give either an image (image-to-video) or a video (video-to-video), not both")
        progress = check_flag(progress, "progress")
        reschedule_noise = check_flag(reschedule_noise, "reschedule_noise")
        if callback is not None and not callable(callback):
            raise InputError(f"callback must be a function (step, timestep, latents), got {type(callback).__name__}")
        if last_image is not None and image is None:
            raise InputError("last_image is the last frame of an image-to-video video: give the first frame "
                             "(image=...) too")  # fmt: skip
        task = "image" if image is not None else "video" if video is not None else "text"
        # Decode the inputs first: a file that is not an image or a video fails before any model runs.
        picture = conditioning.load_image(image) if image is not None else None
        last_picture = conditioning.load_image(last_image) if last_image is not None else None
        source = None
        if video is not None:  # no more frames than the request can use
            source = conditioning.load_video(video, frames_to_read(num_frames, self.config))
        guidance = loading.fill_sampling(
            self.sampling_defaults,
            guidance_scale=guidance_scale, use_dynamic_cfg=use_dynamic_cfg, dynamic_cfg=dynamic_cfg,
        )
        request = self.check_request(
            prompt,
            negative_prompt=negative_prompt,
            num_frames=num_frames,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            **guidance,
            num_videos_per_prompt=num_videos_per_prompt,
            max_sequence_length=max_sequence_length,
            task=task,
            strength=strength,
            resize=resize,
            video_frames=None if source is None else len(source),
            riflex=riflex,
        )
        if last_picture is not None:
            check_last_image(request, self.vae.config)
        window = latent_frame_count(self.config.sample_frames, self.vae.config)
        window_stride = check_windows(window_stride, window, self.config)
        if window_stride is not None:
            if request.riflex:
                raise InputError("give riflex or window_stride for a longer video, not both")
            cache = getattr(self.acceleration, "cache", None)
            if cache is not None:
                raise InputError("windows run the transformer several times a step, which the step cache cannot "
                                 "follow: accelerate without cache=")  # fmt: skip
        if output_type not in OUTPUT_TYPES:
            raise InputError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        generator, seed = _generator(seed, generator, request.batch_size, self.device)
        compress = self.spatial_compression
        shape = (
            request.batch_size,
            request.latent_frames,
            self.config.latent_channels,
            request.height // compress,
            request.width // compress,
        )
        if latents is not None:
            if task == "video":
                raise InputError("latents= sets the starting noise; video-to-video starts from the video")
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
                got = list(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise InputError(f"latents must be a tensor of shape {list(shape)} for this request, got {got}")
            if not latents.is_floating_point() or latents.device.type not in ("cpu", "cuda"):
                raise InputError(f"latents must be a float tensor on the CPU or a GPU, got {latents.dtype} on "
                                 f"{latents.device}")

        if self.device.type == "cpu":
            self._check_host_room(request, output_type == "np", windowed=window_stride is not None)
        device, timings = self.device, {}

        start = time.perf_counter()
        length = request.max_sequence_length
        text = self.encode_prompts(request.prompts, length, request.videos_per_prompt)
        if request.use_guidance:
            uncond = self.encode_prompts(request.negative_prompts, length, request.videos_per_prompt)
            text = torch.cat([uncond, text])  # [2B, L, D], unconditional half first
        _sync(device)
        timings["text"] = time.perf_counter() - start

        windowed = window_stride is not None and shape[1] > window
        if windowed and reschedule_noise and task == "text" and latents is None:
            latents = rescheduled_noise(shape, window, generator, device, self.dtype)
        start = time.perf_counter()
        with self._memory_guard("encode", request.batch_size):
            latents, model, timesteps = self._start(request, generator, shape, picture, source, latents, last_picture)
        if windowed:
            rotary = self.transformer.rotary_embedding(window, shape[3], shape[4], device)
            model = WindowedDenoiser(model, window, window_stride, rotary)
        if request.task != "text":
            _sync(device)
            timings["encode"] = time.perf_counter() - start  # the VAE encoding of the image or video
            start = time.perf_counter()
        rotary = self.transformer.rotary_embedding(shape[1], shape[3], shape[4], device, request.riflex)  # once per call
        guidance = None
        if request.use_guidance:
            guidance = guidance_schedule(
                request.guidance_scale, timesteps.tolist(), request.use_dynamic_cfg, request.dynamic_cfg
            )
        inputs = DenoiseInputs(latents, text, guidance, rotary, generator)
        cache = getattr(self.acceleration, "cache", None)
        if cache is not None:  # a call stopped half-way (a callback raised) leaves its residuals behind
            cache.reset()
        bar = tqdm(total=len(timesteps), desc="denoising", unit="step", disable=not progress, leave=False)
        with bar, self._memory_guard("denoise", request.batch_size):

            def on_step(i: int, t: int, current: torch.Tensor) -> None:
                bar.update()
                if callback is not None:
                    callback(i, t, current)

            latents = denoise(model, self.scheduler, timesteps, inputs, on_step=on_step)
        _sync(device)
        timings["denoise"] = time.perf_counter() - start

        frames = None
        if output_type == "np":
            start = time.perf_counter()
            frames = self.decode(latents, progress=progress, padding_frames=request.padding_frames)
            timings["decode"] = time.perf_counter() - start
        self.release_weights()  # nothing of ours stays on the device between calls
        return VideoOutput(frames, latents, seed, request.padding_frames, timings)


def _lora_entries(lora) -> list[tuple[str | Path, float]]:
    """`from_pretrained`'s lora argument as (path, scale) pairs: a path, a (path, scale) pair, or a list
    of either."""
    if lora is None:
        return []
    entries = []
    for entry in lora if isinstance(lora, list) else [lora]:
        path, scale = entry if isinstance(entry, tuple) and len(entry) == 2 else (entry, 1.0)
        if not isinstance(path, (str, os.PathLike)) or isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise InputError(
                f"lora must be a path, a (path, scale) pair or a list of them, got {entry!r}"
            )
        entries.append((path, float(scale)))
    return entries


def _scheduler_kind(scheduler) -> str | None:
    """"ddim" / "dpm" for a name, None for None or a scheduler object; an unknown name, or anything that
    is neither a name nor one of `cogvideox.schedulers`' objects, is an error."""
    if scheduler is None or isinstance(scheduler, tuple(SCHEDULERS.values())):
        return None
    if not isinstance(scheduler, str):
        raise InputError(
            f"scheduler must be \"ddim\", \"dpm\" or a cogvideox.schedulers object, got {type(scheduler).__name__}"
        )
    kind = scheduler.strip().lower()
    if kind not in SCHEDULER_KINDS:
        raise InputError(f"unknown scheduler {scheduler!r}; use one of {', '.join(SCHEDULER_KINDS)}")
    return kind


def _generator(seed, generator, batch_size: int, device: torch.device):
    """The noise generator(s) of a call, and the seed to report. Generators draw on their own device: the
    CPU (moved afterwards, as the reference does) or the one the pipeline computes on, all on the same."""
    if seed is not None and generator is not None:
        raise InputError("pass either seed or generator, not both")
    if generator is not None:
        if isinstance(generator, Sequence):
            if len(generator) not in (1, batch_size):
                raise InputError(
                    f"{len(generator)} generators for {batch_size} videos: pass one, or one per video"
                )
            if not all(isinstance(g, torch.Generator) for g in generator):
                raise InputError("generator must be a torch.Generator or a list of them")
            generators = list(generator)
        elif not isinstance(generator, torch.Generator):
            raise InputError("generator must be a torch.Generator or a list of them")
        else:
            generators = [generator]
        places = {g.device for g in generators}
        if len(places) > 1:
            raise InputError(f"the generators are on different devices ({', '.join(sorted(map(str, places)))}): "
                             "put them all on one")  # fmt: skip
        place = places.pop()
        same = place.type == device.type and None in (place.index, device.index) or place == device
        if place.type != "cpu" and not same:
            raise InputError(f"a generator on {place} cannot draw noise for a pipeline on {device}: use "
                             f'torch.Generator("cpu") (as seed= does) or one on {device}')  # fmt: skip
        return (generators if isinstance(generator, Sequence) else generator), None
    if seed is None:
        seed = secrets.randbelow(2**32)
    elif not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise InputError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return torch.Generator("cpu").manual_seed(int(seed)), int(seed)


def _dtype_that_fits(
    folder: Path, dtype: torch.dtype, device: torch.device, offload: str, text_device, variant: str | None = None
) -> torch.dtype:
    """The default dtype, or bf16 where the default (fp32 on the CPU) would not fit in host memory but
    bf16 does: a default should run, not stop. An explicit dtype is never changed."""
    from cogvideox.fast.memory_plan import folder_sizes, host_shortfall

    if dtype != torch.float32 or device.type != "cpu":
        return dtype
    mode = "none" if offload == "auto" else offload
    short = host_shortfall(mode, folder_sizes(folder, dtype, variant), device, text_device)
    if short is None or host_shortfall(mode, folder_sizes(folder, torch.bfloat16, variant), device, text_device):
        return dtype  # fits, or bf16 would not fit either: check_host_memory says so
    need, available = short
    warnings.warn(
        f"in fp32 the model's weights take {need / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB "
        "this machine has available: loading them in bf16 instead",
        stacklevel=3,
    )
    return torch.bfloat16
