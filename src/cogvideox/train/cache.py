"""Precomputed training inputs: VAE latents of every clip and T5 states of every caption, on disk.

Fine-tuning never runs the VAE encoder or T5 in the training step: both are frozen, so their outputs
are computed once, written as safetensors under the cache folder and read back each step. A cache entry
is named by a hash of everything it depends on, so it is reused by the next run and silently replaced
when anything changes (a damaged entry is encoded again):
- latents: the video file's bytes, the bucket list, the frame rate, and the VAE's weights and config
  (and the mask file's bytes, for a clip with a mask);
- text: the caption, the token count, and the T5's weights.
The latents are kept as the posterior's mean and log-variance, [F, C, h, w] (frames first, the
transformer's layout), so every training step can draw a fresh posterior sample. A clip's mask is kept
beside them reduced to the latent grid, [F, 1, h, w] (see `latent_mask`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from cogvideox.files import write_into_place

from .data import Bucket, Clip, ClipError, Skipped, load_masked_clip

_VERSION = "1"  # bump when the layout of a cache entry changes
# Bump when the frames read from a video change (2: rotation side data applied, variable frame rates
# sampled by timestamp): latents made under the old rules are encoded again; T5 states stay.
_DECODING = "2"


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def module_fingerprint(module: torch.nn.Module, extra: str = "") -> str:
    """A hash of every tensor of a module (names, shapes, dtypes and bytes) and `extra` (its config)."""
    h = hashlib.sha256(extra.encode())
    for name, tensor in module.state_dict().items():
        t = tensor.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _rate(fps: float | None) -> str:
    """The frame rate's part of a latents key: `--fps 8` (a float) and a file's or the model's 8 are the
    same rate, and name the same entries."""
    return str(int(fps)) if fps is not None and float(fps).is_integer() else str(fps)


def _key(*parts: str) -> str:
    return hashlib.sha256("\n".join((_VERSION, *parts)).encode()).hexdigest()[:40]


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique temporary name each: several ranks may write the same entry.
    state = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    write_into_place(path, lambda temporary: save_file(state, temporary, metadata=metadata))


def _intact(path: Path) -> bool:
    """Whether a cache entry exists and is whole: a readable safetensors header whose tensors end where
    the file does. An entry cut short (a full disk, a killed copy) or overwritten is encoded again."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)) if 2 <= size <= 100_000_000 else None
            end = f.seek(0, os.SEEK_END)
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        return 8 + size + max(ends, default=0) == end
    except (OSError, ValueError, TypeError, AttributeError, KeyError, IndexError, RecursionError):
        return False


@dataclass(frozen=True)
class Example:
    """One cached training example."""

    name: str
    caption: str
    bucket: Bucket
    latents: Path  # safetensors with "mean" and "logvar", [F, C, h, w] (and "mask", [F, 1, h, w])
    text: Path  # safetensors with "states", [L, D]
    masked: bool = False  # the latents file holds the clip's mask


@dataclass
class Prepared:
    examples: list[Example]
    skipped: list[Skipped]
    empty_text: Path  # T5 states of "" (caption dropout)
    encoded: int  # clips encoded in this call (not found in the cache)


def read_latents(example: Example) -> tuple[torch.Tensor, torch.Tensor]:
    with safe_open(example.latents, framework="pt") as f:
        return f.get_tensor("mean"), f.get_tensor("logvar")


def read_mask(example: Example) -> torch.Tensor:
    """The example's mask on the latent grid, [F, 1, h, w] in [0, 1]."""
    with safe_open(example.latents, framework="pt") as f:
        return f.get_tensor("mask")


def latent_mask(mask: torch.Tensor, temporal: int, spatial: int) -> torch.Tensor:
    """A pixel mask [F, H, W] in [0, 1] -> [F', 1, H / spatial, W / spatial] on the latent grid.

    The VAE is causal in time: latent frame 0 covers pixel frame 0 alone, and each later one the next
    `temporal` pixel frames; a latent cell covers `spatial` x `spatial` pixels. A cell takes the largest
    value among the pixels it covers, so an object a few pixels across still counts in full.
    """
    first = mask[:1]
    rest = mask[1:]
    if len(rest):
        rest = F.max_pool3d(rest[None, None], (temporal, 1, 1), ceil_mode=True)[0, 0]
    frames = torch.cat([first, rest])  # [F', H, W]
    return F.max_pool2d(frames[:, None], spatial, ceil_mode=True)


def read_text(path: Path) -> torch.Tensor:
    with safe_open(path, framework="pt") as f:
        return f.get_tensor("states")


