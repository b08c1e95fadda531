"""Safetensors weight files: reading them into a model built on the meta device, and writing them.

Reading makes no second copy of the weights. Every tensor of a file is a copy-on-write memory map of its
own bytes (`read_tensors`): already in the target dtype on the CPU, it becomes the model's weight as it
is, read on first use; cast or moved to a GPU, its pages go back to the kernel as soon as it is
converted. Loading is strict: every tensor of the files must match a tensor of the model, by name and
shape, and every tensor of the model must be in the files.

Writing plans the shards from the tensor sizes and writes them one at a time, in the layout
`save_pretrained` uses (`{stem}.safetensors`, or numbered shards and `{stem}.safetensors.index.json`).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from cogvideox.errors import InputError, LoadError
from cogvideox.files import parse_json, read_json, usual_mode

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"  # file stem diffusers uses for transformer and VAE weights


def weight_files(component_dir: Path, stem: str = DIFFUSERS_WEIGHTS, variant: str | None = None) -> list[Path]:
    """The safetensors file(s) of one component: `{stem}.safetensors`, or the shards its index names.

    With a `variant` ("fp16"), its files instead (`{stem}.fp16.safetensors`, or the shards its index names:
    `{stem}.safetensors.index.fp16.json`, or the legacy `{stem}.safetensors.fp16.index.json`) where the
    component has them, else the plain ones: a pipeline loads each component's variant where there is
    one, as diffusers' does.
    """
    read_variant = variant is not None and has_variant(component_dir, stem, variant)
    single = component_dir / (f"{stem}.{variant}.safetensors" if read_variant else f"{stem}.safetensors")
    if single.is_file():
        return [single]
    index = shard_index(component_dir, stem, variant)
    if index is None:
        name = f"{stem}.safetensors.index.{variant}.json"
        raise LoadError(f"{component_dir} has {variant} shards but no index naming them ({name})")
    if index.is_file():
        return _shards(component_dir, index)
    if variant is not None:
        unread = unread_bin(sorted(p.name for p in component_dir.glob("*.bin")))
        raise LoadError(
            f"{component_dir} has no weights: neither the {variant} variant ({stem}.{variant}.safetensors) nor "
            f"{stem}.safetensors" + (f"; found only {unread}" if unread else "")
        )
    unread = unread_weights(component_dir, stem)
    if unread:
        raise LoadError(f"{component_dir} has no {stem}.safetensors: found {unread}")
    raise LoadError(f"{component_dir} has no weights ({stem}.safetensors or {stem}.safetensors.index.json)")


def shard_index(component_dir: Path, stem: str, variant: str | None = None) -> Path | None:
    """Where the index of the shards `weight_files` reads stands: `variant`'s (None when the component
    has that variant's shards but no index of them) where the component has the variant, else the plain
    `{stem}.safetensors.index.json`, which may not exist."""
    if variant is not None and has_variant(component_dir, stem, variant):
        return variant_index(component_dir, stem, variant)
    return component_dir / f"{stem}.safetensors.index.json"


def variant_index(component_dir: Path, stem: str, variant: str) -> Path | None:
    """The index of `variant`'s shards in a component folder, in today's name or the legacy one (None)."""
    for name in (f"{stem}.safetensors.index.{variant}.json", f"{stem}.safetensors.{variant}.index.json"):
        if (component_dir / name).is_file():
            return component_dir / name
    return None


def _shards(component_dir: Path, index: Path) -> list[Path]:
    shards = [component_dir / name for name in shard_names(index)]
    absent = [p.name for p in shards if not p.is_file()]
    if absent:
        raise LoadError(f"{component_dir} is missing shard(s) named in its index: {', '.join(absent)}")
    return shards


# `{stem}.{variant}.safetensors`, `{stem}.{variant}-00001-of-00002.safetensors` (a shard) and
# `{stem}.safetensors.index.{variant}.json`: the names diffusers' and transformers' `save_pretrained(variant=)`
# write (diffusers' `_add_variant`). Older diffusers wrote shards as `{stem}-00001-of-00002.{variant}.safetensors`
# with the index `{stem}.safetensors.{variant}.index.json`; diffusers still reads those (its "legacy" variant
# files), and so do we.
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")


def variant_of(name: str, stem: str) -> str | None:
    """The variant a weight file's `name` belongs to ("fp16"), or None (plain weights, or another file)."""
    index = f"{stem}.safetensors.index."
    if name.startswith(index) and name.endswith(".json"):
        return name[len(index) : -len(".json")] or None
    legacy_index = f"{stem}.safetensors."
    if name.startswith(legacy_index) and name.endswith(".index.json"):
        return name[len(legacy_index) : -len(".index.json")] or None
    legacy_shard = re.fullmatch(rf"{re.escape(stem)}-\d{{5}}-of-\d{{5}}\.(.+)\.safetensors", name)
    if legacy_shard:
        return legacy_shard.group(1)
    if name.startswith(f"{stem}.") and name.endswith(".safetensors"):
        return _SHARD.sub("", name[len(stem) + 1 : -len(".safetensors")]) or None
    return None


