"""Finding, checking and loading CogVideoX checkpoints in the official diffusers layout.

A model folder holds `model_index.json` and one sub-folder per component:

    transformer/   config.json + diffusion_pytorch_model.safetensors (or shards + *.safetensors.index.json)
    vae/           config.json + diffusion_pytorch_model.safetensors
    text_encoder/  config.json + model.safetensors (transformers' T5EncoderModel)
    tokenizer/     the T5 sentencepiece tokenizer files
    scheduler/     scheduler_config.json

Pickled `.bin` weights are not read. The weights of a `variant` (`diffusion_pytorch_model.fp16.safetensors`,
`model.fp16-00001-of-00002.safetensors` with `model.safetensors.index.fp16.json`, or the legacy shards
`model-00001-of-00002.fp16.safetensors` with `model.safetensors.fp16.index.json`) are read when that
variant is asked for: as diffusers does, each component loads its variant's files where it has them and
its plain files where it has not, and a variant no component has is an error naming those there are.

Every network, T5 included, is built on the meta device from its component's `config.json` and receives
its tensors by assignment (`weights.load_weights`), so host memory never holds a second copy of the
weights, and loading is strict: a missing, unexpected or mis-shaped tensor is an error that names it.

The dtype and device policy of the package lives here too (`choose_device`, `choose_dtype`).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cogvideox.errors import InputError, LoadError
from cogvideox.files import read_json
from cogvideox.models.config import ConfigError, SchedulerConfig, TransformerConfig, VAEConfig
from cogvideox.models.transformer import CogVideoXTransformer
from cogvideox.models.vae import CogVideoXVAE
from cogvideox.schedulers import make_scheduler
from cogvideox.text import TextEncoder
from cogvideox.weights import (
    DIFFUSERS_WEIGHTS,
    bin_variant,
    has_variant,
    load_weights,
    named_variants,
    shard_names,
    unread_bin,
    unread_weights,
    variant_file_names,
    variant_index,
    variants,
    weight_files,
)

MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
TOKENIZER_VOCABULARY = ("spiece.model", "tokenizer.json")  # the sentencepiece model, or its fast form
SAMPLING_DEFAULTS = "sampling.json"  # ours, optional: the model's recommended guidance settings

# What a hub download fetches: configs, safetensors weights and the tokenizer; never .bin duplicates.
# The components with weights; a command that runs only some of them (`cogvideox decode`: the VAE) reads,
# checks and downloads only theirs, besides every config.
WEIGHTED = ("transformer", "vae", "text_encoder")
_CONFIG_PATTERNS = [MODEL_INDEX, SAMPLING_DEFAULTS, "*/config.json", "scheduler/*.json", "text_encoder/*.json",
                    "tokenizer/*"]  # fmt: skip


STEMS = {"transformer": DIFFUSERS_WEIGHTS, "vae": DIFFUSERS_WEIGHTS, "text_encoder": "model"}  # weight file stems


def hub_patterns(
    components: Sequence[str] = WEIGHTED, variant: str | None = None, repo_files: Sequence[str] | None = None
) -> list[str]:
    """The files of a hub repo a run of `components` needs: every config, and those components' weights.

    With a `variant`, a component's weights are its variant's files where the repo has them, else its
    plain ones. Without the repo's file list (`repo_files`) both are fetched, as either may be the one.
    """
    if variant is None:
        weights = [f"{c}/*.safetensors" for c in components] + [f"{c}/*.safetensors.index.json" for c in components]
        return _CONFIG_PATTERNS + weights
    weights = []
    for c in components:
        stem = STEMS[c]
        own = [f"{c}/{stem}.{variant}.safetensors", f"{c}/{stem}.{variant}-*-of-*.safetensors",
               f"{c}/{stem}.safetensors.index.{variant}.json",
               # the legacy names older diffusers wrote, which diffusers still reads (weights.variant_of)
               f"{c}/{stem}-*-of-*.{variant}.safetensors", f"{c}/{stem}.safetensors.{variant}.index.json"]  # fmt: skip
        plain = [f"{c}/{stem}.safetensors", f"{c}/{stem}-*-of-*.safetensors", f"{c}/{stem}.safetensors.index.json"]
        if repo_files is None:
            weights += own + plain
        else:
            has_it = variant_file_names((f for f in repo_files if f.startswith(f"{c}/")), stem, variant)
            weights += own if has_it else plain
    return _CONFIG_PATTERNS + weights


def check_variant(variant: str | None) -> str | None:
    """`variant` as a file name part ("fp16", "ema"), or None; anything else is an `InputError`."""
    if variant is None:
        return None
    if not isinstance(variant, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", variant):
        raise InputError(f"a variant is a name like fp16 or ema (letters, digits, - and _), got {variant!r}")
    return variant


def folder_variants(folder: Path) -> list[str]:
    """The variants whose weights a model folder holds, in any of its components."""
    found = set()
    for component, stem in STEMS.items():
        if (folder / component).is_dir():
            found |= variants(folder / component, stem)
    return sorted(found)


def _unknown_variant(where: str, variant: str, present: Sequence[str], bins: Sequence[str] = ()) -> LoadError:
    """`LoadError` for a variant no component has in safetensors; `bins`: the `.bin` files of the model
    (`component/name`), named when some are that variant's, which is then there but cannot be read."""
    unread = unread_bin([name for name in bins if bin_variant(name.rpartition("/")[2]) == variant])
    if unread:
        return LoadError(f"{where} has no safetensors weights of the variant {variant!r}: found only {unread}")
    there = (f"its weights come in the variant(s) {', '.join(present)}" if present
             else "it has no variants: load it without one")
    return LoadError(f"{where} has no weights of the variant {variant!r}; {there}")

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


