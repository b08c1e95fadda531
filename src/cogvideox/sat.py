"""Checkpoints in the original SAT format, converted to the official diffusers names on the fly.

CogVideoX's own repository trains with SwissArmyTransformer (SAT) and releases `.pt` state dicts: the
transformer as a DeepSpeed checkpoint folder (`<iteration>/mp_rank_00_model_states.pt`, the weights under
"module", keys prefixed `model.diffusion_model.`) and the VAE as `3d-vae.pt` (under "state_dict"). The
tensors are the same as the diffusers ones; only names and three layouts differ:

- attention: one `query_key_value` projection, split in three (q, k, v) along the output rows;
- expert AdaLN: one `adaLN_modulations.{i}` linear per block producing 12 chunks, (shift, scale, gate) for
  attention, then for the feed-forward, then the same six for text; diffusers' `norm1` takes the
  attention and text-attention chunks (0-2, 6-8), `norm2` the feed-forward ones (3-5, 9-11);
- VAE decoder: SAT numbers its up blocks from the lowest resolution (`up.3` runs first), diffusers in
  running order, so `up.{i}` is `up_blocks.{n-1-i}`.

Everything else is a rename. The SAT RoPE tables (`freqs_sin`/`freqs_cos`), token embeddings and the 2B
sin-cos table are recomputed, not loaded, and are dropped; the VAE's training loss (`loss.*`) too.

A SAT checkpoint carries no configs, so it is read against a diffusers-format *base* model (the one it
was trained from, or the released model of the same variant): its configs say what to build, its T5,
tokenizer and scheduler complete the pipeline.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from cogvideox import loading, weights
from cogvideox.errors import InputError, LoadError
from cogvideox.files import probe_writable, read_json, umask
from cogvideox.models.config import TransformerConfig, VAEConfig
from cogvideox.models.transformer import TRANSFORMER_PRESETS, CogVideoXTransformer
from cogvideox.models.vae import CogVideoXVAE

TRANSFORMER_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
DEEPSPEED_FILE = "mp_rank_00_model_states.pt"

StateDict = dict[str, torch.Tensor]

# SAT name -> diffusers name, applied in order to the part after the prefix. `{i}` is a layer index.
_TRANSFORMER_RENAMES = [
    (r"^transformer\.final_layernorm\.", "norm_final."),
    (r"^transformer\.layers\.(\d+)\.attention\.dense\.", r"transformer_blocks.\1.attn1.to_out.0."),
    (r"^transformer\.layers\.(\d+)\.attention\.query_key_value\.", r"transformer_blocks.\1.attn1.qkv."),
    (r"^transformer\.layers\.(\d+)\.mlp\.dense_h_to_4h\.", r"transformer_blocks.\1.ff.net.0.proj."),
    (r"^transformer\.layers\.(\d+)\.mlp\.dense_4h_to_h\.", r"transformer_blocks.\1.ff.net.2."),
    (r"^transformer\.layers\.(\d+)\.input_layernorm\.", r"transformer_blocks.\1.norm1.norm."),
    (r"^transformer\.layers\.(\d+)\.post_attention_layernorm\.", r"transformer_blocks.\1.norm2.norm."),
    (r"^mixins\.adaln_layer\.query_layernorm_list\.(\d+)\.", r"transformer_blocks.\1.attn1.norm_q."),
    (r"^mixins\.adaln_layer\.key_layernorm_list\.(\d+)\.", r"transformer_blocks.\1.attn1.norm_k."),
    (r"^mixins\.adaln_layer\.adaLN_modulations\.(\d+)\.1\.", r"transformer_blocks.\1.adaln."),
    (r"^time_embed\.0\.", "time_embedding.linear_1."),
    (r"^time_embed\.2\.", "time_embedding.linear_2."),
    (r"^ofs_embed\.0\.", "ofs_embedding.linear_1."),
    (r"^ofs_embed\.2\.", "ofs_embedding.linear_2."),
    (r"^mixins\.patch_embed\.", "patch_embed."),
    (r"^mixins\.pos_embed\.pos_embedding$", "patch_embed.pos_embedding"),
    (r"^mixins\.final_layer\.norm_final\.", "norm_out.norm."),
    (r"^mixins\.final_layer\.adaLN_modulation\.1\.", "norm_out.linear."),
    (r"^mixins\.final_layer\.linear\.", "proj_out."),
]
# Recomputed by the model, never loaded.
_TRANSFORMER_DROPPED = re.compile(r"(^|\.)(freqs_sin|freqs_cos|embed_tokens|position_embeddings?)(\.|$)")

_VAE_RENAMES = [
    (r"\.mid\.block_1\.", ".mid_block.resnets.0."),
    (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
    (r"\.block\.", ".resnets."),
    (r"^encoder\.down\.", "encoder.down_blocks."),
    (r"\.downsample\.", ".downsamplers.0."),
    (r"\.upsample\.", ".upsamplers.0."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
]


# ---------------------------------------------------------------------------------------------------
# Reading


def checkpoint_file(path: str | Path) -> Path:
    """The weights file of a SAT checkpoint: `path` itself, or, for a folder, the DeepSpeed file of the
    iteration its `latest` file names (else of its highest-numbered iteration)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise LoadError(f"no SAT checkpoint at {path}")
    if (path / DEEPSPEED_FILE).is_file():
        return path / DEEPSPEED_FILE
    latest = path / "latest"
    if latest.is_file():
        chosen = path / latest.read_text().strip() / DEEPSPEED_FILE
        if not chosen.is_file():
            raise LoadError(f"{latest} names iteration {latest.read_text().strip()!r}, but {chosen} is missing")
        return chosen
    iterations = sorted(
        (p for p in path.iterdir() if p.name.isdigit() and (p / DEEPSPEED_FILE).is_file()),
        key=lambda p: int(p.name),
    )
    if iterations:
        return iterations[-1] / DEEPSPEED_FILE
    candidates = sorted(path.glob("*.pt"))
    if len(candidates) == 1:
        return candidates[0]
    if (path / loading.MODEL_INDEX).is_file() or (path / "config.json").is_file():
        raise LoadError(
            f"{path} is in the diffusers layout already (a model folder or one of its components), not a SAT "
            "checkpoint: there is nothing to convert; give its model folder as the model (--model)"
        )
    raise LoadError(
        f"{path} is not a SAT checkpoint folder: no {DEEPSPEED_FILE}, no 'latest' file, no iteration "
        "folders, and not exactly one .pt file; give the .pt file itself"
    )