def variants(component_dir: Path, stem: str) -> set[str]:
    """The variants whose safetensors weights a component folder holds ({"fp16"}, or empty)."""
    return named_variants([p.name for p in component_dir.iterdir()] if component_dir.is_dir() else [], stem)


def named_variants(names: Iterable[str], stem: str) -> set[str]:
    """The variants whose safetensors weights one folder's file `names` hold ({"fp16"}, or empty)."""
    return {v for v in (variant_of(name, stem) for name in names) if v is not None}


def variant_file_names(names: Iterable[str], stem: str, variant: str) -> list[str]:
    """Of file `names` (one folder's, or a repo's `component/file` paths), those of `variant`'s weights."""
    return [name for name in names if variant_of(name.rpartition("/")[2], stem) == variant]


def has_variant(component_dir: Path, stem: str, variant: str) -> bool:
    """Whether a component folder holds weights of `variant`."""
    return variant in variants(component_dir, stem)


def unread_weights(component_dir: Path, stem: str) -> str:
    """What a component folder without `{stem}.safetensors` or its index holds instead that is not read,
    and what to do about it ("" for nothing): the weights of a `variant` ("fp16": the files diffusers and
    transformers save as `{stem}.fp16.safetensors`, or as shards and `{stem}.safetensors.index.fp16.json`),
    read when that variant is asked for, or pickled `.bin` weights (`unread_bin`)."""
    found = sorted(variants(component_dir, stem))
    if found:
        names = " or ".join(found)
        return (f"only the weights of the variant {names}; load them with variant={found[0]!r} "
                f"(--variant {found[0]})")
    unread = unread_bin(sorted(p.name for p in component_dir.glob("*.bin")))
    return f"only {unread}" if unread else ""


def bin_variant(name: str) -> str | None:
    """The variant of a pickled weight file's `name`: "fp16" for `diffusion_pytorch_model.fp16.bin`,
    `pytorch_model.fp16-00001-of-00002.bin` or the legacy `pytorch_model-00001-of-00002.fp16.bin`; None
    for plain `.bin` weights."""
    middle = name.split(".")[1:-1]
    return (_SHARD.sub("", middle[0]) or None) if len(middle) == 1 and name.endswith(".bin") else None


def unread_bin(names: list[str]) -> str:
    """What to say of pickled `.bin` weight files (their `names`; "" for none): that they are not read,
    and how to turn them into safetensors files, which are."""
    if not names:
        return ""
    found = sorted({v for v in map(bin_variant, names) if v is not None})
    variant = f", variant={found[0]!r}" if found else ""
    return (f".bin weights ({listing(names, 3)}), which cogvideox does not read: it reads safetensors files; "
            "convert them by loading the component with diffusers' or transformers' "
            f"from_pretrained(folder{variant}) and writing it back with save_pretrained(folder{variant}), "
            "which writes safetensors")


