"""Build the embedded demo model from scratch: `python -m cogvideox.demo.build`.

The demo is a tiny CogVideoX (the same classes as the real models, a smaller config) trained on the
synthetic world of `cogvideox.demo.world`. Every stage is resumable and writes under `--work`:

1. the tokenizer (a sentencepiece word model over the caption vocabulary) and a small T5 encoder,
   randomly initialised with a fixed seed and kept frozen, as CogVideoX keeps T5 frozen;
2. the 3D causal VAE, trained for reconstruction (L1 + a small KL) on random crops of world videos;
3. the latents of a fixed set of training videos and the T5 states of every caption, cached;
4. the expert transformer, trained with the CogVideoX objective (v-prediction on the zero-terminal-SNR
   schedule) with caption dropout for classifier-free guidance;
5. the finished model folder in the official layout (`--out`), ready for `Pipeline.from_pretrained`.
"""

from __future__ import annotations

import argparse
import colorsys
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..loading import model_index
from ..weights import weight_files
from ..models.config import SchedulerConfig, TransformerConfig, VAEConfig
from ..models.transformer import CogVideoXTransformer
from ..models.vae import CogVideoXVAE
from ..sampling import to_uint8_frames
from ..schedulers import alphas_cumprod
from ..text import TextEncoder
from ..train.cache import latent_mask
from ..train.grow import grow_depth
from ..train.loop import TrainConfig, train
from ..train.objective import v_loss
from . import world

TEXT_TOKENS = 16  # the longest caption is 9 words + EOS, one token each
T5_DIM = 64
LATENT_CHANNELS = 8

VAE_CONFIG = VAEConfig(
    block_out_channels=(16, 32, 32, 64),
    down_block_types=("CogVideoXDownBlock3D",) * 4,
    up_block_types=("CogVideoXUpBlock3D",) * 4,
    latent_channels=LATENT_CHANNELS,
    layers_per_block=1,
    norm_num_groups=8,
    sample_height=world.HEIGHT,
    sample_width=world.WIDTH,
    scaling_factor=1.0,  # replaced by 1 / std of the trained latents
)

TRANSFORMER_CONFIG = TransformerConfig(
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    time_embed_dim=128,
    text_embed_dim=T5_DIM,
    num_layers=6,
    sample_width=world.WIDTH // 8,
    sample_height=world.HEIGHT // 8,
    sample_frames=world.FRAMES,
    max_text_seq_length=TEXT_TOKENS,
    use_rotary_positional_embeddings=True,
)

SCHEDULER_CONFIG = SchedulerConfig(snr_shift_scale=1.0)

# The guidance the model is sampled with by default (its sampling.json): the scale that scored best in
# `python -m cogvideox.demo.evaluate --guidance G` (see the model card). The released models' 6 pushes
# this small model's colours past their codes: green on black comes out yellow.
SAMPLING = {"guidance_scale": 2.5}


# ---------------------------------------------------------------------------------------------- text


def vocabulary() -> list[str]:
    words = {w for c in world.all_captions() for w in c.split()}
    return sorted(words)


def small_t5_config(vocab_size: int, d_model: int, num_layers: int, num_heads: int):
    """A T5 v1.1 encoder's config (gated GELU, the official tokenizer's pad and end ids) at a small size."""
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def train_t5_tokenizer(folder: Path, sentences: list[str], vocab_size: int, model_type: str, **options) -> None:
    """Train `folder/spiece.model` on `sentences`: a sentencepiece model with T5's special pieces (<pad> 0,
    </s> 1, <unk> 2, no <s>), as the official `tokenizer/` folder holds. `options` go to the trainer."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=str(folder / "spiece"),
        model_type=model_type,
        vocab_size=vocab_size,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
        **options,
    )
    (folder / "spiece.vocab").unlink()  # the trainer's listing of the pieces: the tokenizer reads the model alone


def build_text_encoder(folder: Path, seed: int = 0) -> TextEncoder:
    """`folder/tokenizer` (sentencepiece, one piece per caption word) and `folder/text_encoder`."""
    from transformers import T5EncoderModel

    tok_dir, enc_dir = folder / "tokenizer", folder / "text_encoder"
    if not (enc_dir / "config.json").is_file():
        words = vocabulary()
        train_t5_tokenizer(tok_dir, list(world.all_captions()) + words * 4, len(words) + 3, "word")
        config = small_t5_config(len(words) + 3, T5_DIM, num_layers=2, num_heads=4)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            T5EncoderModel(config).save_pretrained(str(enc_dir))
    return TextEncoder.from_pretrained(enc_dir, tok_dir, dtype=torch.float32)


def component_weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    """The weights of `component` ("vae", "transformer") from a model folder in the official layout, or
    from the component's own folder."""
    if (folder / component).is_dir():
        folder = folder / component
    state = {}
    for path in weight_files(folder):
        state.update(load_file(str(path)))
    return state


