"""The text encoder: prompts -> the T5 token states the transformer attends to.

CogVideoX conditions on the frozen T5 v1.1 XXL encoder and the reference uses it this way: every prompt
is padded to a fixed 226 tokens and encoded WITHOUT an attention mask, so the pad positions carry real
(non-zero) states that the transformer's full attention sees. Masking them would change the video.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from cogvideox.weights import load_weights, weight_files

if TYPE_CHECKING:  # transformers is imported where a T5 is built: it takes seconds
    from transformers import T5EncoderModel, T5Tokenizer

_QUOTE_LIMIT = 120  # characters of the dropped text a truncation warning quotes

# T5EncoderModel's token embedding is `shared.weight`; its encoder's `embed_tokens` is the same tensor.
_T5_TIED = {"encoder.embed_tokens.weight": "shared.weight"}


def load_t5(
    text_encoder_dir: Path, dtype: torch.dtype, device: torch.device, variant: str | None = None
) -> T5EncoderModel:
    """transformers' `T5EncoderModel` of a checkpoint's `text_encoder/` folder, in `dtype` on `device`.

    transformers' own loader keeps a whole shard mapped while it casts (up to 1.9x the weights in host
    memory for a cast T5-XXL); this one maps each tensor alone, as for our own networks.
    """
    from transformers import T5Config, T5EncoderModel

    config = T5Config.from_pretrained(str(text_encoder_dir))
    with torch.device("meta"):
        model = T5EncoderModel(config)
    # transformers' rule: `_keep_in_fp32_modules` stay float32 in float16, the `_strict` ones in bf16 too.
    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ()) if dtype.itemsize == 2 else set()
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    files = weight_files(text_encoder_dir, "model", variant)
    load_weights(model, files, dtype, device, str(text_encoder_dir), keep_fp32=keep, tied=_T5_TIED)
    return model.eval()


def _prompt_list(prompts: str | list[str] | tuple[str, ...]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt (use \"\" for an unconditional one)")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} must be a string, got {type(p).__name__}")
    return list(prompts)


def _check_sentencepiece(path: Path) -> None:
    """ValueError when `path` exists but is no SentencePiece model. transformers answers a damaged one with
    advice to install tiktoken, and takes an empty one (an interrupted download), whose token ids then
    fall outside T5's vocabulary in the middle of a generation."""
    if not path.is_file():
        return  # a tokenizer.json alone, or no tokenizer: transformers says what it needs
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        why = " ".join(str(e).split())
        raise ValueError(f"{path} is not a SentencePiece model ({why}): a damaged or truncated download?") from None


class TextEncoder(nn.Module):
    """A T5 tokenizer and `T5EncoderModel` used the way the CogVideoX pipelines use them."""

    def __init__(self, tokenizer: T5Tokenizer, model: T5EncoderModel) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model

    @classmethod
    def from_pretrained(
        cls,
        text_encoder_dir: str | Path,
        tokenizer_dir: str | Path,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        variant: str | None = None,
    ) -> TextEncoder:
        """Load the `text_encoder/` and `tokenizer/` folders of a checkpoint.

        The encoder is built from its `config.json` on the meta device and its safetensors weights are
        assigned to it (`weights.load_weights`): read straight into `dtype` (None: float32) on `device`
        (None: the CPU), with no second copy in host memory, strictly. It is the model transformers'
        `T5EncoderModel.from_pretrained` gives, the reference's: the same parameters, the token embedding
        tied to `shared.weight`, and in float16 the feed-forward output projections (`wo`) kept in
        float32, as transformers keeps them. `variant`: read `model.{variant}.safetensors` (or its shards)
        where the folder holds them.
        """
        for what, path in (("text encoder", text_encoder_dir), ("tokenizer", tokenizer_dir)):
            if not Path(path).is_dir():
                raise FileNotFoundError(f"{what} folder not found: {path}")
        _check_sentencepiece(Path(tokenizer_dir) / "spiece.model")
        from transformers import T5Tokenizer

        tokenizer = T5Tokenizer.from_pretrained(str(tokenizer_dir))
        model = load_t5(Path(text_encoder_dir), dtype or torch.float32, torch.device(device or "cpu"), variant)
        return cls(tokenizer, model)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def d_model(self) -> int:
        return self.model.config.d_model

    def encode(
        self,
        prompts: str | list[str],
        max_sequence_length: int = 226,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Encode prompts to `[B, max_sequence_length, d_model]`.

        Each prompt gets T5's end-of-text token and is padded to `max_sequence_length`; longer prompts are
        cut (with a warning saying how much was dropped). The result is cast to `dtype` (default: the
        encoder's) on `device` (default: the encoder's).
        """
        prompts = _prompt_list(prompts)
        length = max_sequence_length
        if not isinstance(length, int) or isinstance(length, bool) or length < 1:
            raise ValueError(f"max_sequence_length must be a positive integer, got {length!r}")
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        self._warn_if_truncated(prompts, length)
        ids = tokens.input_ids.to(self.device)  # [B, L]
        with torch.no_grad():  # T5 is frozen in CogVideoX, in sampling and in training alike
            states = self.model(input_ids=ids).last_hidden_state  # [B, L, d_model], no mask (module doc)
        return states.to(dtype=dtype or self.dtype, device=device or self.device)

    def forward(self, prompts: str | list[str], **kwargs) -> Tensor:
        return self.encode(prompts, **kwargs)

    def _warn_if_truncated(self, prompts: list[str], max_length: int) -> None:
        full = self.tokenizer(prompts, add_special_tokens=True).input_ids  # unpadded, with end token
        for i, ids in enumerate(full):
            dropped = len(ids) - max_length
            if dropped > 0:
                # Truncation keeps max_length - 1 text tokens and the end token.
                cut = self.tokenizer.decode(ids[max_length - 1 : -1])
                if len(cut) > _QUOTE_LIMIT:  # the start of what was lost is enough to recognise it
                    cut = cut[:_QUOTE_LIMIT].rsplit(" ", 1)[0] + " ..."
                # Named by its start, not its place: the caller's list (a batch file, [negative ;
                # prompt]) is not the one encoded here.
                start = prompts[i] if len(prompts[i]) <= 40 else prompts[i][:40].rsplit(" ", 1)[0] + " ..."
                warnings.warn(
                    f"the prompt {start!r} is {len(ids) - 1} tokens long but max_sequence_length is {max_length} "
                    f"(end token included), so its last {dropped} tokens were dropped: {cut!r}",
                    stacklevel=3,
                )