# ---------------------------------------------------------------------------------------------------
# dtype and device policy


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """`"bf16"`, `"float16"`, `torch.float32`, ... -> a torch dtype; None stays None (= choose a default)."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
        raise InputError(f"unsupported dtype {dtype}; use bf16, fp16 or fp32")
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name in _DTYPES:
            return _DTYPES[name]
    raise InputError(f"unknown dtype {dtype!r}; use one of bf16, bfloat16, fp16, float16, fp32, float32")


def choose_device(device: str | torch.device | None = None, what: str = "device") -> torch.device:
    """The device to run on: the given one (checked to exist), else CUDA when available, else the CPU.
    `what` names the setting in messages ("text_device" is told to use --text-device cpu)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"device {str(device)!r} is not supported; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            flag = "--" + what.replace("_", "-")
            raise InputError(
                f'CUDA was asked for but no CUDA device is available here; use the CPU ({flag} cpu, {what}="cpu")'
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise InputError(f"{device} does not exist: this machine has {count} CUDA device(s)")
    return device


def choose_dtype(
    dtype: str | torch.dtype | None, device: torch.device, transformer_config: TransformerConfig | None = None
) -> torch.dtype:
    """The pipeline's one dtype for the transformer, VAE, text encoder and noise.

    Default: bf16 on GPU (the precision of the released weights; fp16 on GPUs without bf16), fp32 on CPU,
    where half precision is slow and buys nothing. fp16 with a 48-head (5B) model earns a warning: those
    models were trained in bf16 and the reference produces NaN / black videos in fp16.
    """
    chosen = parse_dtype(dtype)
    if chosen is None:
        if device.type == "cuda":
            chosen = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            chosen = torch.float32
    is_5b = transformer_config is not None and transformer_config.num_attention_heads >= 48
    if chosen == torch.float16 and is_5b:
        warnings.warn(
            "fp16 with a CogVideoX 5B model: these weights are bf16 and the reference implementation produces "
            "NaNs (black videos) in fp16; use bf16 unless your GPU lacks it",
            stacklevel=3,
        )
    return chosen


# ---------------------------------------------------------------------------------------------------
# Finding the model folder


def _demo_model_dir() -> Path:
    try:
        from cogvideox.demo import DEMO_MODEL_DIR
    except ImportError:
        DEMO_MODEL_DIR = None
    if DEMO_MODEL_DIR is None or not (Path(DEMO_MODEL_DIR) / MODEL_INDEX).is_file():
        raise LoadError(
            "the embedded demo model is not installed with this copy of cogvideox; give a model folder or a "
            "Hugging Face repo id such as THUDM/CogVideoX-2b instead"
        )
    return Path(DEMO_MODEL_DIR)


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_like_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and ".." not in name and not name.endswith(".")


def resolve_model_dir(
    path_or_repo_id: str | os.PathLike | None = None,
    *,
    revision: str | None = None,
    local_files_only: bool = False,
    components: Sequence[str] = WEIGHTED,
    variant: str | None = None,
) -> Path:
    """The local folder holding the model: a folder as given, the demo model (None), or a hub snapshot.

    A repo id (`THUDM/CogVideoX-5b`) is looked up in the Hugging Face cache first, without network; only
    when it is missing or incomplete there is it downloaded (unless `local_files_only` or HF_HUB_OFFLINE).
    Of the weights, only those of `components` are needed there, and downloaded: their `variant`'s files
    where the repo has them, else the plain ones.
    """
    variant = check_variant(variant)
    if not isinstance(local_files_only, bool):  # "no" would read as True
        raise InputError(f"local_files_only must be True or False, got {local_files_only!r}")
    if revision is not None and not isinstance(revision, str):
        raise InputError(f"revision must be a branch, tag or commit name (a str), got {revision!r}")
    if path_or_repo_id is None:
        _revision_unused(revision, "the built-in demo model")
        return _demo_model_dir()
    if not isinstance(path_or_repo_id, str | os.PathLike):
        raise InputError(
            f"a model is a folder path or a Hugging Face repo id, got {type(path_or_repo_id).__name__} "
            f"{path_or_repo_id!r}"
        )
    name = os.fspath(path_or_repo_id)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LoadError(f"{path} is a file; a model is a folder holding {MODEL_INDEX} and its components")
        _revision_unused(revision, f"the local folder {path}")
        return path
    if isinstance(path_or_repo_id, str) and name.endswith("/") and _looks_like_repo_id(name.rstrip("/")):
        # Path() drops the slash: the message below would say "not a repo id like" the very same text.
        raise LoadError(
            f"no model folder at {name}; for the Hugging Face repo, write {name.rstrip('/')} (no trailing slash)"
        )
    if not isinstance(path_or_repo_id, str) or not _looks_like_repo_id(name):
        raise LoadError(
            f"no model folder at {path} (and it is not a Hugging Face repo id like THUDM/CogVideoX-2b)"
        )
    return _hub_snapshot(name, revision=revision, local_files_only=local_files_only, components=components,
                         variant=variant)


def _revision_unused(revision: str | None, what: str) -> None:
    if revision is not None:
        warnings.warn(f"revision {revision!r} only applies to Hugging Face repo ids; {what} is used as it is",
                      stacklevel=3)


def _hub_snapshot(
    repo_id: str, *, revision: str | None, local_files_only: bool, components: Sequence[str], variant: str | None
) -> Path:
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    def snapshot(repo_files=None, **options) -> Path:
        patterns = hub_patterns(components, variant, repo_files)
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, **options))

    def complete(folder: Path) -> bool:
        # A cache holding plain weights only is no answer to a variant the hub may have.
        if missing_pieces(folder, components, variant):
            return False
        return variant is None or variant in folder_variants(folder)

    try:
        cached = snapshot(local_files_only=True)
        if complete(cached):
            return cached
    except (LocalEntryNotFoundError, FileNotFoundError):
        cached = None
    if local_files_only or constants.HF_HUB_OFFLINE:
        # A revision other than the one cached is "not in the cache" too: the message must say which.
        which = repo_id if revision is None else f"{repo_id} at revision {revision!r}"
        if cached is not None and missing_pieces(cached, components, variant):
            missing = ", ".join(missing_pieces(cached, components, variant))
            state = f"incomplete in the Hugging Face cache ({cached}: missing {missing})"
        elif cached is not None:
            raise _unknown_variant(f"{which} in the Hugging Face cache ({cached})", variant, folder_variants(cached))
        else:
            state = f"not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
        raise LoadError(
            f"{which} is {state} and downloads are off (offline mode){_cached_note(repo_id)}; download it once "
            "with network access or pass a local model folder"
        )
    try:
        repo_files = None
        if variant is not None:  # which components have the variant decides which files to fetch
            try:
                repo_files = HfApi().list_repo_files(repo_id, revision=revision)
            except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError):
                raise
            except Exception:  # the hub unreachable: snapshot_download below says so, or hands back the cache
                repo_files = None
            if repo_files is not None and not any(
                variant_file_names(repo_files, STEMS[c], variant) for c in WEIGHTED
            ):
                present = sorted({v for c in WEIGHTED for v in _repo_variants(repo_files, c)})
                bins = [f for f in repo_files if f.endswith(".bin") and f.startswith(tuple(f"{c}/" for c in WEIGHTED))]
                raise _unknown_variant(repo_id if revision is None else f"{repo_id} at revision {revision!r}",
                                       variant, present, bins)
        folder = snapshot(repo_files)
    except GatedRepoError:
        raise LoadError(
            f"{repo_id} is gated: accept its license on huggingface.co and log in (hf auth login)"
        ) from None
    except RepositoryNotFoundError:
        raise LoadError(f"no Hugging Face repository named {repo_id} (or it is private)") from None
    except RevisionNotFoundError:
        raise LoadError(f"{repo_id} has no revision {revision!r}{_cached_note(repo_id)}") from None
    except LocalEntryNotFoundError:
        raise LoadError(
            f"could not download {repo_id}: the Hugging Face hub is unreachable and the model is not (fully) "
            f"cached{_cached_note(repo_id)}"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise LoadError(f"could not download {repo_id}: {e}") from None
    missing = missing_pieces(folder, components, variant)
    if missing and cached is not None:
        # huggingface_hub hands back the cached snapshot as it is when the hub cannot be reached.
        raise LoadError(
            f"{repo_id} is incomplete in the Hugging Face cache ({folder}: missing {', '.join(missing)}) and "
            "downloading did not complete it: either the hub cannot be reached from here (download it where "
            "it can, or pass a local model folder) or the repository is not a CogVideoX model in the "
            "diffusers layout"
        )
    return folder


def _repo_variants(repo_files: Sequence[str], component: str) -> set[str]:
    names = [f.removeprefix(f"{component}/") for f in repo_files if f.startswith(f"{component}/")]
    return named_variants(names, STEMS[component])


def cached_revisions(repo_id: str) -> list[str]:
    """The revisions of `repo_id` the Hugging Face cache holds: each ref with its commit ("main (1a2b3c4)"),
    then any snapshot no ref names (its short commit), read from the cache's folders without network."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    held = repo / "snapshots"
    snapshots = {p.name for p in held.iterdir() if p.is_dir()} if held.is_dir() else set()
    found, named = [], set()
    refs = repo / "refs"
    for ref in sorted(p for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []:
        try:
            commit = ref.read_text().strip()
        except OSError:
            continue
        if commit in snapshots:
            found.append(f"{ref.relative_to(refs).as_posix()} ({commit[:7]})")
            named.add(commit)
    return found + sorted(commit[:7] for commit in snapshots - named)


def _cached_note(repo_id: str) -> str:
    held = cached_revisions(repo_id)
    return f"; the cache holds it at revision(s) {', '.join(held)}" if held else ""


# ---------------------------------------------------------------------------------------------------
# Checking the folder


def missing_pieces(folder: Path, components: Sequence[str] = WEIGHTED, variant: str | None = None) -> list[str]:
    """What a folder lacks to be a CogVideoX model folder whose `components` run (empty list: nothing):
    every config, and the weights (and for the text encoder, the vocabulary) of those components (with a
    `variant`, a component holding that variant's weights needs those, another its plain ones)."""
    required = [
        MODEL_INDEX,
        "transformer/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        SCHEDULER_CONFIG,
    ]
    missing = [name for name in required if not (folder / name).is_file()]
    # Without its vocabulary, transformers still builds a T5 tokenizer (from tokenizer_config.json alone),
    # one that turns every word into <unk>: the videos would ignore the prompt, silently.
    text = "text_encoder" in components
    if text and not any((folder / "tokenizer" / name).is_file() for name in TOKENIZER_VOCABULARY):
        missing.append("tokenizer/spiece.model (or tokenizer.json)")
    for component, stem in STEMS.items():
        if component in components and (folder / component).is_dir():
            missing += [f"{component}/{name}" for name in _missing_weight_files(folder / component, stem, variant)]
    return missing


def _missing_weight_files(component_dir: Path, stem: str, variant: str | None = None) -> list[str]:
    if variant is not None and has_variant(component_dir, stem, variant):
        if (component_dir / f"{stem}.{variant}.safetensors").is_file():
            return []
        index = variant_index(component_dir, stem, variant)
        if index is None:
            return [f"{stem}.safetensors.index.{variant}.json"]
    elif (component_dir / f"{stem}.safetensors").is_file():
        return []
    else:
        index = component_dir / f"{stem}.safetensors.index.json"
        if not index.is_file():
            if variant is None:
                unread = unread_weights(component_dir, stem)
                return [f"{stem}.safetensors" + (f" (found {unread})" if unread else "")]
            unread = unread_bin(sorted(p.name for p in component_dir.glob("*.bin")))
            return [f"{stem}.safetensors (or its {variant} variant" + (f"; found only {unread})" if unread else ")")]
    try:
        names = shard_names(index)
    except LoadError:
        return [index.name + " (unreadable)"]
    return [name for name in names if not (component_dir / name).is_file()]


def check_model_dir(folder: Path, components: Sequence[str] = WEIGHTED, variant: str | None = None) -> None:
    """Raise `LoadError` naming what is missing if `folder` is not a CogVideoX model folder (whose
    `components` run, in `variant` where a component has it); a `variant` no component has is an error
    naming those the folder holds, as diffusers refuses it."""
    variant = check_variant(variant)
    if variant is not None and (folder / MODEL_INDEX).is_file() and variant not in folder_variants(folder):
        bins = [p.relative_to(folder).as_posix() for c in WEIGHTED if (folder / c).is_dir()
                for p in sorted((folder / c).glob("*.bin"))]  # fmt: skip
        raise _unknown_variant(str(folder), variant, folder_variants(folder), bins)
    missing = missing_pieces(folder, components, variant)
    if missing and MODEL_INDEX in missing:
        _refuse_component_folder(folder)
    if missing:
        raise LoadError(f"{folder} is not a CogVideoX model folder: missing {', '.join(missing)}")
    index = _read_json(folder / MODEL_INDEX)
    class_name = index.get("_class_name", "")
    if class_name and not class_name.startswith("CogVideoX"):
        raise LoadError(f"{folder} holds a {class_name}, not a CogVideoX model")


def _refuse_component_folder(folder: Path) -> None:
    """`LoadError` for one component's folder given as the model (`CogVideoX-2b/vae`, as diffusers' model
    classes take it): the error names the model folder to give instead, rather than listing every file."""
    configs = [folder / name for name in ("config.json", "scheduler_config.json") if (folder / name).is_file()]
    if not configs:
        return
    try:
        class_name = read_json(configs[0]).get("_class_name")
    except (OSError, ValueError, AttributeError):
        class_name = None
    what = f" ({class_name})" if isinstance(class_name, str) and class_name else ""
    parent = folder.absolute().parent
    instead = f"the model folder {parent}" if (parent / MODEL_INDEX).is_file() else f"the folder holding {MODEL_INDEX}"
    raise LoadError(f"{folder} holds a single component{what}, not a whole model; give {instead}")


def _read_json(path: Path) -> dict:
    try:
        data = read_json(path)
    except ValueError as e:
        raise LoadError(f"{path} is {e}") from None
    except OSError as e:  # unreadable: another user's download, a file mode of 000
        raise LoadError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise LoadError(f"{path} must hold a JSON object")
    return data


# The pipeline call's arguments a model folder may recommend, with the values used when it does not.
SAMPLING_FALLBACKS = {"guidance_scale": 6.0, "use_dynamic_cfg": False, "dynamic_cfg": "reference"}


def read_sampling_defaults(folder: Path) -> dict:
    """The guidance settings a model recommends: `sampling.json` beside `model_index.json`, e.g.
    `{"guidance_scale": 4.0}`. Optional (the released models have none, and diffusers ignores the file);
    what it leaves out takes `SAMPLING_FALLBACKS`, the reference pipeline's defaults."""
    path = Path(folder) / SAMPLING_DEFAULTS
    if not path.is_file():
        return dict(SAMPLING_FALLBACKS)
    data = _read_json(path)
    unknown = sorted(set(data) - set(SAMPLING_FALLBACKS))
    if unknown:
        raise LoadError(f"{path}: unknown settings {unknown}; it may set {sorted(SAMPLING_FALLBACKS)}")
    scale = data.get("guidance_scale", SAMPLING_FALLBACKS["guidance_scale"])
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale < float("inf"):
        raise LoadError(f"{path}: guidance_scale must be a number >= 0, got {scale!r}")
    if not isinstance(data.get("use_dynamic_cfg", False), bool):
        raise LoadError(f"{path}: use_dynamic_cfg must be true or false, got {data['use_dynamic_cfg']!r}")
    if data.get("dynamic_cfg", "reference") not in ("reference", "smooth"):
        raise LoadError(f"{path}: dynamic_cfg must be \"reference\" or \"smooth\", got {data['dynamic_cfg']!r}")
    return {**SAMPLING_FALLBACKS, **data, "guidance_scale": float(scale)}


def fill_sampling(recommended: dict, **given) -> dict:
    """The guidance arguments of a call (`guidance_scale`, `use_dynamic_cfg`, `dynamic_cfg`): each one
    given, else the model's `recommended` one (from `read_sampling_defaults`)."""
    return {name: recommended[name] if value is None else value for name, value in given.items()}


def text_encoder_width(folder: Path) -> int:
    """d_model of the T5 in `folder/text_encoder`, read from its config without loading it."""
    path = folder / "text_encoder" / "config.json"
    config = _read_json(path)
    if "d_model" not in config:
        raise LoadError(f"{path} has no d_model: not a T5 encoder config")
    width = config["d_model"]
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise LoadError(f"{path}: d_model must be a positive integer, got {width!r}")
    return width


def check_components(transformer: TransformerConfig, vae: VAEConfig, text_width: int) -> None:
    """Raise `LoadError` if the transformer, VAE and text encoder cannot work together."""
    problems = []
    if transformer.latent_channels != vae.latent_channels:
        problems.append(
            f"the transformer denoises {transformer.latent_channels}-channel latents but the VAE has "
            f"{vae.latent_channels} latent channels"
        )
    if transformer.in_channels not in (transformer.latent_channels, 2 * transformer.latent_channels):
        problems.append(
            f"the transformer takes {transformer.in_channels} input channels, neither its "
            f"{transformer.latent_channels} latent channels nor twice that (image-to-video)"
        )
    if transformer.text_embed_dim != text_width:
        problems.append(
            f"the transformer expects {transformer.text_embed_dim}-wide text embeddings but the T5 text "
            f"encoder produces {text_width}"
        )
    if transformer.temporal_compression_ratio != vae.temporal_compression:
        problems.append(
            f"the transformer assumes {transformer.temporal_compression_ratio}x temporal compression but the "
            f"VAE compresses time {vae.temporal_compression}x"
        )
    step = 2 * vae.temporal_compression
    if (transformer.sample_frames - 1) % step:  # the default request would be refused (`request.check_frames`)
        problems.append(
            f"the transformer's sample_frames {transformer.sample_frames} is not of the form {step}k+1, the frame "
            "counts the VAE gives back (49, 81, ...)"
        )
    if problems:
        raise LoadError("the model's components do not fit together: " + "; ".join(problems))


@dataclass(frozen=True)
class ModelConfigs:
    """The configs of a model folder: everything needed to check a request without loading weights."""

    transformer: TransformerConfig
    vae: VAEConfig
    scheduler: SchedulerConfig
    text_width: int  # d_model of the T5


def read_model_configs(
    folder: Path, components: Sequence[str] = WEIGHTED, variant: str | None = None
) -> ModelConfigs:
    """Read and cross-check the configs of a model folder (raises `LoadError` naming what is wrong); of
    the weights, those of `components` (in `variant`, see `check_model_dir`) must be there."""
    check_model_dir(folder, components, variant)
    try:
        configs = ModelConfigs(
            transformer=TransformerConfig.from_json(folder / "transformer" / "config.json"),
            vae=VAEConfig.from_json(folder / "vae" / "config.json"),
            scheduler=SchedulerConfig.from_json(folder / SCHEDULER_CONFIG),
            text_width=text_encoder_width(folder),
        )
    except ConfigError as e:
        raise LoadError(str(e)) from None
    check_components(configs.transformer, configs.vae, configs.text_width)
    return configs


# ---------------------------------------------------------------------------------------------------
# Loading tensors


def _load_model(folder: Path, subfolder: str, build, config_cls, dtype: torch.dtype, device: torch.device,
                variant: str | None = None):
    """Build `build(config)` on the meta device from `folder/subfolder/config.json`, then load it strictly
    (from `variant`'s weights where the folder holds them)."""
    path = folder / subfolder
    config = config_cls.from_json(path / "config.json")
    try:
        with torch.device("meta"):
            model = build(config)
    except ConfigError as e:  # a value the network cannot be built with (an unknown activation, say)
        raise LoadError(f"{path / 'config.json'}: {e}") from None
    load_weights(model, weight_files(path, DIFFUSERS_WEIGHTS, variant), dtype, device, f"{path}")
    return model.eval()


def load_transformer(folder: Path, dtype: torch.dtype, device: torch.device, variant: str | None = None):
    """The expert transformer of `folder/transformer`, strictly loaded."""
    return _load_model(folder, "transformer", CogVideoXTransformer, TransformerConfig, dtype, device, variant)


def load_vae(folder: Path, dtype: torch.dtype, device: torch.device, variant: str | None = None):
    """The 3D causal VAE of `folder/vae`, strictly loaded."""
    return _load_model(folder, "vae", CogVideoXVAE, VAEConfig, dtype, device, variant)


try:  # what transformers raises, through huggingface_hub, for a T5 config value of the wrong type
    from huggingface_hub.errors import StrictDataclassError as _T5ConfigError
except ImportError:  # older huggingface_hub: transformers does not check the types
    _T5ConfigError = ValueError


def load_text_encoder(folder: Path, dtype: torch.dtype, device: torch.device, variant: str | None = None):
    """The T5 encoder and its tokenizer (through transformers)."""
    try:
        return TextEncoder.from_pretrained(
            folder / "text_encoder", folder / "tokenizer", dtype=dtype, device=device, variant=variant
        )
    except (OSError, ValueError, _T5ConfigError) as e:
        if isinstance(e, LoadError):
            raise
        detail = " ".join(str(e).split())  # one line: huggingface_hub's validation errors span two
        raise LoadError(f"cannot load the T5 text encoder of {folder}: {detail}") from None


def load_scheduler(folder: Path, kind: str | None = None):
    """The sampler of `folder/scheduler`: the class its config names, or `kind` ("ddim" / "dpm")."""
    try:
        return make_scheduler(SchedulerConfig.from_json(folder / SCHEDULER_CONFIG), kind)
    except ValueError as e:  # ConfigError included
        raise LoadError(f"{folder / SCHEDULER_CONFIG}: {e}") from None


# ---------------------------------------------------------------------------------------------------
# Writing a folder


def model_index(
    pipeline_class: str = "CogVideoXPipeline",
    scheduler_class: str = "CogVideoXDDIMScheduler",
    text_encoder_class: str = "T5EncoderModel",
    tokenizer_class: str = "T5Tokenizer",
    transformer_class: str = "CogVideoXTransformer3DModel",
    vae_class: str = "AutoencoderKLCogVideoX",
) -> dict:
    """The content of a folder's `model_index.json` in the official layout: each component's library and class."""
    return {
        "_class_name": pipeline_class,
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", text_encoder_class],
        "tokenizer": ["transformers", tokenizer_class],
        "transformer": ["diffusers", transformer_class],
        "vae": ["diffusers", vae_class],
    }