# ----------------------------------------------------------------------------------------------- VAE


def random_rgb(rng: np.random.Generator) -> tuple[float, float, float]:
    """A saturated colour of any hue, as bright as the world's: its six colours sit on the same kind of
    HSV shell (saturation 0.8-0.92, value 0.74-0.97)."""
    return tuple(255 * c for c in colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.8, 0.92), rng.uniform(0.74, 0.97)))


def render_batch(
    seed: int,
    indices,
    split: str = "train",
    backgrounds: dict[str, float] | None = None,
    any_colour: float = 0.0,
) -> torch.Tensor:
    """World videos [B, 3, F, H, W] in [-1, 1]; video i depends only on (seed, i).

    backgrounds: optional sampling weights per background (default: uniform over the split's captions).
    any_colour: the share of videos whose object is painted a random saturated colour (`random_rgb`)
    instead of its caption's.
    """
    videos = []
    for i in indices:
        rng = np.random.default_rng([seed, int(i)])
        if backgrounds is None:
            scene = world.sample_scene(rng, split)
        else:
            names = sorted(backgrounds)
            p = np.array([backgrounds[n] for n in names], dtype=np.float64)
            background = names[rng.choice(len(names), p=p / p.sum())]
            pool = [c for c in world.captions_of(split) if c.endswith(f"on a {background} background")]
            scene = world.scene_for_caption(pool[rng.integers(len(pool))], rng)
        rgb = random_rgb(rng) if any_colour and rng.random() < any_colour else None
        videos.append(world.to_model_range(world.render(scene, rgb)))
    return torch.stack(videos)


