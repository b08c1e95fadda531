"""The demo model's training code: tokenizer, object-centred crops, the CogVideoX objective, exact resume."""

import json

import pytest
import torch

from cogvideox.demo import build, world
from cogvideox.models.config import SchedulerConfig, TransformerConfig
from cogvideox.models.transformer import CogVideoXTransformer
from cogvideox.schedulers import alphas_cumprod
from cogvideox.train.loop import TrainConfig, train
from cogvideox.train.objective import noisy_latents, v_loss, velocity


def test_tokenizer_has_one_piece_per_caption_word(tmp_path):
    text = build.build_text_encoder(tmp_path)
    vocab = build.vocabulary()
    for word in vocab:
        ids = text.tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] != text.tokenizer.unk_token_id, word
    longest = max(len(text.tokenizer(c).input_ids) for c in world.all_captions())
    assert longest <= build.TEXT_TOKENS
    states = text.encode(["a red circle moving up on a gray background", "a red circle moving down on a gray background"],
                         max_sequence_length=build.TEXT_TOKENS)
    assert states.shape == (2, build.TEXT_TOKENS, build.T5_DIM)
    assert not torch.allclose(states[0], states[1])


def test_object_crops_keep_the_object():
    x = build.render_batch(3, range(6))
    crops = build.object_crops(x, 32, 48, torch.Generator().manual_seed(0))
    assert crops.shape == (6, 3, world.FRAMES, 32, 48)
    fg = build.foreground(crops)
    # The object is in the crop in most frames of every video.
    assert (fg.flatten(3).amax(-1).mean(-1) > 0.6).all()


def test_velocity_inverts_to_clean_latents():
    ab = torch.tensor(0.3)
    x0, noise = torch.randn(4, 5), torch.randn(4, 5)
    xt = noisy_latents(x0, noise, ab)
    v = velocity(x0, noise, ab)
    # The v-prediction identity the schedulers use: x0 = sqrt(ab) x_t - sqrt(1 - ab) v.
    assert torch.allclose(ab.sqrt() * xt - (1 - ab).sqrt() * v, x0, atol=1e-6)


def tiny_problem():
    cfg = TransformerConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                            time_embed_dim=32, text_embed_dim=8, num_layers=2, sample_width=4,
                            sample_height=4, sample_frames=9, max_text_seq_length=4,
                            use_rotary_positional_embeddings=True)
    torch.manual_seed(0)
    model = CogVideoXTransformer(cfg)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(8, 3, 4, 4, 4, generator=g) * 0.5 + torch.linspace(-1, 1, 4).view(1, 1, 4, 1, 1)
    text = torch.randn(8, 4, 8, generator=g)
    ab = alphas_cumprod(SchedulerConfig())
    rope = model.rotary_embedding(3, 4, 4, "cpu")

    def loss_fn(m, step, gen):
        idx = torch.randint(0, 8, (4,), generator=gen)
        return v_loss(m, latents[idx], text[idx], ab, gen, rotary=rope)

    return model, loss_fn


