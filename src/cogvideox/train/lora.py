"""LoRA (arXiv 2106.09685) on the transformer's linear layers, applied from outside the model.

`inject_lora` swaps each targeted `nn.Linear` for a `LoRALinear` that keeps the same weight and bias
tensors (so the base keys `...attn1.to_q.weight` are unchanged) and adds, per named adapter, a low-rank
update `scale * B(A(x))` with `scale = alpha / rank * user_scale`. Several adapters can be active at
once, each with its own scale; `fuse` folds them into the base weight and `unfuse` takes them out again.

Files are in the diffusers layout that `CogVideoXPipeline.load_lora_weights` reads:
`pytorch_lora_weights.safetensors` with keys `transformer.<module>.lora_A.weight` / `lora_B.weight`
(peft naming) and the adapter's rank, alpha and targets as JSON in the safetensors metadata under
`lora_adapter_metadata` (keys `transformer.r`, `transformer.lora_alpha`, ...). A file without that
metadata means alpha = rank (scale 1), as diffusers reads it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from cogvideox.errors import InputError
from cogvideox.files import parse_json, write_into_place
from cogvideox.values import is_finite_number

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DEFAULT_ADAPTER = "default"
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key in the safetensors header
_PREFIX = "transformer."


class LoRALinear(nn.Linear):
    """A linear layer plus named low-rank adapters.

    It shares (not copies) the wrapped layer's `weight` and `bias`, so the model's state-dict keys for
    the base weights do not change. Adapter weights live in `lora_A[name]` [rank, in] and
    `lora_B[name]` [out, rank]; B starts at zero, so a fresh adapter leaves the output unchanged.
    The adapters are left out of `state_dict()` and not expected by `load_state_dict()`, so the model's
    state dict stays the official checkpoint layout (a fused model saves as a plain one); they are saved
    with `save_lora` and reached through `named_parameters()`.
    """

    def __init__(self, base: nn.Linear) -> None:
        nn.Module.__init__(self)  # nn.Linear.__init__ would allocate a new weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.scaling: dict[str, float] = {}  # alpha / rank per adapter
        self.user_scale: dict[str, float] = {}
        self.fused: dict[str, None] = {}  # the fused adapters, in the order they were fused
        # with keep_original: a CPU copy of the weight before the first of them was fused, and the adapters
        # already fused into that copy (those fused without keep_original before it)
        self.original: tuple[torch.Tensor, frozenset[str]] | None = None
        self.disabled: set[str] = set()
        self.register_state_dict_post_hook(_drop_adapter_keys)
        self.register_load_state_dict_post_hook(_allow_missing_adapters)

    def add_adapter(
        self,
        name: str,
        rank: int,
        alpha: float,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """A new adapter: A initialised as nn.Linear (Kaiming-uniform, a = sqrt 5, as peft does), B zero."""
        if name in self.lora_A:
            raise InputError(f"this layer already has a LoRA adapter named {name!r}")
        dtype = dtype or self.weight.dtype
        device = self.weight.device
        a = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        b = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on [rank, in]
            values = torch.rand(a.weight.shape, generator=generator, dtype=torch.float32) * 2 - 1
            a.weight.copy_(values * bound)
            b.weight.zero_()
        self.lora_A[name], self.lora_B[name] = a, b
        self.scaling[name] = alpha / rank
        self.user_scale[name] = 1.0

    def scale(self, name: str) -> float:
        return self.scaling[name] * self.user_scale[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """scale * B @ A, [out, in], computed in fp32."""
        a = self.lora_A[name].weight.float()
        b = self.lora_B[name].weight.float()
        return self.scale(name) * (b @ a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(x, self.weight, self.bias)
        for name in self.lora_A:
            if name in self.fused or name in self.disabled:
                continue
            a, b = self.lora_A[name], self.lora_B[name]
            h = x.to(a.weight.dtype) if not torch.is_autocast_enabled() else x
            out = out + (b(a(h)) * self.scale(name)).to(out.dtype)
        return out

    @torch.no_grad()
    def fuse(self, name: str, keep_original: bool = False) -> None:
        if name in self.fused:
            return
        if keep_original and self.original is None:  # one copy serves every adapter fused after it
            self.original = self.weight.detach().to("cpu", copy=True), frozenset(self.fused)
        self._add(name)
        self.fused[name] = None

    def _add(self, name: str) -> None:
        self.weight.copy_((self.weight.float() + self.delta_weight(name).to(self.weight.device)).to(self.weight.dtype))

    @torch.no_grad()
    def unfuse(self, name: str) -> None:
        """Take adapter `name` out of the weight. Where the kept copy does not hold it, the weight is that copy
        with the adapters still fused added again in their order: bit for bit what fusing only them gives.
        Otherwise the update is subtracted (equal up to rounding) and the copy, which holds it, is dropped."""
        if name not in self.fused:
            return
        del self.fused[name]
        if self.original is not None and name not in self.original[1]:
            copy, inside = self.original
            self.weight.copy_(copy.to(self.weight.device))
            for other in self.fused:
                if other not in inside:
                    self._add(other)
            if set(self.fused) == inside:  # the weight is the copy again: no longer needed
                self.original = None
        else:
            self.original = None
            delta = self.delta_weight(name).to(self.weight.device)
            self.weight.copy_((self.weight.float() - delta).to(self.weight.dtype))

    def remove_adapter(self, name: str) -> None:
        self.unfuse(name)
        del self.lora_A[name], self.lora_B[name]
        self.scaling.pop(name), self.user_scale.pop(name)
        self.disabled.discard(name)

    def as_linear(self) -> nn.Linear:
        """A plain nn.Linear sharing this layer's weight and bias (adapters dropped)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear


