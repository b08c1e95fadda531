"""Fine-tuning a CogVideoX model on a folder of captioned videos: `finetune(config) -> path`.

    from cogvideox.train.config import FinetuneConfig
    from cogvideox.train.finetune import finetune

    path = finetune(FinetuneConfig(data="clips/", output="runs/style", model="THUDM/CogVideoX-5b"))

The run: read the folder (skipping and reporting unusable videos), precompute latents and T5 states into
the cache, then train the transformer (a LoRA on the attention projections, or every weight with
`full=True`) with the CogVideoX objective: v-prediction on the model's zero-terminal-SNR schedule with
its SNR shift, t uniform over the 1000 training steps (stratified over a step's clips: `Run.timesteps`).
The official trainers weight the x0 error by 1 / (1 - alpha_bar_t); that weighted loss is exactly the
v-MSE computed here (see `objective.py`).

Every random draw of step s (batch, posterior sample, caption dropout, t, noise) comes from a generator
seeded by (seed, rank, s), the order of the timestep strata from one seeded by (seed, s) alike on every
process, and checkpoints hold the trainable weights, the optimizer and the step, so a run restarted from
a checkpoint continues with the same losses, bit for bit.

Several processes: launch the same command under `torchrun --nproc-per-node N`. Each process draws its
own batches; the gradients of the trainable weights are averaged across processes after each step
(data parallelism, as DDP does). Full fine-tuning on several GPUs shards the weights, gradients and
optimizer state with FSDP2 (`fully_shard`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from cogvideox import loading
from cogvideox.errors import InputError, NonFiniteError
from cogvideox.files import lock_folder, prepare_folder, read_json
from cogvideox.parallel.launch import sigterm_kills
from cogvideox.values import in_units

from . import colour
from . import lora as lora_lib
from .cache import CachedDataset, precompute, remove_files, unused_entries
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, step_generator
from .config import TIMESTEPS, FinetuneConfig
from .data import Bucket, check_buckets, scan_folder
from .log import JsonlLog, plot_curve
from .objective import stratified_timesteps, v_loss
from .optim import CPUOffloadAdamW

CHECKPOINT_PREFIX = "step"
LOCK = ".train.lock"  # held by the run writing into a run folder


# ----------------------------------------------------------------------------------------------------
# Processes


class _Processes:
    """This process's place in a torchrun launch (rank 0 of 1 without one)."""

    def __init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.started_here = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def start(self, device: torch.device) -> None:
        if self.world_size > 1 and not dist.is_initialized():
            with sigterm_kills():  # torchrun's stop ends a process whose partner never joins at once
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.started_here = True

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def mean(self, value: float, device: torch.device) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t) / self.world_size

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        """Mean of each gradient over the processes, in one flat all-reduce."""
        if self.world_size == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def stop(self) -> None:
        if self.started_here and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# Optimizers