def test_transformer_training_lowers_the_loss_and_resumes_bit_identically(tmp_path):
    cfg = dict(lr=3e-3, log_every=1, checkpoint_every=10, ema_decay=0.9)
    model, loss_fn = tiny_problem()
    train(model, loss_fn, TrainConfig(steps=60, **cfg), tmp_path / "a", name="t", progress=False)
    lines = (tmp_path / "a" / "t-loss.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines]
    assert len(losses) == 60
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])

    interrupted, loss_fn = tiny_problem()
    train(interrupted, loss_fn, TrainConfig(steps=25, **cfg), tmp_path / "b", name="t", progress=False)
    resumed, loss_fn = tiny_problem()
    train(resumed, loss_fn, TrainConfig(steps=60, **cfg), tmp_path / "b", name="t", progress=False)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_latent_foreground_marks_the_cells_the_object_covers():
    x = build.render_batch(4, range(3))  # [3, 3, 17, 64, 96]
    mask = build.latent_foreground(x)
    assert mask.shape == (3, 5, 1, 8, 12)  # the latents' [B, F, C, h, w] layout
    pixels = build.foreground(x)[:, 0]  # [3, 17, 64, 96]
    # Latent frame 0 covers pixel frame 0; latent frame k covers frames 4k-3 .. 4k.
    for k, frames in enumerate([[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]):
        covered = pixels[:, frames].amax(1).unflatten(1, (8, 8)).unflatten(3, (12, 8)).amax((2, 4))
        assert torch.equal(mask[:, k, 0], covered)
    # A small object (with its path over four frames): a fraction of the 96 cells, never none.
    cells = mask.sum((2, 3, 4))
    assert (cells >= 1).all() and (cells <= 24).all()


def test_weighted_v_loss_is_the_weighted_mean_of_the_plain_one():
    model, _ = tiny_problem()
    g = torch.Generator().manual_seed(3)
    x0, text = torch.randn(2, 3, 4, 4, 4, generator=g), torch.randn(2, 4, 8, generator=g)
    ab = alphas_cumprod(SchedulerConfig())
    rope = model.rotary_embedding(3, 4, 4, "cpu")
    plain = v_loss(model, x0, text, ab, torch.Generator().manual_seed(0), rotary=rope)
    ones = v_loss(model, x0, text, ab, torch.Generator().manual_seed(0), rotary=rope, weight=torch.ones(2, 3, 1, 4, 4))
    assert torch.allclose(plain, ones, rtol=1e-6)
    # All weight on one cell: the loss is that cell's squared error alone.
    weight = torch.zeros(2, 3, 1, 4, 4)
    weight[1, 2, 0, 1, 3] = 5.0
    one_cell = v_loss(model, x0, text, ab, torch.Generator().manual_seed(0), rotary=rope, weight=weight)
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(0, ab.shape[0], (2,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    a = ab[t].float().view(-1, 1, 1, 1, 1)
    with torch.no_grad():
        pred = model(noisy_latents(x0, noise, a), text, t, image_rotary_emb=rope)
    err = (pred - velocity(x0, noise, a)) ** 2
    assert torch.allclose(one_cell, err[1, 2, :, 1, 3].mean(), rtol=1e-5)


def test_background_weights_steer_the_sampled_backgrounds():
    x = build.render_batch(5, range(12), backgrounds={"black": 1.0, "white": 0.0, "gray": 0.0})
    corners = x[:, :, 0, 0, 0]  # [B, 3]: the background colour in [-1, 1]
    assert torch.equal(corners, torch.full_like(corners, -1.0))
    # Without weights the usual mix appears, and the draw is reproducible.
    y = build.render_batch(5, range(12))
    assert torch.equal(y, build.render_batch(5, range(12)))
    assert len({tuple(c.tolist()) for c in y[:, :, 0, 0, 0]}) > 1


def test_decoder_phase_keeps_the_latents_and_their_cache(tmp_path):
    """The decoder-only phase must leave the encoder bit-identical (so the latent cache, keyed by the
    encoder alone, and a transformer trained on it stay valid) while it trains the decoder."""
    from safetensors.torch import save_file

    from cogvideox.models.vae import CogVideoXVAE

    torch.manual_seed(0)
    start = CogVideoXVAE(build.VAE_CONFIG)
    (tmp_path / "init" / "vae").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in start.state_dict().items()},
              str(tmp_path / "init" / "vae" / "diffusion_pytorch_model.safetensors"))
    vae = build.train_vae(tmp_path / "work", 0, 0, batch=1, seed=0, progress=False, colour=0,
                          init=tmp_path / "init", decoder=2)
    for (name, a), b in zip(start.state_dict().items(), vae.state_dict().values()):
        assert torch.equal(a, b) == (not name.startswith("decoder.")), name
    assert all(p.requires_grad for p in vae.parameters())
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    _, _, _, before = build.encode_dataset(start, tmp_path / "a", count=2, seed=1, progress=False)
    _, _, _, after = build.encode_dataset(vae, tmp_path / "b", count=2, seed=1, progress=False)
    assert before == after


def test_any_colour_paints_objects_off_the_palette():
    """VAE training may paint objects any saturated hue; with any_colour=0 the videos are unchanged."""
    import colorsys

    import numpy as np

    plain = build.render_batch(3, range(6))
    assert torch.equal(plain, build.render_batch(3, range(6), any_colour=0.0))
    painted = build.render_batch(3, range(6), any_colour=1.0)
    palette = [np.asarray(world.colour_rgb(c), dtype=np.float64) for c in world.COLOURS]
    for video in painted:
        rgb = ((video + 1) * 127.5).permute(1, 2, 3, 0).reshape(-1, 3).double().numpy()
        background = rgb[0]
        obj = rgb[np.abs(rgb - background).max(1) > 1e-3]
        core = np.unique(np.rint(obj), axis=0, return_counts=True)
        colour = core[0][np.argmax(core[1])]  # the fully covered pixels, the most frequent value
        h, s, v = colorsys.rgb_to_hsv(*(colour / 255))
        assert 0.79 <= s <= 0.93 and 0.73 <= v <= 0.98, (s, v)
        assert min(np.abs(colour - p).max() for p in palette) > 2  # not a palette colour (p ~ 0)


def test_latent_noise_phase_trains_the_encoder_and_moves_the_latents(tmp_path):
    """The joint phase trains encoder and decoder (with noisy latents), so the latent cache key changes,
    and its loss is the plain weighted reconstruction of noised latents."""
    from cogvideox.models.vae import CogVideoXVAE

    torch.manual_seed(0)
    start = CogVideoXVAE(build.VAE_CONFIG)
    loss_fn = build.object_loss(1, 6, full_frames_from=0, latent_noise=0.15)
    with torch.no_grad():
        noisy = loss_fn(start, 0, torch.Generator().manual_seed(3))
        # By hand: the same video, its latent means plus 0.15 x their std of the generator's noise.
        gen = torch.Generator().manual_seed(3)
        idx = torch.randint(0, 1 << 30, (1,), generator=gen).tolist()
        x = build.render_batch(6, idx)
        mean = start.encode(x).mode()
        weight = 1 + 9 * build.foreground(x)
        err = start.decode(mean + 0.15 * mean.std() * torch.randn(mean.shape, generator=gen)) - x
        expected = (weight * (err.abs() + 0.5 * err.square())).mean()
        err = start.decode(mean) - x
        plain = (weight * (err.abs() + 0.5 * err.square())).mean()
    assert torch.allclose(noisy, expected, rtol=1e-5)
    assert not torch.allclose(noisy, plain)  # the noise counts

    from safetensors.torch import save_file

    (tmp_path / "init" / "vae").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in start.state_dict().items()},
              str(tmp_path / "init" / "vae" / "diffusion_pytorch_model.safetensors"))
    vae = build.train_vae(tmp_path / "work", 0, 0, batch=1, seed=0, progress=False, colour=0,
                          init=tmp_path / "init", joint=2, latent_noise=0.15)
    changed = {name.split(".")[0] for (name, a), b in zip(start.state_dict().items(), vae.state_dict().values())
               if not torch.equal(a, b)}
    assert changed == {"encoder", "decoder"}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    _, _, _, before = build.encode_dataset(start, tmp_path / "a", count=2, seed=1, progress=False)
    _, _, _, after = build.encode_dataset(vae, tmp_path / "b", count=2, seed=1, progress=False)
    assert before != after