def _drop_adapter_keys(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "lora_")]:
        del state_dict[key]


def _allow_missing_adapters(module, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if ".lora_A." not in k and ".lora_B." not in k]


# ----------------------------------------------------------------------------------------------------
# Finding, adding and removing adapters


def _matches(name: str, target: str) -> bool:
    """Whether a layer's `name` ends with `target`, matched on whole name parts ("attn1.to_q" is "to_q")."""
    return name == target or name.endswith("." + target)


def _target_names(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Names of the linear layers whose name ends with one of `targets` (matched on whole name parts)."""
    targets = tuple(targets)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or ".lora_" in name:
            continue
        if any(_matches(name, t) for t in targets):
            names.append(name)
    return names


def check_targets(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """The names of the linear layers `targets` adapt; `InputError` naming each target that matches none (a
    typo would otherwise leave that layer unadapted without a word), with the names a target can take."""
    targets = tuple(targets)
    names = _target_names(model, targets)
    unmatched = [t for t in targets if not any(_matches(n, t) for n in names)]
    if unmatched:
        first = next((b for n, b in model.named_children() if isinstance(b, nn.ModuleList) and len(b)), None)
        linears = [] if first is None else [n for n, m in first[0].named_modules() if isinstance(m, nn.Linear)]
        names_there = f"; a block's linear layers are {', '.join(linears)}" if linears else ""
        raise InputError(f"no linear layer matches the LoRA target(s) {', '.join(map(repr, unmatched))}{names_there}")
    return names


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and child.isdigit():
        parent[int(child)] = module
    else:
        setattr(parent, child, module)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        names.update(dict.fromkeys(layer.lora_A))
    return list(names)


def running_adapters(model: nn.Module) -> list[str]:
    """The adapters that run (loaded, not left out by `activate_lora`) or are fused: what the model computes."""
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        names.update(dict.fromkeys(n for n in layer.lora_A if n not in layer.disabled or n in layer.fused))
    return list(names)


def _wrap(model: nn.Module, name: str) -> LoRALinear:
    module = model.get_submodule(name)
    if isinstance(module, LoRALinear):
        return module
    if not isinstance(module, nn.Linear):
        raise InputError(f"LoRA can only adapt linear layers; {name} is a {type(module).__name__}")
    layer = LoRALinear(module)
    _set_module(model, name, layer)
    return layer


def inject_lora(
    model: nn.Module,
    rank: int,
    alpha: float | None = None,
    targets: Iterable[str] = DEFAULT_TARGETS,
    name: str = DEFAULT_ADAPTER,
    dtype: torch.dtype | None = torch.float32,
    seed: int = 0,
) -> list[str]:
    """Add a trainable adapter `name` of `rank` to every linear layer matching `targets` and freeze
    everything else. `alpha` defaults to `rank` (scale 1). Returns the adapted layer names.

    The adapter weights are fp32 by default whatever the model dtype: the base stays frozen in bf16 while
    the optimizer updates fp32 LoRA weights (autocast runs the matmuls in bf16 on GPU).
    """
    if not isinstance(rank, int) or rank < 1:
        raise InputError(f"LoRA rank must be a positive integer, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    if not alpha > 0:
        raise InputError(f"LoRA alpha must be positive, got {alpha}")
    names = check_targets(model, targets)
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for module_name in names:
        layer = _wrap(model, module_name)
        layer.add_adapter(name, rank, alpha, dtype, generator)
    for layer in lora_layers(model).values():
        if name in layer.lora_A:
            layer.lora_A[name].weight.requires_grad_(True)
            layer.lora_B[name].weight.requires_grad_(True)
    return names


def check_scale(scale) -> float:
    """A LoRA scale as a float, or `InputError` for anything but a finite real number."""
    if not is_finite_number(scale):
        raise InputError(f"a LoRA scale must be a finite number, got {scale!r}")
    return float(scale)


def _named(model: nn.Module, names: str | Iterable[str] | None, what: str) -> list[str] | None:
    """`names` as a list of loaded adapters (None stays None: every adapter); `InputError` for a name
    that is not loaded, naming those that are."""
    if names is None:
        return None
    names = [names] if isinstance(names, str) else list(names) if isinstance(names, Iterable) else [names]
    if not all(isinstance(n, str) for n in names):
        bad = next(n for n in names if not isinstance(n, str))
        raise InputError(f"LoRA names are strings, got {type(bad).__name__} {bad!r}")
    loaded = adapter_names(model)
    unknown = [n for n in names if n not in loaded]
    if unknown:
        have = ", ".join(repr(n) for n in loaded) if loaded else "none"
        raise InputError(f"cannot {what} LoRA {unknown[0]!r}: it is not loaded (loaded: {have})")
    return names


def set_lora_scale(model: nn.Module, scale: float, name: str | None = None) -> None:
    """Multiply adapter `name` (all adapters for None) by `scale` on top of its alpha / rank. A fused
    adapter must be unfused first: its weights are already in the base."""
    scale = check_scale(scale)
    names = _named(model, name, "rescale")
    if names is None and not adapter_names(model):
        raise InputError("no LoRA is loaded, so there is no scale to set")
    for layer in lora_layers(model).values():
        for adapter in names if names is not None else list(layer.lora_A):
            if adapter not in layer.lora_A:
                continue
            if adapter in layer.fused:
                raise InputError(f"LoRA {adapter!r} is fused; unfuse it before changing its scale")
            layer.user_scale[adapter] = scale


def activate_lora(model: nn.Module, scales: Mapping[str, float]) -> None:
    """Run only the adapters named in `scales`, each at its scale (on top of its alpha / rank); the other
    loaded adapters stay loaded but are skipped, at no cost per step. An empty mapping runs the base model.
    Fused adapters are in the base weights and cannot be chosen this way: unfuse them first."""
    _named(model, list(scales), "activate")
    checked = {name: check_scale(scale) for name, scale in scales.items()}
    layers = lora_layers(model).values()
    fused = [name for layer in layers for name in layer.fused]
    if fused:
        raise InputError(f"LoRA {fused[0]!r} is fused into the weights; unfuse it before choosing the LoRAs that run")
    for layer in layers:
        for name in layer.lora_A:
            if name in checked:
                layer.user_scale[name] = checked[name]
                layer.disabled.discard(name)
            else:
                layer.disabled.add(name)


def fuse_lora(model: nn.Module, names: str | Iterable[str] | None = None, keep_original: bool = False) -> None:
    """Fold adapters `names` (None: those that run, as `activate_lora` left them) into the base weights (no
    extra work per step). `keep_original` keeps a CPU copy of each weight as it was before (one per layer,
    taken at the first such fuse) so that `unfuse_lora` of any of the LoRAs fused since then rebuilds the
    weight from it, bit for bit what fusing only the others gives, instead of subtracting the update."""
    names = _named(model, names, "fuse")
    if names is None and not adapter_names(model):
        raise InputError("no LoRA is loaded, so there is none to fuse")
    for layer in lora_layers(model).values():
        running = [name for name in layer.lora_A if name not in layer.disabled]
        for name in names if names is not None else running:
            if name in layer.lora_A:
                layer.fuse(name, keep_original=keep_original)


def unfuse_lora(model: nn.Module, names: str | Iterable[str] | None = None) -> None:
    names = _named(model, names, "unfuse")
    for layer in lora_layers(model).values():
        for name in reversed(names if names is not None else list(layer.fused)):
            layer.unfuse(name)


def remove_lora(model: nn.Module, name: str | None = None) -> None:
    """Drop adapter `name` (every adapter for None); a layer left without adapters is a plain Linear again."""
    _named(model, name, "unload")
    for layer_name, layer in lora_layers(model).items():
        for adapter in [name] if name is not None else list(layer.lora_A):
            if adapter in layer.lora_A:
                layer.remove_adapter(adapter)
        if not layer.lora_A:
            _set_module(model, layer_name, layer.as_linear())


def fold_lora(model: nn.Module) -> None:
    """Fold every adapter that runs (all but those `activate_lora` left out) into the base weights for
    good and put plain `nn.Linear` layers back: what rewriting the linear layers (fused QKV,
    quantisation) needs. The adapters cannot be unfused or rescaled afterwards."""
    for layer_name, layer in lora_layers(model).items():
        for adapter in list(layer.lora_A):
            if adapter not in layer.disabled:
                layer.fuse(adapter)
        _set_module(model, layer_name, layer.as_linear())


# ----------------------------------------------------------------------------------------------------
# The diffusers file format


def lora_state_dict(model: nn.Module, name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """Adapter `name` as `{"transformer.<module>.lora_A.weight": ..., "...lora_B.weight": ...}`."""
    state = {}
    for layer_name, layer in lora_layers(model).items():
        if name in layer.lora_A:
            state[f"{_PREFIX}{layer_name}.lora_A.weight"] = layer.lora_A[name].weight.detach()
            state[f"{_PREFIX}{layer_name}.lora_B.weight"] = layer.lora_B[name].weight.detach()
    if not state:
        raise InputError(f"the model has no LoRA adapter named {name!r}")
    return state


def save_lora(
    model: nn.Module,
    path: str | Path,
    name: str = DEFAULT_ADAPTER,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write adapter `name` in the diffusers layout. `path` is a folder (the file is
    `pytorch_lora_weights.safetensors` inside it) or a `.safetensors` file name."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / LORA_WEIGHTS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.to("cpu", dtype or v.dtype).contiguous().clone() for k, v in lora_state_dict(model, name).items()
    }
    layers = [layer for layer in lora_layers(model).values() if name in layer.lora_A]
    ranks = {layer.lora_A[name].weight.shape[0] for layer in layers}
    alphas = {round(layer.scaling[name] * layer.lora_A[name].weight.shape[0], 6) for layer in layers}
    if len(ranks) != 1 or len(alphas) != 1:
        raise InputError("saving an adapter whose rank or alpha differs between layers is not supported")
    targets = sorted({_short_name(n) for n, layer in lora_layers(model).items() if name in layer.lora_A})
    metadata = {
        f"{_PREFIX}r": ranks.pop(),
        f"{_PREFIX}lora_alpha": alphas.pop(),
        f"{_PREFIX}target_modules": targets,
        f"{_PREFIX}lora_dropout": 0.0,
        f"{_PREFIX}bias": "none",
    }
    header = {"format": "pt", _METADATA_KEY: json.dumps(metadata, sort_keys=True)}
    return write_into_place(path, lambda temporary: save_file(state, temporary, metadata=header))


def _short_name(module: str) -> str:
    """`transformer_blocks.3.attn1.to_out.0` -> `to_out.0`, `...attn1.to_q` -> `to_q` (peft's targets)."""
    parts = module.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def _lora_file(path: str | Path) -> Path:
    if not isinstance(path, str | os.PathLike):
        raise InputError(f"a LoRA is a file or folder path, got {type(path).__name__}")
    path = Path(path).expanduser()  # "~/loras/style" from Python: no shell has expanded it
    if path.is_dir():
        files = [path / LORA_WEIGHTS_NAME] if (path / LORA_WEIGHTS_NAME).is_file() else sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise InputError(
                f"{path} holds {len(files)} .safetensors files; name the LoRA file itself"
                if files else _no_lora_in(path)
            )
        return files[0]
    if not path.is_file():
        raise InputError(f"no LoRA file at {path}")
    if path.suffix in _PICKLED:
        raise InputError(_pickled_lora(path))
    return path


# Suffixes of pickled (torch.save) weight files: older diffusers and peft wrote LoRAs as
# `pytorch_lora_weights.bin`. Unpickling can run code, so they are refused, with the conversion to do.
_PICKLED = (".bin", ".pt", ".pth", ".ckpt")


def _pickled_lora(file: Path) -> str:
    target = file.with_suffix(".safetensors")
    return (
        f"{file} is a pickled (torch.save) LoRA file; cogvideox reads only safetensors LoRA files. Convert it "
        f"once, if you trust its source: python -c \"import torch; from safetensors.torch import save_file; "
        f"save_file(torch.load('{file}', weights_only=True), '{target}')\""
    )


def _no_lora_in(folder: Path) -> str:
    """Why a folder holds no LoRA file, for the run folders of `cogvideox train` that have none: a full
    fine-tune's (its result is a model folder) and one whose run has not finished."""
    if (folder / "model_index.json").is_file():
        return f"{folder} is a model folder, not a LoRA: give it as the model (--model {folder})"
    if (folder / "model" / "model_index.json").is_file():
        return f"{folder} holds a fully fine-tuned model, not a LoRA: give it as the model (--model {folder / 'model'})"
    if (folder / "checkpoints").is_dir():
        return (f"no LoRA weights ({LORA_WEIGHTS_NAME}) in {folder} yet: its training run writes them when it ends; "
                "run the same command again to finish it")  # fmt: skip
    pickled = sorted(p for p in folder.iterdir() if p.suffix in _PICKLED and p.is_file())
    if pickled:  # diffusers' own name first, as it reads that one
        return _pickled_lora(min(pickled, key=lambda p: p.name != "pytorch_lora_weights.bin"))
    return f"no LoRA weights ({LORA_WEIGHTS_NAME}) in {folder}"


_KEY = re.compile(r"^(?:transformer\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora\.down|lora\.up)(?:\.[^.]+)?\.weight$")


def _once(file: Path, spelled: dict, what: tuple[str, str], key: str) -> None:
    """`InputError` for a second key naming the same LoRA weight: with and without the `transformer.`
    prefix, or as both `lora_A` and `lora.down`. Neither is the one meant; the later one silently won."""
    if what in spelled:
        raise InputError(f"{file}: {spelled[what]} and {key} are the same LoRA weight; keep one")
    spelled[what] = key


def read_lora(path: str | Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
    """A diffusers-format LoRA file -> ({module: (A [r, in], B [out, r])}, {module: alpha}).

    Accepts keys with or without the `transformer.` prefix, peft's `lora_A`/`lora_B` (optionally with an
    adapter name before `.weight`) and the older `lora.down`/`lora.up`; alpha comes from the metadata,
    per-module `.alpha` tensors, or defaults to the rank.
    """
    file = _lora_file(path)
    try:
        with safe_open(file, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise InputError(f"cannot read {file} as a safetensors LoRA file ({' '.join(str(e).split())})") from None
    try:
        meta = parse_json(header[_METADATA_KEY]) if header.get(_METADATA_KEY) else {}
    except ValueError as e:  # also an integer of 5000 digits, "[[[[..." nested past the stack
        raise InputError(f"{file}: its {_METADATA_KEY} metadata is {e}") from None
    if not isinstance(meta, dict):
        raise InputError(f"{file}: its {_METADATA_KEY} metadata is not a JSON object")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    spelled: dict[str, str] = {}  # the key each (module, kind) or alpha came from
    for key, tensor in tensors.items():
        if key.endswith(".alpha"):
            module = key[: -len(".alpha")].removeprefix(_PREFIX)
            _once(file, spelled, ("alpha", module), key)
            if tensor.numel() != 1 or tensor.dtype == torch.bool or tensor.is_complex():
                raise InputError(f"{file}: {key} must hold one real number, got {tensor.dtype} {list(tensor.shape)}")
            alphas[module] = float(tensor)
            continue
        if not key.startswith(_PREFIX) and "." in key and key.split(".", 1)[0] in ("text_encoder", "unet"):
            raise InputError(f"{file}: {key} belongs to a {key.split('.', 1)[0]}; CogVideoX LoRAs adapt the transformer only")
        match = _KEY.match(key)
        if match is None:
            raise InputError(f"{file}: {key} is not a LoRA weight (expected ...lora_A.weight / lora_B.weight)")
        kind = "A" if match["kind"] in ("lora_A", "lora.down") else "B"
        _once(file, spelled, (kind, match["module"]), key)
        if not tensor.is_floating_point():  # integer, bool or complex weights would be cast without a word
            raise InputError(f"{file}: {key} holds {tensor.dtype} values; LoRA weights are floating-point")
        pairs.setdefault(match["module"], {})[kind] = tensor
    if not pairs:
        raise InputError(f"{file} holds no LoRA weights")
    default_alpha = meta.get(f"{_PREFIX}lora_alpha", meta.get("lora_alpha"))
    out, module_alpha = {}, {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            half = "lora_A" if "A" in pair else "lora_B"
            raise InputError(f"{file}: {module} has {half} but not its partner")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise InputError(f"{file}: {module} has LoRA shapes {list(a.shape)} and {list(b.shape)} that do not chain")
        if a.shape[0] == 0:
            raise InputError(f"{file}: the LoRA of {module} has rank 0 (no weights); it must be at least 1")
        if not all(bool(torch.isfinite(t.float()).all()) for t in (a, b)):
            raise InputError(f"{file}: the LoRA weights of {module} hold NaN or infinite values (from a training "
                             "run that diverged?)")
        out[module] = (a, b)
        alpha = alphas.get(module, default_alpha if default_alpha is not None else a.shape[0])
        if not is_finite_number(alpha) or alpha <= 0:
            raise InputError(f"{file}: the LoRA alpha of {module} is {alpha!r}; it must be a positive number")
        module_alpha[module] = float(alpha)
    return out, module_alpha


def load_lora(
    model: nn.Module,
    path: str | Path,
    scale: float = 1.0,
    name: str | None = None,
    dtype: torch.dtype | None = None,
) -> str:
    """Add the adapter of a diffusers-format LoRA file to `model` as `name` (default: the name of the
    folder given, or the stem of the file given, made unique; a file with the standard name
    `pytorch_lora_weights.safetensors` is named after its folder, as when the folder is given) at
    `scale`. Returns the adapter name. The base weights are left as they are."""
    if name is not None and (not isinstance(name, str) or not name or "." in name):
        # The adapters live in torch ModuleDicts, whose keys cannot hold a dot: found half-way, too late.
        raise InputError(f"a LoRA name must be a non-empty string without dots, got {name!r}")
    weights, alphas = read_lora(path)
    existing = set(adapter_names(model))
    if name is None:
        given = Path(path).expanduser()
        if given.is_file() and given.name == LORA_WEIGHTS_NAME:  # every run's file is called that: its folder
            given = given.absolute().parent
        stem = re.sub(r"\W+", "_", given.stem if given.is_file() else given.name) or "lora"
        name, i = stem, 1
        while name in existing:
            i += 1
            name = f"{stem}_{i}"
    elif name in existing:
        raise InputError(f"a LoRA named {name!r} is already loaded; pass another name")
    scale = check_scale(scale)
    modules = dict(model.named_modules())
    missing = [m for m in weights if not isinstance(modules.get(m), nn.Linear)]
    if missing:
        raise InputError(
            f"{path}: {len(missing)} LoRA module(s) are not linear layers of this model, e.g. {missing[0]} "
            "(a LoRA for another model?)"
        )
    # Every layer is checked before any is touched: a file that fails leaves the model as it was.
    for module, (a, b) in weights.items():
        layer = modules[module]
        if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
            raise InputError(
                f"{path}: the LoRA for {module} is {b.shape[0]}x{a.shape[1]} but the layer is "
                f"{layer.out_features}x{layer.in_features} (a LoRA for another model size?)"
            )
    for module, (a, b) in weights.items():
        layer = _wrap(model, module)
        target_dtype = dtype or layer.weight.dtype
        layer.add_adapter(name, a.shape[0], alphas[module], target_dtype)
        with torch.no_grad():
            layer.lora_A[name].weight.copy_(a)
            layer.lora_B[name].weight.copy_(b)
        layer.lora_A[name].weight.requires_grad_(False)
        layer.lora_B[name].weight.requires_grad_(False)
        layer.user_scale[name] = scale
    return name