def read_state_dict(path: str | Path, trust_pickle: bool = False) -> StateDict:
    """All tensors of a SAT checkpoint (a `.pt` file or a checkpoint folder), unwrapped from the
    "module" / "model" / "state_dict" containers SAT and DeepSpeed save them in.

    `.pt` files are pickles: they are read with `weights_only=True`, which runs no code. A checkpoint
    holding other Python objects needs `trust_pickle=True`, for files from a source you trust only.
    """
    file = checkpoint_file(path)
    if file.suffix == ".safetensors":
        return load_file(str(file))
    try:
        try:
            saved = torch.load(file, map_location="cpu", weights_only=not trust_pickle, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            saved = torch.load(file, map_location="cpu", weights_only=not trust_pickle)  # legacy format
    except OSError as e:
        raise LoadError(f"cannot read {file}: {e.strerror or e}") from None
    except Exception as e:
        # A weights-only read names the Python object it refused ("... not an allowed global ...").
        if not trust_pickle and "allowed global" in str(e):
            raise LoadError(
                f"{file} holds Python objects besides tensors, which are only read from trusted files: "
                "pass trust_pickle=True (--trust-pickle) if you trust its source"
            ) from None
        what = "a damaged or incomplete PyTorch checkpoint" if _is_zip(file) else "not a PyTorch checkpoint"
        raise LoadError(f"cannot read {file}: {what} ({_load_failure(e)})") from None
    for container in ("module", "model", "state_dict"):
        if isinstance(saved, dict) and isinstance(saved.get(container), dict):
            saved = saved[container]
    if not isinstance(saved, dict) or not any(isinstance(v, torch.Tensor) for v in saved.values()):
        raise LoadError(f"{file} holds no state dict of tensors")
    return {k: v for k, v in saved.items() if isinstance(v, torch.Tensor)}


def _is_zip(file: Path) -> bool:
    """Whether `file` starts as the zip archive `torch.save` writes: one that then fails to read was cut
    short (an interrupted save or copy) or damaged, rather than some other kind of file."""
    with open(file, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _load_failure(error: Exception, limit: int = 160) -> str:
    """`torch.load`'s complaint about a file that is no checkpoint, short: "UnpicklingError: <what>".

    Unpicklers fail on junk with terse texts (a bare `KeyError: '101'`) or, weights-only, inside a
    paragraph of advice about `weights_only` that does not apply to junk; the class name and the
    unpickler's own words are what tell a person something."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    text = text.split("This is an internal miniz error", 1)[0]  # then advice to report a PyTorch bug
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def split_state_dict(state: StateDict) -> tuple[StateDict, StateDict]:
    """(transformer, VAE) tensors of a SAT state dict, prefixes removed. A full training checkpoint holds
    both (and the T5 under `conditioner.`, ignored: the base model's T5 is used); `3d-vae.pt` holds the
    VAE alone, with bare `encoder.` / `decoder.` / `loss.` names."""
    transformer, vae = {}, {}
    for key, tensor in state.items():
        if key.startswith(TRANSFORMER_PREFIX):
            transformer[key.removeprefix(TRANSFORMER_PREFIX)] = tensor
        elif key.startswith(VAE_PREFIX):
            vae[key.removeprefix(VAE_PREFIX)] = tensor
        elif key.split(".", 1)[0] in ("encoder", "decoder", "loss"):
            vae[key] = tensor
    return transformer, vae


# ---------------------------------------------------------------------------------------------------
# Converting names


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def convert_transformer_state_dict(sat: StateDict, config: TransformerConfig) -> StateDict:
    """SAT transformer tensors (prefix removed) -> the official diffusers keys of `config`'s model.

    Unknown names pass through unchanged, so that the strict load names them.
    """
    out: StateDict = {}
    for sat_key, tensor in sat.items():
        if _TRANSFORMER_DROPPED.search(sat_key):
            continue
        key = _rename(sat_key, _TRANSFORMER_RENAMES)
        if key == "patch_embed.pos_embedding" and not config.use_learned_positional_embeddings:
            continue  # 2B's sin-cos table: the model computes it
        block = re.match(r"^transformer_blocks\.(\d+)\.", key)
        if ".attn1.qkv." in key:
            q, k, v = tensor.chunk(3, dim=0)  # one projection's output rows: queries, keys, values
            for name, part in (("to_q", q), ("to_k", k), ("to_v", v)):
                out[key.replace(".qkv.", f".{name}.")] = part
        elif block and ".adaln." in key:
            # 12 chunks: attention (0-2), feed-forward (3-5), text attention (6-8), text feed-forward (9-11).
            chunks = tensor.chunk(12, dim=0)
            kind = key.rsplit(".", 1)[1]  # weight / bias
            out[f"{block.group(0)}norm1.linear.{kind}"] = torch.cat(chunks[0:3] + chunks[6:9])
            out[f"{block.group(0)}norm2.linear.{kind}"] = torch.cat(chunks[3:6] + chunks[9:12])
        else:
            out[key] = tensor
    return out


def convert_vae_state_dict(sat: StateDict, config: VAEConfig) -> StateDict:
    """SAT VAE tensors (prefix removed) -> the official diffusers keys; the training loss is dropped."""
    levels = len(config.up_block_types)
    out: StateDict = {}
    for sat_key, tensor in sat.items():
        if sat_key.startswith("loss."):
            continue
        key = _rename(sat_key, _VAE_RENAMES)
        up = re.match(r"^decoder\.up\.(\d+)\.", key)
        if up:
            # SAT counts decoder stages from the lowest resolution; diffusers in running order.
            key = f"decoder.up_blocks.{levels - 1 - int(up.group(1))}." + key[up.end() :]
        out[key] = tensor
    return out


# ---------------------------------------------------------------------------------------------------
# Loading


def matching_presets(sat: StateDict) -> list[str]:
    """Names of the released transformers whose tensors SAT transformer tensors (prefix removed) match."""
    names = []
    for name, config in TRANSFORMER_PRESETS.items():
        found = {k: tuple(v.shape) for k, v in convert_transformer_state_dict(sat, config).items()}
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in CogVideoXTransformer(config).state_dict().items()}
        if expected == found:
            names.append(name)
    return names


def _build(make: Callable[[], nn.Module], state: StateDict, dtype: torch.dtype, device, what: str) -> nn.Module:
    """Build on the meta device and load `state` by assignment, strictly, cast to `dtype` on `device`."""
    with torch.device("meta"):
        model = make()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    weights.check_state_dict_shapes(expected, {k: tuple(v.shape) for k, v in state.items()}, what)
    tensors = {}
    for key, tensor in state.items():
        tensors[key] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


def load_transformer(sat: StateDict, config: TransformerConfig, dtype: torch.dtype, device, what: str):
    """Our transformer from SAT tensors (prefix removed), strictly: every tensor named and shaped as
    `config`'s model wants."""
    state = convert_transformer_state_dict(sat, config)
    try:
        return _build(lambda: CogVideoXTransformer(config), state, dtype, device, what)
    except LoadError as e:
        presets = matching_presets(sat)
        if not presets:
            raise
        raise LoadError(
            f"{e}; its shapes are those of {' / '.join(presets)}: use that model (e.g. THUDM/{presets[0]}) "
            "as the base"
        ) from None


def load_vae(sat: StateDict, config: VAEConfig, dtype: torch.dtype, device, what: str):
    """Our VAE from SAT tensors (prefix removed), strictly."""
    state = convert_vae_state_dict(sat, config)
    return _build(lambda: CogVideoXVAE(config), state, dtype, device, what)


def load_components(
    checkpoint: str | Path,
    configs: loading.ModelConfigs,
    dtype: torch.dtype,
    device: torch.device,
    vae: str | Path | None = None,
    trust_pickle: bool = False,
):
    """(transformer or None, VAE or None) from a SAT checkpoint and an optional separate VAE checkpoint.

    The checkpoint may hold a transformer (a DeepSpeed model file), a VAE (`3d-vae.pt`) or both (a full
    training checkpoint); what it lacks is None, to be taken from the base model.
    """
    transformer_sat, vae_sat = split_state_dict(read_state_dict(checkpoint, trust_pickle))
    if vae is not None:
        _, separate = split_state_dict(read_state_dict(vae, trust_pickle))
        if not separate:
            raise LoadError(f"{vae} holds no VAE tensors (encoder.*, decoder.*)")
        vae_sat = separate
    if not transformer_sat and not vae_sat:
        raise LoadError(
            f"{checkpoint} holds no CogVideoX tensors: neither {TRANSFORMER_PREFIX}* (transformer) nor "
            "encoder.* / decoder.* (VAE)"
        )
    transformer_model = vae_model = None
    if transformer_sat:
        transformer_model = load_transformer(
            transformer_sat, configs.transformer, dtype, device, f"the SAT transformer {checkpoint}"
        )
    if vae_sat:
        vae_model = load_vae(vae_sat, configs.vae, dtype, device, f"the SAT VAE {vae or checkpoint}")
    return transformer_model, vae_model


def copy_sampling_defaults(base: Path, output: Path) -> None:
    """Copy the base model's recommended guidance settings (`sampling.json`), when it has them, into
    the model folder written from it: a converted model samples as its base recommends, not with the
    reference's fallbacks (guidance 6)."""
    recommended = Path(base) / loading.SAMPLING_DEFAULTS
    if recommended.is_file():
        shutil.copyfile(recommended, Path(output) / loading.SAMPLING_DEFAULTS)


def convert(
    checkpoint: str | Path,
    base: Path,
    output: str | Path,
    dtype: torch.dtype,
    vae: str | Path | None = None,
    trust_pickle: bool = False,
    max_shard_size: int | str = "10GB",
    variant: str | None = None,
) -> tuple[str, ...]:
    """Write a SAT checkpoint as a model folder in the diffusers layout, completed from `base` (a model
    folder): converted components replace the base's, the others (always the T5, tokenizer and
    scheduler) are copied unchanged, and so are its recommended sampling settings (`sampling.json`).

    `variant` ("fp16"): the base's weights of that variant are the ones taken, where a component has
    them (as `Pipeline.from_pretrained(variant=)` reads them), so a base whose weights are only fp16 files
    serves. The written folder holds plain weight files (`model.safetensors`, ...) whatever the base's
    names: it loads without a variant.

    Returns the names of the components converted ("transformer", "vae"): a checkpoint holds one or both,
    and a user who meant to convert a transformer should learn that the file held only a VAE.
    """
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise LoadError(f"{output} already exists and is not empty; choose a new folder")
    _check_writable(output)
    variant = loading.check_variant(variant)
    configs = loading.read_model_configs(base, variant=variant)
    cpu = torch.device("cpu")
    transformer, vae_model = load_components(checkpoint, configs, dtype, cpu, vae, trust_pickle)
    converted = tuple(name for name, m in (("transformer", transformer), ("vae", vae_model)) if m is not None)
    with _folder_in_place(output) as folder:
        for name, module in (("transformer", transformer), ("vae", vae_model)):
            if module is None:
                _copy_component(base / name, folder / name, loading.STEMS[name], variant)
                continue
            (folder / name).mkdir()
            module.config.save(folder / name / "config.json")
            weights.save_weights(module, folder / name, max_shard_size=max_shard_size)
        _copy_component(base / "text_encoder", folder / "text_encoder", loading.STEMS["text_encoder"], variant)
        for name in ("tokenizer", "scheduler"):
            shutil.copytree(base / name, folder / name)
        copy_sampling_defaults(base, folder)
        index = json.loads((base / loading.MODEL_INDEX).read_text())
        (folder / loading.MODEL_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return converted


def _copy_component(source: Path, target: Path, stem: str, variant: str | None) -> None:
    """Copy a component folder of the base with the weights its loading reads (`variant`'s where it has
    them) under the plain names, byte for byte: `{stem}.safetensors`, or the shards
    `{stem}-00001-of-0000N.safetensors` with `{stem}.safetensors.index.json`. The base's other weight
    files (other variants, `.bin`) are left out."""
    files = weights.weight_files(source, stem, variant)

    def not_weights(folder: str, names: list[str]) -> set[str]:
        if Path(folder) != source:
            return set()
        return {n for n in names if n.startswith(stem) and n.endswith((".safetensors", ".json")) or n.endswith(".bin")}

    shutil.copytree(source, target, ignore=not_weights)
    if len(files) == 1:
        shutil.copyfile(files[0], target / f"{stem}.safetensors")
        return
    renamed = {path.name: f"{stem}-{i:05d}-of-{len(files):05d}.safetensors" for i, path in enumerate(files, 1)}
    for path in files:
        shutil.copyfile(path, target / renamed[path.name])
    data = read_json(weights.shard_index(source, stem, variant))  # the index weight_files read the shards from
    data["weight_map"] = {key: renamed[name] for key, name in data["weight_map"].items()}
    (target / f"{stem}.safetensors.index.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _check_writable(output: Path) -> None:
    """Fail before the checkpoint is read if `output` cannot be made: its nearest existing folder must
    take a file (permissions, a read-only file system)."""
    existing = next(p for p in output.absolute().parents if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{existing} is a file")
        probe_writable(existing)
    except OSError as e:
        raise InputError(f"cannot write {output}: {e.strerror or e}") from None


@contextmanager
def _folder_in_place(output: Path):
    """A new folder beside `output` to write the model into, renamed to `output` once complete: a convert
    that fails or is interrupted leaves no half-written model folder behind (which a second try would
    refuse as not empty, and loading would take for a model)."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".part", dir=output.parent))
    except OSError as e:
        raise InputError(f"cannot write {output}: {e.strerror or e}") from None
    try:
        yield folder
        os.chmod(folder, 0o777 & ~umask())  # mkdtemp made it private
        os.replace(folder, output)  # onto a missing or empty folder
    except OSError as e:  # a full disk (a model is tens of GB), an unreadable file of the base
        shutil.rmtree(folder, ignore_errors=True)
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise InputError(f"cannot write {output}: {e.strerror or e}{where}; nothing was left there") from None
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