def random_crops(x: torch.Tensor, height: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """One crop per video at offsets that are multiples of 8 (the VAE's spatial stride)."""
    _, _, _, h, w = x.shape
    out = []
    for v in x:
        top = 8 * int(torch.randint(0, (h - height) // 8 + 1, (1,), generator=gen))
        left = 8 * int(torch.randint(0, (w - width) // 8 + 1, (1,), generator=gen))
        out.append(v[:, :, top : top + height, left : left + width])
    return torch.stack(out)


def foreground(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, F, H, W] mask of the moving object: pixels that differ from the frame's top-left corner
    (always background in this world), grown by two pixels so the outline's anti-aliasing counts."""
    mask = ((x - x[:, :, :, :1, :1]).abs().amax(1, keepdim=True) > 0.02).float()
    return torch.nn.functional.max_pool3d(mask, (1, 5, 5), stride=1, padding=(0, 2, 2))


def object_crops(x: torch.Tensor, height: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """One crop per video, aligned to the VAE's stride of 8, placed over the object's path (with a
    random shift), so that the small object is in (nearly) every training crop."""
    _, _, _, h, w = x.shape
    fg = foreground(x)[:, 0].sum(1)  # [B, H, W]
    out = []
    for v, m in zip(x, fg):
        ys, xs = torch.nonzero(m, as_tuple=True)
        cy = float(ys.float().mean()) if len(ys) else h / 2
        cx = float(xs.float().mean()) if len(xs) else w / 2
        jitter = torch.randint(-8, 9, (2,), generator=gen).tolist()
        top = int(round((cy - height / 2 + jitter[0]) / 8)) * 8
        left = int(round((cx - width / 2 + jitter[1]) / 8)) * 8
        top, left = min(max(top, 0), h - height), min(max(left, 0), w - width)
        out.append(v[:, :, top : top + height, left : left + width])
    return torch.stack(out)


def object_loss(
    batch: int,
    seed: int,
    full_frames_from: int,
    kl_weight: float = 1e-6,
    backgrounds: dict[str, float] | None = None,
    full_batch: int | None = None,
    decoder_only: bool = False,
    any_colour: float = 0.0,
    latent_noise: float = 0.0,
):
    """Reconstruction loss with the object's pixels weighted 10x, on crops over the object's path (whole
    frames, `full_batch` of them, from step `full_frames_from` on, so the GroupNorm statistics match
    full-size videos). decoder_only: decode the encoder's (frozen) means, so the latents do not move.
    latent_noise: add Gaussian noise of this many times the batch's latent std to the latents before
    decoding (see `train_vae`)."""

    def loss_fn(model, step, gen):
        crops = step < full_frames_from  # crops are several times cheaper
        n = batch if crops or full_batch is None else full_batch
        idx = torch.randint(0, 1 << 30, (n,), generator=gen).tolist()
        x = render_batch(seed, idx, backgrounds=backgrounds, any_colour=any_colour)
        if crops:
            x = object_crops(x, 32, 48, gen)
        weight = 1.0 + 9.0 * foreground(x)
        kl = 0.0
        if decoder_only:
            with torch.no_grad():
                z = model.encode(x).mode()
        else:
            posterior = model.encode(x)
            if latent_noise:
                # Noise of a fixed share of the latents' spread takes the place of the posterior's own
                # sampling (and so of its KL term, which only sizes that sampling).
                z = posterior.mode()
                z = z + latent_noise * z.detach().std() * torch.randn(z.shape, generator=gen)
            else:
                z, kl = posterior.sample(gen), kl_weight * posterior.kl().mean()
        err = model.decode(z) - x
        return (weight * (err.abs() + 0.5 * err.square())).mean() + kl

    return loss_fn


def train_vae(
    work: Path,
    general: int,
    focused: int,
    batch: int,
    seed: int,
    progress: bool,
    colour: int = 0,
    init: Path | None = None,
    decoder: int = 0,
    hues: int = 0,
    joint: int = 0,
    latent_noise: float = 0.0,
) -> CogVideoXVAE:
    """Three phases: general reconstruction on crops, a phase focused on the moving object, and a
    colour phase that stresses objects on black and white backgrounds.

    In this world the object covers a few percent of the pixels, so an unweighted loss on random crops
    learns the flat background first and the object barely at all; the second phase crops over the
    object's path and weights object pixels 10x, with whole frames at its end so the GroupNorm
    statistics match those of full-size videos. After it, the latents of objects on black (or white)
    backgrounds still point the same way whatever the colour: on gray, the object's colour differs
    from the background with mixed signs per channel, on black and white with one sign, and the encoder
    had learnt only the first code. The colour phase draws black and white backgrounds 80% of the time.

    A fourth phase, `decoder` steps, trains the decoder alone on whole frames (objects on black and
    white stressed again): the latents stay as they were, so a transformer trained on them stays valid.
    A fifth, `hues` steps, also decoder-only, paints half the objects a random saturated colour: trained
    on the six colours alone, the decoder turned any other hue (orange) into one of them, so a fine-tune
    could never teach the transformer a new colour.

    A sixth, `joint` steps, trains encoder and decoder together again on whole frames, with 30% of the
    objects painted any hue and Gaussian noise of `latent_noise` x the latents' std added before
    decoding. Without it, the six colours' codes on black or white sat close together (blue and cyan
    0.07 latent std apart at the object's cells), so a transformer sample a little off in latent space
    decoded to the neighbouring colour; the noise makes the decoder tolerate such errors and the encoder
    keep colours further apart than them. It changes the latents: the transformer must be trained (or
    fine-tuned, `train_transformer(init=...)`) on the new ones.

    init: a model folder (or its `vae/`) to start from instead of phases one and two.
    """
    torch.manual_seed(seed)
    vae = CogVideoXVAE(VAE_CONFIG)
    kl_weight = 1e-6
    if init is not None:
        vae.load_state_dict(component_weights(init, "vae"))
        general = focused = 0

    def general_loss(model, step, gen):
        idx = torch.randint(0, 1 << 30, (batch,), generator=gen).tolist()
        x = render_batch(seed + 1, idx)
        if step < int(0.9 * general):  # crops are 4x cheaper; whole frames at the end
            x = random_crops(x, 32, 48, gen)
        posterior = model.encode(x)
        recon = model.decode(posterior.sample(gen))
        return (recon - x).abs().mean() + 0.5 * (recon - x).square().mean() + kl_weight * posterior.kl().mean()

    focused_loss = object_loss(batch, seed + 2, full_frames_from=focused - 150)
    whole = min(4, batch)  # videos a step on whole frames (4 unless --vae-batch is smaller)
    colour_loss = object_loss(batch, seed + 3, full_frames_from=int(0.9 * colour), full_batch=whole,
                              backgrounds={"black": 0.4, "white": 0.4, "gray": 0.2})
    decoder_loss = object_loss(whole, seed + 4, full_frames_from=0, decoder_only=True,
                               backgrounds={"black": 0.45, "white": 0.35, "gray": 0.2})
    hues_loss = object_loss(whole, seed + 5, full_frames_from=0, decoder_only=True, any_colour=0.5,
                            backgrounds={"black": 0.4, "white": 0.3, "gray": 0.3})

    joint_loss = object_loss(whole, seed + 6, full_frames_from=0, any_colour=0.3, latent_noise=latent_noise,
                             backgrounds={"black": 0.4, "white": 0.35, "gray": 0.25})

    phases = (
        ("vae", general_loss, TrainConfig(steps=general, lr=1e-3, warmup_steps=100, min_lr_ratio=0.05,
                                          seed=seed, checkpoint_every=200, log_every=10, grad_clip=1.0)),
        ("vae-object", focused_loss, TrainConfig(steps=focused, lr=3e-4, warmup_steps=20, min_lr_ratio=0.05,
                                                 seed=seed + 1, checkpoint_every=100, log_every=10,
                                                 grad_clip=1.0)),
        ("vae-colour", colour_loss, TrainConfig(steps=colour, lr=6e-4, warmup_steps=20, min_lr_ratio=0.05,
                                                seed=seed + 2, checkpoint_every=100, log_every=10,
                                                grad_clip=1.0)),
        ("vae-decoder", decoder_loss, TrainConfig(steps=decoder, lr=3e-4, warmup_steps=20, min_lr_ratio=0.05,
                                                  seed=seed + 3, checkpoint_every=50, log_every=10,
                                                  grad_clip=1.0)),
        ("vae-hues", hues_loss, TrainConfig(steps=hues, lr=3e-4, warmup_steps=20, min_lr_ratio=0.05,
                                            seed=seed + 4, checkpoint_every=50, log_every=10, grad_clip=1.0)),
        ("vae-joint", joint_loss, TrainConfig(steps=joint, lr=2e-4, warmup_steps=20, min_lr_ratio=0.05,
                                              seed=seed + 5, checkpoint_every=50, log_every=10, grad_clip=1.0)),
    )
    for name, loss_fn, cfg in phases:
        if cfg.steps == 0:
            continue
        vae.encoder.requires_grad_(name not in ("vae-decoder", "vae-hues"))
        summary = train(vae, loss_fn, cfg, work / name, name=name, progress=progress)
        print(f"{name}: {summary['step']} steps, loss {summary['loss'] or float('nan'):.4f}, {summary['seconds']:.0f} s")
    vae.requires_grad_(True)
    vae.eval()
    return vae


@torch.no_grad()
def vae_psnr(vae: CogVideoXVAE, count: int = 32, split: str = "held_out", seed: int = 12345) -> float:
    """Mean PSNR (dB, 8-bit frames) of VAE reconstructions of world videos from `split`."""
    psnrs = []
    for start in range(0, count, 8):
        x = render_batch(seed, range(start, min(start + 8, count)), split)
        y = vae.decode(vae.encode(x).mode())
        a = ((x + 1) * 127.5).round().clamp(0, 255)
        b = ((y + 1) * 127.5).round().clamp(0, 255)
        mse = (a - b).square().flatten(1).mean(1)
        psnrs += (10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))).tolist()
    return float(np.mean(psnrs))


@torch.no_grad()
def judged_reconstructions(vae: CogVideoXVAE, scenes, batch: int = 8):
    """(scene, the judge's verdict on its VAE reconstruction) for each scene, `batch` videos at a time."""
    from .judge import judge

    scenes = list(scenes)
    for start in range(0, len(scenes), batch):
        chunk = scenes[start : start + batch]
        x = torch.stack([world.to_model_range(world.render(scene)) for scene in chunk])
        for scene, video in zip(chunk, vae.decode(vae.encode(x).mode())):
            yield scene, judge(to_uint8_frames(video))


def vae_judged(vae: CogVideoXVAE, count: int = 48, split: str = "held_out", seed: int = 12345) -> float:
    """Fraction of VAE reconstructions of world videos that the judge reads correctly (colour and
    direction): the ceiling of the whole model's score, since every generated video passes the decoder."""
    scenes = (world.sample_scene(np.random.default_rng([seed, i]), split) for i in range(count))
    return sum(verdict.matches(scene.caption) for scene, verdict in judged_reconstructions(vae, scenes)) / count


# ---------------------------------------------------------------------------------------- latents


def latent_foreground(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, F, H, W] mask of the object -> [B, F', 1, H/8, W/8] on the latent grid (latents' layout).

    A latent frame covers the first frame alone, then four frames each (the VAE is causal in time), and
    a latent pixel an 8 x 8 block; a latent cell counts as object when any pixel it covers does.
    """
    temporal, spatial = VAE_CONFIG.temporal_compression, VAE_CONFIG.spatial_compression
    return torch.stack([latent_mask(m, temporal, spatial) for m in foreground(x)[:, 0]])


@torch.no_grad()
def encode_dataset(vae: CogVideoXVAE, work: Path, count: int, seed: int, progress: bool):
    """Latents [N, F, C, h, w] (unscaled VAE means), the caption of each and its object mask on the
    latent grid [N, F, 1, h, w], cached in `work`."""
    from tqdm.auto import tqdm

    # The latents depend on the encoder alone: a retrained encoder invalidates the cache (and starts the
    # transformer afresh), a decoder trained on its own does not.
    encoder = vae.encoder.state_dict().values()
    digest = hashlib.sha1(b"".join(v.numpy().tobytes() for v in encoder)).hexdigest()[:12]
    path = work / f"latents-{count}-{seed}-{digest}.safetensors"
    if path.is_file():
        data = load_file(str(path))
        captions = json.loads(path.with_suffix(".json").read_text())
        if "masks" in data:
            return data["latents"], data["masks"], captions, digest
    dataset = world.WorldDataset(count, seed=seed)
    latents, masks, captions = [], [], []
    for start in tqdm(range(0, count, 16), desc="encode latents", disable=not progress):
        idx = range(start, min(start + 16, count))
        x = torch.stack([dataset[i][0] for i in idx])
        captions += [dataset.scene(i).caption for i in idx]
        latents.append(vae.encode(x).mode().permute(0, 2, 1, 3, 4).contiguous())  # [B, F, C, h, w]
        masks.append(latent_foreground(x))
    latents, masks = torch.cat(latents), torch.cat(masks)
    save_file({"latents": latents, "masks": masks}, str(path))
    path.with_suffix(".json").write_text(json.dumps(captions))
    return latents, masks, captions, digest


# ------------------------------------------------------------------------------------ transformer


def train_transformer(
    latents: torch.Tensor,
    masks: torch.Tensor,
    captions: list[str],
    text: TextEncoder,
    work: Path,
    steps: int,
    batch: int,
    seed: int,
    progress: bool,
    object_weight: float = 10.0,
    lr: float = 5e-4,
    init: Path | None = None,
    layers: int = TRANSFORMER_CONFIG.num_layers,
) -> CogVideoXTransformer:
    """The CogVideoX objective with the latent cells the object covers weighted `object_weight` x.

    The object covers a few percent of the latent grid: with a plain mean the loss is mostly the flat
    background, which the caption's background word alone predicts, and the model learns the object's
    colour and motion slowly. Weighting its cells puts the caption's other words back into the loss.

    init: a model folder (or its `transformer/`) whose weights start the run instead of random ones, to
    carry a trained transformer over to the latents of a changed VAE; a checkpoint in `work` still wins.
    layers: the depth; an `init` with fewer blocks is grown to it with identity blocks (`train.grow`).
    """
    unique = sorted(set(captions))
    assert not any(world.is_held_out(c) for c in unique), "a held-out caption reached training"
    table = text.encode(unique + [""], max_sequence_length=TEXT_TOKENS)  # [U + 1, L, D]; last = empty
    caption_index = torch.tensor([unique.index(c) for c in captions])
    empty = len(unique)
    ab = alphas_cumprod(SCHEDULER_CONFIG)
    torch.manual_seed(seed)
    model = CogVideoXTransformer(TRANSFORMER_CONFIG.replace(num_layers=layers))
    if init is not None:
        fresh = grow_depth(model, component_weights(init, "transformer"))  # same depth: a plain strict load
        if fresh:
            print(f"transformer: grown to {layers} blocks, new blocks {fresh} start as the identity")
    f, _, h, w = latents.shape[1:]
    rope = model.rotary_embedding(f, h, w, "cpu")

    def loss_fn(m, step, gen):
        idx = torch.randint(0, latents.shape[0], (batch,), generator=gen)
        keep = torch.rand(batch, generator=gen) >= 0.1  # caption dropout for classifier-free guidance
        tokens = torch.where(keep, caption_index[idx], torch.full_like(idx, empty))
        weight = 1.0 + (object_weight - 1.0) * masks[idx]
        return v_loss(m, latents[idx], table[tokens], ab, gen, rotary=rope, weight=weight)

    cfg = TrainConfig(steps=steps, lr=lr, weight_decay=0.01, warmup_steps=200, min_lr_ratio=0.1,
                      ema_decay=0.998, seed=seed, checkpoint_every=250, log_every=10)
    summary = train(model, loss_fn, cfg, work, name="transformer", progress=progress)
    print(f"transformer: {summary['step']} steps, loss {summary['loss'] or float('nan'):.4f}, {summary['seconds']:.0f} s")
    model.eval()
    return model


# ------------------------------------------------------------------------------------------- main


def write_model(out: Path, text_dir: Path, vae: CogVideoXVAE, scaling_factor: float, transformer) -> None:
    """The official folder layout, as `Pipeline.from_pretrained` and the reference read it."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer", "text_encoder"):
        if (out / name).exists():
            shutil.rmtree(out / name)
        shutil.copytree(text_dir / name, out / name)
    for name, module, config in (
        ("vae", vae, VAE_CONFIG.replace(scaling_factor=scaling_factor)),
        ("transformer", transformer, transformer.config),
    ):
        (out / name).mkdir(exist_ok=True)
        config.save(out / name / "config.json")
        state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(out / name / "diffusion_pytorch_model.safetensors"))
    (out / "scheduler").mkdir(exist_ok=True)
    SCHEDULER_CONFIG.save(out / "scheduler" / "scheduler_config.json")
    (out / "sampling.json").write_text(json.dumps(SAMPLING, indent=2) + "\n")
    (out / "model_index.json").write_text(json.dumps(model_index(), indent=2) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m cogvideox.demo.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("runs/demo"), help="checkpoints, caches and logs")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "weights",
                   help="where the finished model folder goes (default: the package's demo weights)")
    p.add_argument("--vae-steps", type=int, default=1500, help="general VAE steps (random crops)")
    p.add_argument("--vae-object-steps", type=int, default=2000, help="object-focused VAE steps")
    p.add_argument("--vae-colour-steps", type=int, default=1200,
                   help="colour-phase VAE steps (objects on black and white backgrounds stressed)")
    p.add_argument("--vae-decoder-steps", type=int, default=0,
                   help="decoder-only VAE steps after the others (the latents, and so the transformer, stay valid)")
    p.add_argument("--vae-hue-steps", type=int, default=0,
                   help="decoder-only VAE steps with objects of any hue, after the decoder phase")
    p.add_argument("--vae-joint-steps", type=int, default=0,
                   help="encoder and decoder steps on objects of any hue with noisy latents, after the others")
    p.add_argument("--latent-noise", type=float, default=0.0,
                   help="std of the noise added to the latents in the joint phase, in latent stds")
    p.add_argument("--vae-init", type=Path, default=None,
                   help="start the VAE from this model folder (or its vae/) and run only the colour phase")
    p.add_argument("--vae-batch", type=int, default=8,
                   help="videos a VAE step on crops; the phases on whole frames take min(4, this)")
    p.add_argument("--vae-eval-videos", type=int, default=48,
                   help="held-out videos the trained VAE is scored on (PSNR on up to 32 of them, the judge on "
                        "all): the summary's vae_psnr_held_out_db and vae_judged_correct_held_out")
    p.add_argument("--videos", type=int, default=6144, help="training videos encoded to latents")
    p.add_argument("--steps", type=int, default=2500,
                   help="transformer training steps (0: train the VAE phases alone and write no model)")
    p.add_argument("--transformer-init", type=Path, default=None,
                   help="start the transformer from this model folder's weights (e.g. after a VAE change)")
    p.add_argument("--transformer-layers", type=int, default=TRANSFORMER_CONFIG.num_layers,
                   help="transformer depth; a shallower --transformer-init is grown to it (new blocks start "
                        "as the identity)")
    p.add_argument("--transformer-lr", type=float, default=5e-4, help="transformer peak learning rate")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--object-weight", type=float, default=10.0,
                   help="loss weight of the latent cells the object covers (the rest weigh 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.vae_eval_videos < 1:
        p.error(f"--vae-eval-videos must be at least 1, got {args.vae_eval_videos}")
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    times = {}

    t0 = time.time()
    text = build_text_encoder(work, seed=args.seed)
    vae = train_vae(work, args.vae_steps, args.vae_object_steps, args.vae_batch, args.seed, progress,
                    colour=args.vae_colour_steps, init=args.vae_init,
                    decoder=args.vae_decoder_steps, hues=args.vae_hue_steps, joint=args.vae_joint_steps,
                    latent_noise=args.latent_noise)
    times["vae_s"] = time.time() - t0
    psnr = vae_psnr(vae, count=min(32, args.vae_eval_videos))
    judged = vae_judged(vae, count=args.vae_eval_videos)
    print(f"vae reconstruction on held-out videos: PSNR {psnr:.2f} dB, judged correct {judged:.1%}")
    summary = {
        "vae_psnr_held_out_db": round(psnr, 2),
        "vae_judged_correct_held_out": round(judged, 4),
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    if args.steps == 0:
        summary.update(vae_s=round(times["vae_s"]), total_s=round(time.time() - t0))
        (work / "build-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary, indent=2))
        print("VAE phases done; --steps 0 asks for no transformer, so no model folder was written")
        return

    t1 = time.time()
    latents, masks, captions, digest = encode_dataset(vae, work, args.videos, args.seed + 7, progress)
    scaling_factor = float(1.0 / latents.std())
    times["encode_s"] = time.time() - t1

    t2 = time.time()
    # Checkpoints are kept per latent set (a retrained VAE starts the transformer afresh) and per depth.
    depth = "" if args.transformer_layers == TRANSFORMER_CONFIG.num_layers else f"-L{args.transformer_layers}"
    model = train_transformer(latents * scaling_factor, masks, captions, text,
                              work / f"transformer-{digest}{depth}", args.steps, args.batch, args.seed, progress,
                              object_weight=args.object_weight, lr=args.transformer_lr,
                              init=args.transformer_init, layers=args.transformer_layers)
    times["transformer_s"] = time.time() - t2

    write_model(args.out, work, vae, scaling_factor, model)
    summary.update(scaling_factor=scaling_factor, **{k: round(v) for k, v in times.items()},
                   total_s=round(time.time() - t0))
    (work / "build-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"demo model written to {args.out}")


if __name__ == "__main__":
    main()
