"""A small, exact training loop: AdamW, warm-up, optional EMA, autocast, checkpoints and resume.

The loop knows nothing about what it trains: it calls `loss_fn(model, step, generator)` and steps the
optimizer. All randomness of a step comes from the generator it is handed (seeded by run seed and step),
so a run resumed from a checkpoint continues bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, step_generator
from .ema import EMA
from .log import JsonlLog, plot_curve

LossFn = Callable[[nn.Module, int, torch.Generator], torch.Tensor]


@dataclass
class TrainConfig:
    steps: int
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0  # 1.0: constant after warm-up; < 1: cosine decay to lr * ratio
    grad_clip: float | None = 1.0
    ema_decay: float | None = None
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    autocast_bf16: bool = True  # only used on CUDA


def learning_rate(cfg: TrainConfig, step: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.min_lr_ratio >= 1.0:
        return cfg.lr
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model: nn.Module,
    loss_fn: LossFn,
    cfg: TrainConfig,
    out_dir: str | Path,
    name: str = "model",
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict:
    """Trains `model` for `cfg.steps` steps, resuming from the newest checkpoint in `out_dir`.

    Writes `{name}-{step}.pt` checkpoints, `{name}-loss.jsonl` and `{name}-loss.png`.
    Returns a summary: final step, last smoothed loss, seconds spent in this call.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None

    start = 0
    ckpt = latest_checkpoint(out_dir, name)
    if ckpt is not None:
        state = load_checkpoint(ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        start = state["step"]
    log = JsonlLog(out_dir / f"{name}-loss.jsonl", resume_step=start)

    def checkpoint(step: int) -> None:
        save_checkpoint(
            out_dir / f"{name}-{step}.pt",
            model=model.state_dict(),
            optimizer=opt.state_dict(),
            ema=ema.state_dict() if ema is not None else None,
            step=step,
        )
        for old in out_dir.glob(f"{name}-*.pt"):  # keep the newest two
            s = old.stem.rsplit("-", 1)[1]
            if s.isdigit() and int(s) < step - cfg.checkpoint_every:
                old.unlink()

    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and cfg.autocast_bf16
        else contextlib.nullcontext()
    )
    model.train()
    t0 = time.time()
    smooth = None
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train {name}", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step)
        gen = step_generator(cfg.seed, step)
        with amp:
            loss = loss_fn(model, step, gen)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step} of {name}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if ema is not None:
            ema.update(model)
        value = loss.item()
        smooth = value if smooth is None else 0.98 * smooth + 0.02 * value
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log.write(step + 1, loss=value, lr=opt.param_groups[0]["lr"])
            bar.set_postfix(loss=f"{smooth:.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            checkpoint(step + 1)
    bar.close()
    plot_curve(log.read(), "loss", out_dir / f"{name}-loss.png", title=f"{name} training loss")
    if ema is not None:
        ema.copy_to(model)
    return {"step": cfg.steps, "loss": smooth, "seconds": time.time() - t0}