@torch.no_grad()
def precompute(
    clips: list[Clip],
    buckets: list[Bucket],
    fps: float | None,
    vae,
    text_encoder,
    cache_dir: str | Path,
    max_sequence_length: int,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> Prepared:
    """Encode what the cache lacks and return every usable example.

    With several processes (torchrun), rank r encodes clips r, r + world_size, ... and the caller
    synchronises before calling again to collect all of them (the second call finds everything cached).
    Clips that cannot be decoded or are too short are returned in `skipped`, never raised.
    """
    cache_dir = Path(cache_dir)
    vae_id = module_fingerprint(vae, json.dumps(vae.config.to_dict(), sort_keys=True, default=str))
    t5_id = module_fingerprint(text_encoder.model, str(max_sequence_length))
    bucket_id = ",".join(sorted(str(b) for b in buckets))
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    examples, skipped = [], []

    def text_file(caption: str) -> Path:
        path = cache_dir / "text" / f"{_key(caption, t5_id)}.safetensors"
        if not _intact(path):
            states = text_encoder.encode([caption], max_sequence_length, device=device)[0].float()
            _atomic_save({"states": states}, path, {"caption": caption})
        return path

    encoded = 0
    bar = tqdm(clips, desc="encode videos", disable=not progress, unit="video")
    for i, clip in enumerate(bar):
        try:
            digest = file_digest(clip.video)
        except OSError as e:
            skipped.append(Skipped(clip.name, f"cannot read ({e.strerror or e})"))
            continue
        parts = [digest, bucket_id, _rate(fps), vae_id, "decoding " + _DECODING]
        if clip.mask is not None:  # only then: entries of clips without a mask keep their names
            try:
                parts.append("mask " + file_digest(clip.mask))
            except OSError as e:
                skipped.append(Skipped(clip.name, f"cannot read mask {clip.mask.name} ({e.strerror or e})"))
                continue
        path = cache_dir / "latents" / f"{_key(*parts)}.safetensors"
        if not _intact(path):
            if i % world_size != rank:
                continue
            try:
                video, mask, bucket = load_masked_clip(clip, buckets, fps)
            except ClipError as e:
                skipped.append(Skipped(clip.name, str(e)))
                continue
            posterior = vae.encode(video[None].to(device, dtype))  # [1, C, F, h, w]
            mean = posterior.mean[0].permute(1, 0, 2, 3).float()  # [F, C, h, w]
            logvar = posterior.logvar[0].permute(1, 0, 2, 3).float()
            tensors = {"mean": mean, "logvar": logvar}
            if mask is not None:
                tensors["mask"] = latent_mask(mask, vae.config.temporal_compression, vae.config.spatial_compression)
                expected = (mean.shape[0], 1, *mean.shape[2:])
                if tuple(tensors["mask"].shape) != expected:  # the config disagrees with what the VAE did
                    raise RuntimeError(f"mask reduced to {tuple(tensors['mask'].shape)}, latents need {expected}")
            meta = {"bucket": str(bucket), "video": clip.name}
            _atomic_save(tensors, path, meta)
            encoded += 1
        with safe_open(path, framework="pt") as f:
            bucket = Bucket.parse(f.metadata()["bucket"])
        if i % world_size == rank or world_size == 1:
            text_file(clip.caption)
        text = cache_dir / "text" / f"{_key(clip.caption, t5_id)}.safetensors"
        examples.append(Example(clip.name, clip.caption, bucket, path, text, masked=clip.mask is not None))
    empty = text_file("") if rank == 0 else cache_dir / "text" / f"{_key('', t5_id)}.safetensors"
    return Prepared(examples, skipped, empty, encoded)


def unused_entries(cache_dir: str | Path, prepared: Prepared) -> list[Path]:
    """The files of the cache that `prepared` does not read: entries of clips, captions, buckets or models
    no longer in use, and temporary files left by a process killed while writing."""
    used = {e.latents for e in prepared.examples} | {e.text for e in prepared.examples} | {prepared.empty_text}
    used = {p.resolve() for p in used}
    files = [p for kind in ("latents", "text") for p in sorted((Path(cache_dir) / kind).glob("*"))]
    return [p for p in files if p.is_file() and p.resolve() not in used]


def remove_files(paths: list[Path]) -> int:
    """Delete `paths` (those already gone are skipped); the bytes freed."""
    freed = 0
    for path in paths:
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        freed += size
    return freed


class CachedDataset:
    """The examples grouped by bucket, and batches drawn from one bucket at a time."""

    def __init__(self, prepared: Prepared) -> None:
        self.examples = prepared.examples
        self.empty_text = read_text(prepared.empty_text)
        self.by_bucket: dict[Bucket, list[int]] = {}
        for i, example in enumerate(self.examples):
            self.by_bucket.setdefault(example.bucket, []).append(i)
        self._text: dict[Path, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def draw(self, batch_size: int, generator: torch.Generator) -> list[int]:
        """`batch_size` example indices of one bucket: the first uniform over all examples (so buckets
        are drawn in proportion to their size), the others without replacement from its bucket (with
        replacement when the bucket is smaller than the batch)."""
        first = int(torch.randint(len(self.examples), (1,), generator=generator))
        members = self.by_bucket[self.examples[first].bucket]
        others = [m for m in members if m != first]
        if batch_size == 1:
            return [first]
        if len(others) >= batch_size - 1:
            picks = torch.randperm(len(others), generator=generator)[: batch_size - 1].tolist()
        else:
            picks = torch.randint(len(members), (batch_size - 1,), generator=generator).tolist()
            others = members
        return [first] + [others[p] for p in picks]

    def text(self, index: int) -> torch.Tensor:
        path = self.examples[index].text
        if path not in self._text:  # a few kB per caption; kept in memory
            self._text[path] = read_text(path)
        return self._text[path]

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean [B, F, C, h, w], logvar [B, F, C, h, w], text [B, L, D]), fp32 on the CPU."""
        means, logvars = zip(*(read_latents(self.examples[i]) for i in indices))
        return torch.stack(means), torch.stack(logvars), torch.stack([self.text(i) for i in indices])

    @property
    def has_masks(self) -> bool:
        return any(e.masked for e in self.examples)

    def masks(self, indices: list[int]) -> torch.Tensor | None:
        """The batch's masks on the latent grid, [B, F, 1, h, w] in [0, 1] (zeros for a clip without a
        mask); None when no clip of the batch has one."""
        if not any(self.examples[i].masked for i in indices):
            return None
        out = []
        for i in indices:
            if self.examples[i].masked:
                out.append(read_mask(self.examples[i]))
            else:
                with safe_open(self.examples[i].latents, framework="pt") as f:
                    frames, _, h, w = f.get_slice("mean").get_shape()
                out.append(torch.zeros(frames, 1, h, w))
        return torch.stack(out)