def saved_transformer_and_data(tmp_path):
    """A random 6-layer demo transformer saved as a model folder's `transformer/`, the text encoder, and
    two clips' latents, masks and captions: what `train_transformer(init=...)` starts from."""
    from safetensors.torch import save_file

    torch.manual_seed(5)
    trained = CogVideoXTransformer(build.TRANSFORMER_CONFIG)
    (tmp_path / "model" / "transformer").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()},
              str(tmp_path / "model" / "transformer" / "diffusion_pytorch_model.safetensors"))
    text = build.build_text_encoder(tmp_path / "text")
    latents = torch.randn(2, 5, build.LATENT_CHANNELS, 8, 12, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, 5, 1, 8, 12)
    captions = list(world.training_captions()[:2])
    return trained, (latents, masks, captions, text)


def test_transformer_can_start_from_a_trained_model(tmp_path):
    """`train_transformer(init=...)` carries weights over to new latents; without it the start is random."""
    trained, data = saved_transformer_and_data(tmp_path)
    kwargs = dict(steps=1, batch=2, seed=0, progress=False, lr=1e-12)
    carried = build.train_transformer(*data, tmp_path / "a", init=tmp_path / "model", **kwargs)
    fresh = build.train_transformer(*data, tmp_path / "b", **kwargs)
    for (name, a), b, c in zip(trained.state_dict().items(), carried.state_dict().values(), fresh.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name  # one step at lr 1e-12 moves nothing visible
    assert not all(torch.allclose(a, c) for a, c in zip(trained.state_dict().values(), fresh.state_dict().values()))


def test_transformer_init_is_grown_to_the_asked_depth_and_written_with_it(tmp_path):
    """`--transformer-layers 8` over a 6-layer model: its blocks carried over, the model folder says 8."""
    from cogvideox.models.vae import CogVideoXVAE

    trained, data = saved_transformer_and_data(tmp_path)
    grown = build.train_transformer(*data, tmp_path / "a", steps=1, batch=2, seed=0, progress=False, lr=1e-12,
                                    init=tmp_path / "model", layers=8)
    assert len(grown.transformer_blocks) == 8
    # 6 -> 8: the old blocks at 0, 1, 2, 4, 5, 6
    moved = grown.transformer_blocks[4].attn1.to_q.weight
    assert torch.allclose(moved, trained.transformer_blocks[3].attn1.to_q.weight, atol=1e-6)
    vae = CogVideoXVAE(build.VAE_CONFIG)
    build.write_model(tmp_path / "out", tmp_path / "text", vae, 1.0, grown)
    assert TransformerConfig.from_json(tmp_path / "out" / "transformer" / "config.json").num_layers == 8
    assert json.loads((tmp_path / "out" / "sampling.json").read_text()) == build.SAMPLING


def test_build_with_no_transformer_steps_trains_the_vae_alone(tmp_path, capsys):
    """`--steps 0`: the VAE phases run and are kept in the work folder; no latents, no model folder."""
    out = tmp_path / "model"
    build.main(["--work", str(tmp_path / "work"), "--out", str(out), "--vae-steps", "1", "--vae-object-steps", "1",
                "--vae-colour-steps", "0", "--vae-batch", "1", "--steps", "0", "--vae-eval-videos", "2",
                "--no-progress"])
    assert "no model folder was written" in capsys.readouterr().out
    assert not out.exists()
    work = tmp_path / "work"
    assert (work / "vae").is_dir() and (work / "vae-object").is_dir()
    assert not list(work.glob("latents-*")) and not list(work.glob("transformer-*"))
    summary = json.loads((work / "build-summary.json").read_text())
    assert summary["args"]["steps"] == "0" and "transformer_s" not in summary
    assert 0 <= summary["vae_judged_correct_held_out"] <= 1 and summary["args"]["vae_eval_videos"] == "2"


def test_build_refuses_an_empty_vae_evaluation(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        build.main(["--work", str(tmp_path / "work"), "--out", str(tmp_path / "model"), "--vae-eval-videos", "0"])
    assert exit_.value.code == 2
    assert "--vae-eval-videos must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
