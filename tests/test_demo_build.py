"""The demo model's training code: tokenizer, object-centred crops, the CogVideoX objective, exact resume."""

import json

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