def make_optimizer(config: FinetuneConfig, params: list[nn.Parameter]):
    kwargs = dict(lr=config.learning_rate, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if config.optimizer == "adamw-cpu":
        return CPUOffloadAdamW(params, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise InputError("optimizer adamw-8bit needs bitsandbytes (pip install bitsandbytes) and a GPU") from None
    return bnb.optim.AdamW8bit(params, **kwargs)


def learning_rate(config: FinetuneConfig, step: int) -> float:
    """Linear warm-up over `warmup_steps`, then constant or cosine down to lr * min_lr_ratio."""
    lr = config.learning_rate
    if config.warmup_steps and step < config.warmup_steps:
        return lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return lr
    span = max(config.steps - config.warmup_steps, 1)
    progress = min(max(step - config.warmup_steps, 0) / span, 1.0)
    r = config.min_lr_ratio
    return lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------------
# The run


class Run:
    """A loaded fine-tuning run: components, data, trainable weights and optimizer. `finetune` drives it;
    tests and benchmarks use its pieces (`loss`, `train_step`)."""

    def __init__(self, config: FinetuneConfig, processes: _Processes | None = None) -> None:
        self.config = c = config
        self.procs = processes or _Processes()
        self.out = Path(c.output)
        self.device = loading.choose_device(c.device)
        if self.procs.world_size > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", self.procs.local_rank)
            torch.cuda.set_device(self.device)
        self.procs.start(self.device)
        if self.procs.main:  # a run folder that cannot be made fails now, not after the data is encoded
            prepare_folder(self.out)
        self.variant = loading.check_variant(c.variant)
        self.folder = loading.resolve_model_dir(c.model, revision=c.revision, variant=self.variant)
        self.configs = loading.read_model_configs(self.folder, variant=self.variant)
        # The base's recommended guidance: validation samples with it (as `generate` does) and a full
        # fine-tune's model folder passes it on; read now so that a broken sampling.json fails before
        # the training, not after it.
        self.sampling_defaults = loading.read_sampling_defaults(self.folder)
        self.validation_guidance = c.validation_guidance
        if self.validation_guidance is None:
            self.validation_guidance = self.sampling_defaults["guidance_scale"]
        self.timestep_sampling = c.timesteps or "stratified"  # a resumed run may keep its own (`resume`)
        tc = self.configs.transformer
        if tc.is_image_to_video:
            raise InputError("fine-tuning image-to-video models is not supported yet; use a text-to-video model")
        self.dtype = loading.choose_dtype(c.dtype, self.device, tc)
        self.max_sequence_length = c.max_sequence_length or tc.max_text_seq_length
        self.fps = c.fps or (16 if tc.version == "1.5" else 8)
        if c.buckets:
            buckets = [Bucket.parse(b) for b in c.buckets]
        else:
            from cogvideox.request import default_size

            buckets = [Bucket(tc.sample_frames, *default_size(tc, self.configs.vae))]
        self.buckets = check_buckets(buckets, tc, self.configs.vae)
        if not c.full:  # LoRA targets that match no layer fail now, not after the data is encoded
            from cogvideox.models.transformer import CogVideoXTransformer

            with torch.device("meta"):
                lora_lib.check_targets(CogVideoXTransformer(tc), c.targets)
        self.skipped: list = []
        # The step whose state the weights hold (None while the optimizer changes them): what an
        # interrupted run saves (`save_interrupted`).
        self.steps_done: int | None = None

    # -- setup ---------------------------------------------------------------------------------------

    def prepare_data(self) -> CachedDataset:
        """Scan the folder, fill the cache (VAE and T5 loaded only for this), report what was skipped."""
        c = self.config
        clips, skipped = scan_folder(c.data)
        cache_dir = Path(c.cache_dir) if c.cache_dir else Path(c.data) / "cache"
        if self.procs.main:  # a cache that cannot be written fails now, not with a traceback at the first clip
            try:
                prepare_folder(cache_dir)
            except InputError as e:
                raise InputError(f"{e} (the cache of latents and T5 states); give another --cache-dir") from None
        self.vae = loading.load_vae(self.folder, self.dtype, self.device, self.variant)
        self.text_encoder = loading.load_text_encoder(self.folder, self.dtype, self.device, self.variant)
        args = (clips, self.buckets, self.fps, self.vae, self.text_encoder, cache_dir, self.max_sequence_length)
        progress = c.progress and self.procs.main
        if self.procs.world_size > 1:  # each rank encodes its share, then all read everything
            precompute(*args, progress=progress, rank=self.procs.rank, world_size=self.procs.world_size)
            self.procs.barrier()
        prepared = precompute(*args, progress=progress)
        if self.procs.main:
            self._report_unused(cache_dir, prepared)
        self.skipped = skipped + prepared.skipped
        if self.procs.main and self.skipped:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "skipped.txt").write_text("".join(f"{s}\n" for s in self.skipped))
            for s in self.skipped:
                print(f"cogvideox train: skipped {s}")
        if not prepared.examples:
            raise InputError(f"no usable videos in {c.data} ({len(self.skipped)} skipped; see the messages above)")
        if not c.validation_every:  # only validation needs them again
            del self.vae, self.text_encoder
        elif self.device.type == "cuda":  # parked in CPU memory between validations
            self.vae.to("cpu")
            self.text_encoder.model.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.dataset = CachedDataset(prepared)
        if c.mask_weight != 1 and not self.dataset.has_masks and self.procs.main:
            warnings.warn(
                f"mask_weight is {c.mask_weight:g} but no clip in {c.data} has a mask; the loss is unweighted",
                stacklevel=2,
            )
        return self.dataset

    def _report_unused(self, cache_dir: Path, prepared) -> None:
        """Delete the cache's entries this run does not read (`prune_cache`), or say how much they hold."""
        unused = unused_entries(cache_dir, prepared)
        if not unused:
            return
        if self.config.prune_cache:
            freed = remove_files(unused)
            print(f"cogvideox train: removed {len(unused)} unused cache file(s) from {cache_dir} "
                  f"({in_units(freed)})")  # fmt: skip
        else:
            held = sum(p.stat().st_size for p in unused if p.exists())
            print(f"cogvideox train: {cache_dir} holds {len(unused)} file(s) ({in_units(held)}) this run does not "
                  "read; --prune-cache deletes them")  # fmt: skip

    def prepare_model(self) -> None:
        """The transformer with what is trained made trainable, and the optimizer."""
        c = self.config
        # Full fine-tuning keeps fp32 weights (the optimizer's masters) unless they live on the CPU.
        full_fp32 = c.full and c.optimizer != "adamw-cpu" and self.device.type == "cuda"
        dtype = torch.float32 if full_fp32 else self.dtype
        self.transformer = loading.load_transformer(self.folder, dtype, self.device, self.variant)
        self.transformer.gradient_checkpointing = c.gradient_checkpointing
        self.transformer.offload_activations = c.offload_activations
        self.transformer.save_attention = c.save_attention
        if c.offload_activations and self.device.type == "cpu" and self.procs.main:
            warnings.warn(
                "offload_activations moves a GPU's saved block inputs to host memory; on the CPU they are "
                "there already, so it saves no memory",
                stacklevel=2,
            )
        if c.full:
            for p in self.transformer.parameters():
                p.requires_grad_(True)
        else:
            lora_lib.inject_lora(self.transformer, c.rank, c.alpha, c.targets, seed=c.seed)
            if c.quantize_base:
                from cogvideox.fast.quantize import quantize

                # After the LoRA: the adapted layers (LoRALinear) and the adapters stay as they are, the
                # other frozen linears of the blocks become int8 weight-only (see fast/quantize.py).
                quantize(self.transformer, c.quantize_base, device=self.device)
        if c.compile:
            from cogvideox.fast.compile import compile_blocks

            # After the LoRA, so the graph holds its layers, and before sharding, whose hooks stay outside
            # the compiled forward. Training compiles one graph per clip shape (see fast/compile.py);
            # PyTorch's default of 8 is kept for the rest (validation's sampling).
            compile_blocks(self.transformer, recompile_limit=8 + len(self.buckets))
        self.transformer.train()
        self.trainable = {n: p for n, p in self.transformer.named_parameters() if p.requires_grad}
        self.sharded = False
        if c.full and self.procs.world_size > 1 and self.device.type == "cuda":
            from torch.distributed.fsdp import fully_shard

            if c.save_attention:  # its checkpointed blocks bypass the hooks that gather sharded weights
                raise InputError("save_attention does not combine with full fine-tuning on several GPUs (FSDP)")

            for block in self.transformer.transformer_blocks:
                fully_shard(block)
            fully_shard(self.transformer)
            self.sharded = True  # gradients arrive reduced and sharded
            self.trainable = {n: p for n, p in self.transformer.named_parameters() if p.requires_grad}
        self.optimizer = make_optimizer(c, list(self.trainable.values()))
        from cogvideox.schedulers import alphas_cumprod

        self.alphas_cumprod = alphas_cumprod(self.configs.scheduler).float()
        self._rotary: dict = {}

    # -- one step ------------------------------------------------------------------------------------

    def generator(self, step: int, micro: int = 0) -> torch.Generator:
        c = self.config
        return step_generator(c.seed * 1009 + self.procs.rank, step * c.grad_accum + micro)

    def timesteps(self, step: int, micro: int, generator: torch.Generator) -> torch.Tensor | None:
        """This process's timesteps for micro-batch `micro` of optimizer step `step`: stratified over all
        the step's draws (processes x micro-batches x batch; `objective.stratified_timesteps`), or None
        for v_loss's plain uniform draw."""
        c = self.config
        if self.timestep_sampling != "stratified":
            return None
        per_micro = c.batch_size
        first = (self.procs.rank * c.grad_accum + micro) * per_micro
        draws = self.procs.world_size * c.grad_accum * per_micro
        order = step_generator(c.seed * 1009 - 1, step)  # the same on every process, unlike `generator`
        return stratified_timesteps(
            len(self.alphas_cumprod), draws, range(first, first + per_micro), order, generator
        )

    def loss(self, generator: torch.Generator, step: int | None = None, micro: int = 0) -> torch.Tensor:
        """The objective on one batch drawn with `generator`; with `step`, its timesteps are those of
        micro-batch `micro` of that optimizer step (`timesteps`), else drawn uniformly."""
        c = self.config
        tc = self.configs.transformer
        idx = self.dataset.draw(c.batch_size, generator)
        mean, logvar, text = self.dataset.batch(idx)  # [B, F, C, h, w] x 2, [B, L, D]
        mask = self.dataset.masks(idx) if c.mask_weight != 1 else None  # [B, F, 1, h, w]
        if c.sample_posterior:
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
            latents = mean + torch.exp(0.5 * logvar) * noise
        else:
            latents = mean
        latents = latents * self.configs.vae.scaling_factor
        if tc.patch_size_t and latents.shape[1] % tc.patch_size_t:
            # 1.5: an odd latent frame count gets copies of the first frame in front, as the official
            # trainer does (the pipeline pads the same way when sampling).
            pad = tc.patch_size_t - latents.shape[1] % tc.patch_size_t
            latents = torch.cat([latents[:, :1]] * pad + [latents], dim=1)
            if mask is not None:
                mask = torch.cat([mask[:, :1]] * pad + [mask], dim=1)
        drop = torch.rand(len(idx), generator=generator) < c.caption_dropout
        text = torch.where(drop[:, None, None], self.dataset.empty_text[None], text)
        f, _, h, w = latents.shape[1:]
        if (f, h, w) not in self._rotary:
            self._rotary[(f, h, w)] = self.transformer.rotary_embedding(f, h, w, self.device)
        dtype = next(self.transformer.parameters()).dtype
        # Masked cells weigh mask_weight, the rest 1 (v_loss takes the weighted mean): a small subject
        # otherwise counts for the few percent of the latent grid it covers.
        weight = None if mask is None else 1.0 + (c.mask_weight - 1.0) * mask
        return v_loss(
            self.transformer,
            latents.to(self.device, dtype),
            text.to(self.device, dtype),
            self.alphas_cumprod,
            generator,
            rotary=self._rotary[(f, h, w)],
            weight=weight,
            timesteps=None if step is None else self.timesteps(step, micro, generator),
        )

    def autocast(self):
        if self.device.type == "cuda" and self.dtype in (torch.bfloat16, torch.float16):
            return torch.autocast("cuda", dtype=self.dtype)
        return nullcontext()

    def train_step(self, step: int) -> float:
        """Accumulate `grad_accum` micro-batches, average across processes, clip, step. Returns the loss
        (mean over micro-batches and processes)."""
        c = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(c, step)
        total = 0.0
        for micro in range(c.grad_accum):
            with self.autocast():
                loss = self.loss(self.generator(step, micro), step, micro)
            if not torch.isfinite(loss):
                raise NonFiniteError(
                    f"the loss became {loss.item()} at step {step}; try a lower learning rate or bf16 instead of fp16"
                )
            (loss / c.grad_accum).backward()
            total += loss.item() / c.grad_accum
        params = list(self.trainable.values())
        if not self.sharded:
            self.procs.average_gradients(params)
        if c.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        self.steps_done = None  # the weights and the optimizer change: no step's state until it is done
        self.optimizer.step()
        self.steps_done = step + 1
        self.optimizer.zero_grad(set_to_none=True)
        return self.procs.mean(total, self.device)

    # -- checkpoints ---------------------------------------------------------------------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.transformer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {n: p.detach().to("cpu", copy=True) for n, p in self.trainable.items()}

    def optimizer_state(self) -> dict:
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_optimizer_state_dict(self.transformer, self.optimizer, options=options)
        return self.optimizer.state_dict()

    def save(self, step: int) -> None:
        # Every rank takes part in gathering a sharded state; rank 0 writes.
        weights, optim = self.trainable_state(), self.optimizer_state()
        if self.procs.main:
            folder = self.out / "checkpoints"
            path = folder / f"{CHECKPOINT_PREFIX}-{step}.pt"
            try:
                save_checkpoint(path, step=step, weights=weights, optimizer=optim, identity=self.config.run_identity,
                                processes=self.procs.world_size)  # fmt: skip
            except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
                raise InputError(_unwritten_checkpoint(path, e, reached_step(self.out))) from None
            kept = sorted(
                (int(p.stem.rsplit("-", 1)[1]), p) for p in folder.glob(f"{CHECKPOINT_PREFIX}-*.pt")
                if p.stem.rsplit("-", 1)[1].isdigit()
            )
            for _, old in kept[: -self.config.keep_checkpoints]:
                old.unlink()
        self.procs.barrier()

    def resume(self) -> int:
        """Load the newest checkpoint of the run folder, if any; returns the step to continue from. A
        resumed run keeps the validation guidance and the timestep sampling it recorded unless the
        config gives them (see `recorded_validation_guidance`, `recorded_timestep_sampling`)."""
        path = latest_checkpoint(self.out / "checkpoints", CHECKPOINT_PREFIX)
        if path is None:
            return 0
        state = _read_checkpoint(path)
        changed = changed_settings(state.get("identity") or {}, self.config.run_identity)
        if changed:
            raise InputError(
                f"{self.out} holds a run with other settings ({_differ(changed)}); give another "
                "output folder or the same settings to resume it"
            )
        self._warn_other_processes(path, state.get("processes"))
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            set_model_state_dict(self.transformer, state["weights"], options=options)
            set_optimizer_state_dict(self.transformer, self.optimizer, state["optimizer"], options=options)
        else:
            with torch.no_grad():
                for name, p in self.trainable.items():
                    p.copy_(state["weights"][name])
            self.optimizer.load_state_dict(state["optimizer"])
        record = read_recorded_config(self.out)
        if self.config.validation_guidance is None:
            recorded = recorded_validation_guidance(record)
            if recorded is not None:
                self.validation_guidance = recorded
        if self.config.timesteps is None:
            self.timestep_sampling = recorded_timestep_sampling(record)
        return int(state["step"])

    def _warn_other_processes(self, path: Path, saved: int | None) -> None:
        """A run resumed under another number of processes goes on (the weights and the optimizer do not
        depend on it), but each step then takes another number of clips, drawn by other ranks' generators:
        say so, since its loss curve no longer continues the one it would have drawn. A checkpoint from
        before the count was recorded says nothing."""
        now = self.procs.world_size
        if saved is None or saved == now or not self.procs.main:
            return
        per = self.config.batch_size * self.config.grad_accum
        warnings.warn(
            f"{path} was saved with {saved} process(es), now {now}: the effective batch ({per * saved} clips per "
            f"step then, {per * now} now) and the data order differ, so the loss curve is not the one the run "
            "would have drawn",
            stacklevel=3,
        )

    def save_interrupted(self) -> None:
        """On Ctrl-C, SIGTERM or running out of memory during training: a checkpoint of the steps done since
        the newest one, so that they are not lost (the next start continues from it exactly, as from any
        checkpoint). Not when the signal came while the optimizer changed the weights, and not with several
        processes, which would all have to take part."""
        done = self.steps_done
        if done is None or self.procs.world_size > 1 or done <= reached_step(self.out):
            return
        print(f"cogvideox train: stopping; saving step {done} first (Ctrl-C again to stop at once)", file=sys.stderr)
        self.save(done)

    # -- output --------------------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self, step: int, base: bool = False) -> dict[str, list[float]] | None:
        """Videos of the validation prompts with the current weights, in `validation/` (written by rank
        0; with sharded weights every rank takes part in sampling); their colours (`colour.measure`) on
        rank 0, None on the others. `base`: with the base model instead, the LoRA left out (a LoRA run
        only), as `base-STEP-i.mp4`: the burn watch's reference for a run resumed at `step` with other
        validation settings."""
        from cogvideox.pipeline import Pipeline
        from cogvideox.video import as_frames, export_video

        c = self.config
        if self.device.type == "cuda":
            self.vae.to(self.device)
            self.text_encoder.model.to(self.device)
        scheduler = loading.load_scheduler(self.folder)
        pipe = Pipeline(self.transformer, self.vae, self.text_encoder, scheduler)
        pipe.sampling_defaults = self.sampling_defaults  # the model's dynamic CFG, as `generate` samples
        bucket = self.buckets[0]
        self.transformer.eval()
        videos = []
        # A round takes minutes for a large model (before the first step too): its sampling steps are shown
        bar = tqdm(total=len(c.validation_prompts) * c.validation_steps, desc=f"validation videos of step {step}",
                   unit="step", leave=False, disable=not (c.progress and self.procs.main))
        if base:
            lora_lib.activate_lora(self.transformer, {})  # the adapters skipped: the base model's weights
        try:
            for i, prompt in enumerate(c.validation_prompts):
                with self.autocast():  # fp32 masters (full fine-tuning) next to a bf16 VAE and T5
                    result = pipe(
                        prompt,
                        num_frames=bucket.frames,
                        height=bucket.height,
                        width=bucket.width,
                        num_inference_steps=c.validation_steps,
                        guidance_scale=self.validation_guidance,
                        seed=c.validation_seed,
                        max_sequence_length=self.max_sequence_length,
                        progress=False,
                        callback=lambda *_: bar.update(),
                    )
                if not self.procs.main:
                    continue
                path = self.out / "validation" / f"{'base' if base else 'step'}-{step}-{i}.mp4"
                path.parent.mkdir(parents=True, exist_ok=True)
                videos.append(as_frames(result.frames[0]))
                export_video(videos[-1], path, fps=self.fps)
        finally:
            if base:
                lora_lib.activate_lora(self.transformer, {lora_lib.DEFAULT_ADAPTER: 1.0})
            bar.close()
            self.transformer.train()
            if self.device.type == "cuda":
                self.vae.to("cpu")
                self.text_encoder.model.to("cpu")
        return colour.measure(videos) if self.procs.main else None

    @property
    def validation_settings(self) -> dict:
        """What a validation round's videos depend on besides the weights, logged with its figures: a base
        round made with other settings (a resumed run's new prompts, say) is no reference for this run's."""
        c, bucket = self.config, self.buckets[0]
        return {"prompts": list(c.validation_prompts), "steps": c.validation_steps, "seed": c.validation_seed,
                "guidance": self.validation_guidance, "size": f"{bucket.frames}x{bucket.height}x{bucket.width}"}

    def recorded_config(self) -> dict:
        """The settings `config.json` records: the config's, with the validation guidance actually used
        (the model's recommendation filled in), so that a resumed run can keep it."""
        return self.config.to_dict() | {
            "validation_guidance": self.validation_guidance,
            "timesteps": self.timestep_sampling,
        }

    def write_result(self) -> Path:
        """The LoRA file (diffusers layout) or, for full fine-tuning, a complete model folder. `InputError`
        for one that cannot be written (a full disk): the run's last checkpoint lets the same command
        write it again."""
        try:
            return self._write_result()
        except OSError as e:
            path = self.out / (lora_lib.LORA_WEIGHTS_NAME if not self.config.full else "model")
            raise InputError(_stopped_by(f"cannot write {path}", e, reached_step(self.out))) from None

    def _write_result(self) -> Path:
        c = self.config
        if not c.full:
            path = self.out / lora_lib.LORA_WEIGHTS_NAME
            if self.procs.main:
                lora_lib.save_lora(self.transformer, path)
            return path
        weights = self.trainable_state()
        path = self.out / "model"
        if self.procs.main:
            from cogvideox.pipeline import Pipeline

            model = loading.load_transformer(self.folder, self.dtype, torch.device("cpu"), self.variant)
            model.load_state_dict({k: v.to(self.dtype) for k, v in weights.items()})
            text_encoder = loading.load_text_encoder(self.folder, self.dtype, torch.device("cpu"), self.variant)
            vae = loading.load_vae(self.folder, self.dtype, torch.device("cpu"), self.variant)
            pipe = Pipeline(model, vae, text_encoder, loading.load_scheduler(self.folder))
            pipe.sampling_defaults = self.sampling_defaults  # written as the folder's sampling.json
            pipe.save_pretrained(path)
        return path


def _unwritten_checkpoint(path: Path, error: Exception, reached: int) -> str:
    """The message for a checkpoint that could not be written: why, and that the run's older checkpoints
    are kept, so that the work up to the newest one is not lost."""
    why = error.strerror if isinstance(error, OSError) and error.strerror else "the write failed"
    then = f"continue from step {reached}, its newest checkpoint" if reached else "start over (no checkpoint yet)"
    return (
        f"cannot write the checkpoint {path}: {why} (is the disk full?); free some space and run the same "
        f"command again to {then}"
    )


def _stopped_by(what, error: OSError, reached: int) -> str:
    """The message for a run stopped by a file error (a full disk, a folder made read-only): what failed,
    why, and the checkpoint the same command continues from once it is mended."""
    why = error.strerror or str(error)
    then = f"continue from step {reached}, its newest checkpoint" if reached else "start over (no checkpoint yet)"
    return f"{what}: {why}; run the same command again once that is mended to {then}"


def changed_settings(theirs: dict, ours: dict) -> list[str]:
    """The run-identity settings (`FinetuneConfig.run_identity`) in which a recorded run and this command
    differ (one the record lacks counts as None). The model is the same when both name the same local
    folder however spelt (`model`, `./model`, an absolute path)."""
    def same(key: str) -> bool:
        recorded = theirs.get(key)
        if key == "model" and isinstance(recorded, str) and isinstance(ours[key], str):
            a, b = Path(recorded).expanduser(), Path(ours[key]).expanduser()
            if a.is_dir() and b.is_dir():
                return a.resolve() == b.resolve()
        return recorded == ours[key]

    return sorted(key for key in ours if not same(key))


def _differ(names: list[str]) -> str:
    """"rank differs", "alpha, rank differ": the settings a run folder's record and the command disagree on."""
    return f"{', '.join(names)} {'differs' if len(names) == 1 else 'differ'}"


def _read_checkpoint(path: Path) -> dict:
    """A run's checkpoint; `InputError` for one that cannot be read (cut short by a full disk or a copy, or
    not a checkpoint), naming the older one the run could continue from once it is deleted."""
    try:
        state = load_checkpoint(path)
    except Exception as e:  # torch.load's errors for a damaged file have many types
        detail = " ".join(str(e).split(". ")[0].split()) or type(e).__name__
        state = None
    else:
        detail = "not a checkpoint of this command"
    if isinstance(state, dict) and all(k in state for k in ("step", "weights", "optimizer")):
        return state
    older = [p for p in path.parent.glob(f"{CHECKPOINT_PREFIX}-*.pt") if p != path]
    then = "continue from the next newest" if older else "start over"
    raise InputError(f"cannot read the checkpoint {path} ({detail}); delete it to {then}, or give another --output")


def read_recorded_config(output: str | Path) -> dict:
    """The settings the `config.json` of the run in `output` records (`Run.recorded_config`), or {} when
    there is no readable record."""
    try:
        record = read_json(Path(output) / "config.json")
    except (OSError, ValueError):  # ValueError: not UTF-8 or not JSON
        return {}
    return record if isinstance(record, dict) else {}


def recorded_validation_guidance(record: dict) -> float | None:
    """The validation guidance in a run's record (`read_recorded_config`), or None (none usable). A
    resumed run left to the model's recommendation keeps it: its validation videos stay comparable even
    when the recommendation changed between starts, or the run started when the default was a fixed 6."""
    value = record.get("validation_guidance")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        return None
    return float(value)


def recorded_timestep_sampling(record: dict) -> str:
    """The timestep sampling in a run's record (`read_recorded_config`): "uniform" for a run recorded
    before the setting existed (it drew every clip's timestep on its own), and for a record without a
    usable one; a run resumed without the setting continues as it began."""
    value = record.get("timesteps")
    return value if value in TIMESTEPS else "uniform"


def warn_if_validation_never_runs(config: FinetuneConfig) -> None:
    """A warning when there are validation prompts but `validation_every` exceeds `steps`: the run
    would otherwise end without the videos asked for and without a word."""
    if config.validation_prompts and config.validation_every > config.steps and _Processes().main:
        warnings.warn(
            f"validation_every is {config.validation_every} but the run has only {config.steps} steps: "
            "no validation videos will be made",
            stacklevel=2,
        )


def reached_step(output: str | Path) -> int:
    """The step the run in the folder `output` has reached: its newest checkpoint's (0 for a new run)."""
    path = latest_checkpoint(Path(output) / "checkpoints", CHECKPOINT_PREFIX)
    return 0 if path is None else int(path.stem.rsplit("-", 1)[1])


def check_steps_left(config: FinetuneConfig) -> int:
    """The step the run continues from; an `InputError` when its folder is already past `config.steps`.

    A run cannot go back: its result would be that of the later step, reported as the earlier one.
    Checked from the checkpoint names, before minutes of loading. At exactly `config.steps` there is
    nothing to train either, but the result is written again (a run stopped between its last
    checkpoint and its result gets it)."""
    reached = reached_step(config.output)
    if reached > config.steps:
        raise InputError(
            f"{config.output} is already at step {reached} (asked for {config.steps}): nothing to train; "
            "raise --steps to continue"
        )
    if reached:
        _check_same_run(config)
    return reached


def _check_same_run(config: FinetuneConfig) -> None:
    """Refuse to continue a run with other settings, from the `config.json` the run wrote, before the
    data scan and the model load (`Run.resume` checks the checkpoint itself again)."""
    recorded = read_recorded_config(config.output)  # {} (no record): the checkpoint check will tell
    ours = json.loads(json.dumps(config.run_identity))
    changed = changed_settings({**ours, **recorded}, ours)  # a setting not recorded: the checkpoint will tell
    if changed:
        raise InputError(
            f"{config.output} holds a run with other settings ({_differ(changed)}); give another "
            "output folder or the same settings to resume it"
        )


def rebase(run: Run, log: JsonlLog, start: int) -> None:
    """A run resumed at `start` with validation settings (prompts, steps, seed, guidance, size) that no
    base model's round in its log was made with: make that round now, for the burn watch to compare the
    coming rounds with (logged as step 0's: the base model's), or, when the base model is gone (full
    fine-tuning changed its weights in place), say that the watch is off."""
    settings = run.validation_settings
    if colour.base_colours(log.read(), settings) is not None:
        return
    if run.config.full:
        warnings.warn(
            "the log has no base model's validation round made with these validation settings (prompts, "
            "steps, seed, guidance, size), and full fine-tuning keeps no copy of the base model's weights "
            "to make one now: the burn watch is off for this run (its rounds' colours are still logged); "
            "keep the validation settings of the run's start to keep it on",
            stacklevel=3,
        )
        return
    measured = run.validate(start, base=True)
    log.write(0, **measured, validation=settings)


def finetune(config: FinetuneConfig) -> Path:
    """Run (or resume) a fine-tuning run; returns the LoRA file or the fine-tuned model folder.

    Writes into `config.output`: `checkpoints/step-N.pt` (the newest `keep_checkpoints`), `loss.jsonl`
    and `loss.png`, `validation/step-N-i.mp4`, `skipped.txt` (videos not used, and why),
    `config.json` (the settings, with the validation guidance used), and the result:
    `pytorch_lora_weights.safetensors` or `model/`. A folder whose run is already past `config.steps`
    is an `InputError` (see `check_steps_left`); validation prompts that `validation_every` > `steps`
    leaves unused are a warning.
    """
    check_steps_left(config)
    warn_if_validation_never_runs(config)
    run = Run(config)
    lock = None
    try:
        c = config
        if run.procs.main:
            lock = lock_folder(run.out, LOCK, "run", "training into", "--output")
        run.prepare_data()
        run.prepare_model()
        start = run.steps_done = run.resume()
        main = run.procs.main
        if main:
            run.out.mkdir(parents=True, exist_ok=True)
            (run.out / "config.json").write_text(json.dumps(run.recorded_config(), indent=2) + "\n")
        log = JsonlLog(run.out / "loss.jsonl", resume_step=start) if main else None

        def validate(step: int) -> None:
            """A validation round; its colours go into the log, with a warning when they burn."""
            measured = run.validate(step)
            if log is not None and measured is not None:
                log.write(step, **measured, validation=run.validation_settings)
                base = colour.base_colours(log.read(), run.validation_settings)
                warning = colour.burn_warning(base, measured, step, c.learning_rate, c.validation_prompts)
                if warning:
                    warnings.warn(warning, stacklevel=2)

        rounds_ahead = c.validation_every and c.validation_every <= c.steps
        if rounds_ahead and start > 0 and log is not None:
            next_round = (start // c.validation_every + 1) * c.validation_every
            if next_round <= c.steps:  # rounds ahead, and perhaps no base round to compare them with
                rebase(run, log, start)
        if rounds_ahead and start % c.validation_every == 0 and (main or run.sharded):
            # Step 0: the base model's videos, the reference the later rounds are seen against. A run stopped
            # while it made its videos resumes from the checkpoint written just before: they are made now,
            # or never.
            if not all((run.out / "validation" / f"step-{start}-{i}.mp4").is_file()
                       for i in range(len(c.validation_prompts))):
                validate(start)
        bar = tqdm(range(start, c.steps), initial=start, total=c.steps, desc="fine-tune",
                   disable=not (c.progress and main))
        # `seconds` runs on across restarts, from where the kept log ends: one clock for the whole curve.
        earlier = next((r["seconds"] for r in reversed(log.read()) if "seconds" in r), 0.0) if log else 0.0
        t0 = time.perf_counter() - earlier
        try:
            for step in bar:
                loss = run.train_step(step)
                done = step + 1
                if main and (done % c.log_every == 0 or done == c.steps):
                    log.write(done, loss=loss, lr=learning_rate(c, step), seconds=round(time.perf_counter() - t0, 3))
                    bar.set_postfix(loss=f"{loss:.4f}")
                if done % c.checkpoint_every == 0 or done == c.steps:
                    run.save(done)
                if c.validation_every and done % c.validation_every == 0 and (main or run.sharded):
                    validate(done)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM: the steps done since the last checkpoint are kept
            bar.close()
            run.save_interrupted()
            raise
        except (torch.OutOfMemoryError, MemoryError):  # a larger bucket's first draw, say: the same
            bar.close()
            run.optimizer.zero_grad(set_to_none=True)  # the failed step's gradients are not part of the state
            run.save_interrupted()
            raise
        except OSError as e:  # a full disk under the log or the validation videos, say: one line
            bar.close()
            raise InputError(_stopped_by(e.filename or run.out, e, reached_step(run.out))) from None
        bar.close()
        if main:
            plot_curve(log.read(), "loss", run.out / "loss.png", title="fine-tuning loss")
        return run.write_result()
    finally:
        if lock is not None:
            lock.close()
        run.procs.stop()