def shard_names(index: Path) -> list[str]:
    """The shard file names a `*.safetensors.index.json` maps tensors to, each once, in order."""
    try:
        weight_map = read_json(index)["weight_map"]
    except OSError as e:
        raise LoadError(f"cannot read {index}: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
        raise LoadError(f"{index} is not a safetensors index (no weight_map of tensor names to file names)")
    return list(dict.fromkeys(weight_map.values()))


def listing(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_state_dict_shapes(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], what: str
) -> None:
    """Raise `LoadError` naming every missing, unexpected or mis-shaped tensor."""
    missing = expected.keys() - found.keys()
    unexpected = found.keys() - expected.keys()
    wrong = [k for k in expected.keys() & found.keys() if tuple(expected[k]) != tuple(found[k])]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {listing(unexpected)}")
    if wrong:
        shapes = [f"{k} (checkpoint {list(found[k])}, model {list(expected[k])})" for k in sorted(wrong)[:8]]
        more = f" and {len(wrong) - 8} more" if len(wrong) > 8 else ""
        problems.append(f"{len(wrong)} tensor(s) with the wrong shape: {', '.join(shapes)}{more}")
    if problems:
        raise LoadError(f"{what} does not match the model its config.json describes: " + "; ".join(problems))


# The element types of the safetensors format (its header's "dtype" field).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """The tensor entries of a safetensors file's header ({name: {dtype, shape, data_offsets}}) and the
    byte offset where its data begins. Format: an 8-byte little-endian header length, the JSON header.
    The length is checked against the file's size before anything is read: a cut-off download or a
    file of another kind would otherwise ask for up to 16 EiB."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise LoadError(f"cannot read {path}: not a safetensors file (shorter than its header)")
            (length,) = struct.unpack("<Q", head)
            if length > os.fstat(f.fileno()).st_size - 8:
                raise LoadError(
                    f"cannot read {path}: the file ends inside its safetensors header (truncated download, "
                    "or not a safetensors file)"
                )
            try:
                header = parse_json(f.read(length))
            except (ValueError, MemoryError):
                raise LoadError(f"cannot read {path}: damaged safetensors header") from None
    except OSError as e:
        raise LoadError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(header, dict):
        raise LoadError(f"cannot read {path}: damaged safetensors header")
    header.pop("__metadata__", None)
    _check_entries(path, header)
    return header, 8 + length


def _check_entries(path: Path, header: dict) -> None:
    """`LoadError` naming the tensor whose header entry is malformed: not {dtype, shape, data_offsets} of
    the right types, or a byte range that does not start where the previous tensor's ends. The format
    lays the tensors end to end; overlapping or negative ranges would read other tensors' bytes (or the
    header's) as weights."""
    ranges = []
    for name, entry in header.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(entry.get("dtype") if isinstance(entry, dict) else None, str)
            or not isinstance(shape, list)
            or not all(type(n) is int and n >= 0 for n in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(n) is int for n in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise LoadError(f"cannot read {path}: damaged safetensors header (the entry of tensor {name})")
        ranges.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(ranges):
        if begin != end:
            raise LoadError(
                f"cannot read {path}: damaged safetensors header (tensor {name} starts at byte {begin} of the "
                f"data, not {end}, where the tensor before it ends)"
            )
        end = stop


def read_tensors(path: Path, header: tuple[dict[str, dict], int] | None = None) -> Iterable[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of a safetensors file, in file order.

    Each tensor is a private (copy-on-write) memory map of its own bytes: nothing is read before it is
    used, writing to it never reaches the file, and its pages go back to the kernel as soon as the tensor
    is dropped, converted or replaced (by offloading's packed copy, say). One map of the whole file, as
    `safe_open` makes, would keep every page read resident until the last of its tensors is gone.
    `header`: what `read_safetensors_header(path)` gave, when the caller has read it already.
    """
    header, start = header or read_safetensors_header(path)
    size = path.stat().st_size
    grain = mmap.ALLOCATIONGRANULARITY  # a map must start on this boundary
    try:
        f = open(path, "rb")
    except OSError as e:
        raise LoadError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise LoadError(f"{path}: tensor {name} has an element type we cannot read ({entry['dtype']})")
            begin, end = (start + offset for offset in entry["data_offsets"])
            numel = math.prod(entry["shape"])
            if numel * dtype.itemsize != end - begin:
                raise LoadError(f"{path}: tensor {name} takes {end - begin} bytes, not what its shape needs")
            if end > size:
                raise LoadError(f"cannot read {path}: the file ends inside tensor {name} (truncated download?)")
            if numel == 0:
                yield name, torch.empty(entry["shape"], dtype=dtype)
                continue
            low = begin - begin % grain
            mapped = mmap.mmap(f.fileno(), end - low, offset=low, access=mmap.ACCESS_COPY)
            # The tensor holds the map; the map is unmapped when the tensor's storage is freed.
            yield name, torch.frombuffer(mapped, dtype=dtype, count=numel, offset=begin - low).view(entry["shape"])


def checkpoint_shapes(headers: dict[Path, tuple[dict[str, dict], int]]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Tensor name -> (file, shape) for every tensor of the files whose headers are given."""
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for path, (header, _) in headers.items():
        for key, entry in header.items():
            if key in found:
                raise LoadError(f"tensor {key} appears in both {found[key][0].name} and {path.name}")
            found[key] = (path, tuple(entry["shape"]))
    return found


def load_weights(
    model: nn.Module,
    files: list[Path],
    dtype: torch.dtype,
    device: torch.device,
    what: str,
    *,
    keep_fp32: Iterable[str] = (),
    tied: dict[str, str] | None = None,
) -> None:
    """Fill a meta-device `model` with the tensors of `files`, strictly, cast to `dtype` on `device`.

    `keep_fp32`: module names whose float tensors load in float32 whatever `dtype` is (a parameter
    matches when one of the parts of its dotted name is such a name). `tied`: {alias: source} parameter
    names that are one tensor; the checkpoint may hold the alias or leave it out, and after loading the
    alias is the source's parameter itself.
    """
    tied = tied or {}
    keep_fp32 = set(keep_fp32)
    headers = {path: read_safetensors_header(path) for path in files}
    found = checkpoint_shapes(headers)
    model_state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in model_state.items()}
    for alias in tied.keys() - found.keys():
        expected.pop(alias, None)  # filled from its source below
    check_state_dict_shapes(expected, {k: shape for k, (_, shape) in found.items()}, what)
    for key, (path, _) in found.items():
        # Cast to the model's dtype below, a float tensor loads whatever its precision; integers in place
        # of weights (or the reverse) are not weights of this model, and torch's complaint is no answer.
        kind = headers[path][0][key]["dtype"]
        is_float = SAFETENSORS_DTYPES.get(kind, torch.float32).is_floating_point
        if is_float != model_state[key].is_floating_point():
            want = "floating-point" if model_state[key].is_floating_point() else str(model_state[key].dtype)
            raise LoadError(f"{path}: tensor {key} holds {kind} values but the model's {key} is {want}")

    state: dict[str, torch.Tensor] = {}
    for path in files:
        for key, tensor in read_tensors(path, headers[path]):
            # Integer buffers keep their type; every float tensor takes the pipeline dtype. Already in
            # that dtype on the CPU, the mapped tensor itself becomes the weight: no copy at all.
            if not tensor.is_floating_point():
                target = tensor.dtype
            elif keep_fp32 and keep_fp32.intersection(key.split(".")):
                target = torch.float32
            else:
                target = dtype
            state[key] = tensor.to(device=device, dtype=target)
            del tensor
    for alias, source in tied.items():
        state[alias] = state[source]
    model.load_state_dict(state, strict=True, assign=True)
    for alias, source in tied.items():
        owner, _, name = alias.rpartition(".")
        setattr(model.get_submodule(owner), name, model.get_parameter(source))
    _check_materialized(model)


def _check_materialized(model: nn.Module) -> None:
    """Every tensor must be real after loading. Non-persistent buffers are not in the checkpoint; the
    modules owning them recompute them in a load_state_dict post-hook (e.g. the 2B sin-cos table)."""
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors still on the meta device after loading: {listing(leftover)}")


def parse_size(size: int | str) -> int:
    """`"10GB"`, `"500MB"`, `1_000_000` -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, re.IGNORECASE)
    if not match:
        raise InputError(f"cannot read {size!r} as a size; write e.g. 5GB or 500MB")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(match.group(1)) * scale)


def _standalone(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` on the CPU as safetensors can write it: contiguous and owning its storage exactly.

    A view into a larger storage (a slice of a fused weight, a tied tensor) is copied; anything else is
    written as it is, so saving a model does not need a second copy of its weights.
    """
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.storage_offset() != 0 or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


def remove_weight_files(folder: Path, stem: str) -> None:
    """Delete `{stem}.safetensors`, its shards and index from `folder`: what a new save replaces, so that
    no stale file of another layout (single or sharded) is left to be read instead of the new one."""
    for stale in [*folder.glob(f"{stem}*.safetensors"), folder / f"{stem}.safetensors.index.json"]:
        stale.unlink(missing_ok=True)


def save_weights(
    model: nn.Module, folder: Path, stem: str = DIFFUSERS_WEIGHTS, max_shard_size: int | str = "10GB"
) -> list[Path]:
    """Write the state dict as `{stem}.safetensors`, or as shards plus `{stem}.safetensors.index.json`.

    Shards are planned from the tensor sizes and written one at a time, so that at most one shard's
    worth of views is ever copied.
    """
    folder.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    state = model.state_dict()
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    remove_weight_files(folder, stem)
    if len(shards) == 1:
        path = folder / f"{stem}.safetensors"
        save_file({k: _standalone(state[k]) for k in shards[0]}, str(path), metadata={"format": "pt"})
        usual_mode(path)
        return [path]
    paths, weight_map, total = [], {}, 0
    for i, keys in enumerate(shards, start=1):
        path = folder / f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: _standalone(state[k]) for k in keys}, str(path), metadata={"format": "pt"})
        usual_mode(path)
        paths.append(path)
        for key in keys:
            weight_map[key] = path.name
            total += state[key].numel() * state[key].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return paths
