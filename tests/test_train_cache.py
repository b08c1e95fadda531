"""The latent / T5 cache: written once, reused, replaced when the video or the model changes."""

import json

import numpy as np
import pytest
import torch
from helpers import make_video_folder, sample_frames

from cogvideox import loading
from cogvideox.train.cache import CachedDataset, latent_mask, precompute, read_latents, read_mask, read_text
from cogvideox.train.data import Bucket, load_masked_clip, scan_folder
from cogvideox.video import export_video

BUCKETS = [Bucket(9, 32, 48)]


@pytest.fixture(scope="module")
def components(tiny_rope_dir):
    cpu = torch.device("cpu")
    vae = loading.load_vae(tiny_rope_dir, torch.float32, cpu)
    text = loading.load_text_encoder(tiny_rope_dir, torch.float32, cpu)
    return vae, text


def run(root, vae, text, cache):
    clips, _ = scan_folder(root)
    return precompute(clips, BUCKETS, 8, vae, text, cache, max_sequence_length=16, progress=False)


def test_precompute_matches_a_direct_encode_and_is_reused(tmp_path, components):
    vae, text = components
    root = make_video_folder(tmp_path / "data")
    first = run(root, vae, text, tmp_path / "cache")
    assert first.encoded == 3
    reasons = {s.name: s.reason for s in first.skipped}
    assert sorted(reasons) == ["videos/corrupt.mp4", "videos/short.mp4"]
    assert reasons["videos/corrupt.mp4"].startswith("cannot decode")
    assert reasons["videos/short.mp4"] == "too short: 4 frames at 8 fps, the shortest bucket needs 9"
    assert [e.name for e in first.examples] == ["videos/clip0.mp4", "videos/clip1.mp4", "videos/clip2.mp4"]

    # The cached posterior is the VAE's own on the decoded clip, frames first.
    from cogvideox.train.data import load_clip

    video, _ = load_clip(scan_folder(root)[0][0], BUCKETS, 8)
    with torch.no_grad():
        posterior = vae.encode(video[None])
    mean, logvar = read_latents(first.examples[0])
    assert mean.shape == (3, 4, 4, 6)  # [F, C, h, w]
    assert torch.equal(mean, posterior.mean[0].permute(1, 0, 2, 3))
    assert torch.equal(logvar, posterior.logvar[0].permute(1, 0, 2, 3))
    states = read_text(first.examples[0].text)
    assert torch.equal(states, text.encode([first.examples[0].caption], 16)[0])
    assert torch.equal(read_text(first.empty_text), text.encode([""], 16)[0])

    second = run(root, vae, text, tmp_path / "cache")
    assert second.encoded == 0
    assert second.examples == first.examples


def test_a_changed_video_or_model_is_encoded_again(tmp_path, components):
    vae, text = components
    root = make_video_folder(tmp_path / "data", broken=False)
    first = run(root, vae, text, tmp_path / "cache")
    assert first.encoded == 3

    export_video(sample_frames(12, 40, 56, seed=99), root / "videos" / "clip1.mp4", fps=8)
    changed = run(root, vae, text, tmp_path / "cache")
    assert changed.encoded == 1
    assert changed.examples[1].latents != first.examples[1].latents
    assert changed.examples[0].latents == first.examples[0].latents

    tweaked = type(vae)(vae.config)
    tweaked.load_state_dict(vae.state_dict())
    with torch.no_grad():
        tweaked.encoder.conv_in.conv.weight[0, 0, 0, 0, 0] += 1e-3
    assert run(root, tweaked, text, tmp_path / "cache").encoded == 3
    # A caption's states are keyed by the T5 weights too.
    assert run(root, vae, text, tmp_path / "cache").encoded == 0


def test_new_decoding_rules_encode_the_videos_again(tmp_path, components, monkeypatch):
    """Latents cached when videos were read otherwise (before rotation or timestamps were honoured) are
    not reused; the T5 states, which the decoding does not touch, are."""
    from cogvideox.train import cache

    vae, text = components
    root = make_video_folder(tmp_path / "data", broken=False)
    assert run(root, vae, text, tmp_path / "cache").encoded == 3
    texts = sorted((tmp_path / "cache" / "text").iterdir())
    monkeypatch.setattr(cache, "_DECODING", "next")
    assert run(root, vae, text, tmp_path / "cache").encoded == 3
    assert sorted((tmp_path / "cache" / "text").iterdir()) == texts


def test_a_damaged_cache_entry_is_encoded_again(tmp_path, components):
    # A cache entry cut short (a full disk, an interrupted copy) or emptied must not stop the next run
    # with a safetensors traceback: it is encoded again, to the same values.
    vae, text = components
    root = make_video_folder(tmp_path / "data", broken=False)
    first = run(root, vae, text, tmp_path / "cache")
    mean, logvar = (t.clone() for t in read_latents(first.examples[0]))
    states = read_text(first.examples[1].text).clone()
    latents = first.examples[0].latents
    latents.write_bytes(latents.read_bytes()[:-10])
    first.examples[1].text.write_bytes(b"")
    again = run(root, vae, text, tmp_path / "cache")
    assert again.encoded == 1
    assert again.examples == first.examples
    assert all(torch.equal(a, b) for a, b in zip(read_latents(again.examples[0]), (mean, logvar)))
    assert torch.equal(read_text(again.examples[1].text), states)


def test_batches_come_from_one_bucket(tmp_path, components):
    vae, text = components
    root = tmp_path / "data"
    root.mkdir()
    lines = []
    for i, (h, w) in enumerate([(40, 64), (40, 64), (64, 40), (40, 64)]):
        export_video(sample_frames(12, h, w, seed=i), root / f"v{i}.mp4", fps=8)
        lines.append(f"v{i}.mp4")
    (root / "videos.txt").write_text("\n".join(lines))
    (root / "prompts.txt").write_text("a cat\na dog\na bird\na cat\n")
    clips, _ = scan_folder(root)
    prepared = precompute(clips, [Bucket(9, 32, 48), Bucket(9, 48, 32)], 8, vae, text, tmp_path / "c", 16, progress=False)
    data = CachedDataset(prepared)
    assert {str(b): len(v) for b, v in data.by_bucket.items()} == {"9x32x48": 3, "9x48x32": 1}
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx = data.draw(2, g)
        assert len({data.examples[i].bucket for i in idx}) == 1
    mean, logvar, states = data.batch([0, 1])
    assert mean.shape == (2, 3, 4, 4, 6) and logvar.shape == mean.shape and states.shape == (2, 16, 32)


# ----------------------------------------------------------------------------------------------------
# Masks on the latent grid


def test_latent_mask_takes_the_largest_value_each_cell_covers():
    # 9 frames of 16x24 pixels -> 3 latent frames (0 | 1-4 | 5-8) of 2x3 cells of 8x8 pixels.
    mask = torch.zeros(9, 16, 24)
    mask[0, 3, 10] = 1.0  # frame 0 alone -> latent frame 0, cell (0, 1)
    mask[2, 9, 23] = 0.75  # frames 1-4 -> latent frame 1, cell (1, 2)
    mask[4, 9, 16] = 0.5  # same cell, smaller
    mask[1, 0, 0] = 0.25  # latent frame 1, cell (0, 0)
    mask[5, 15, 7] = 0.5  # frames 5-8 -> latent frame 2, cell (1, 0)
    mask[8, 8, 0] = 1.0  # same cell, larger
    expected = torch.zeros(3, 1, 2, 3)
    expected[0, 0, 0, 1] = 1.0
    expected[1, 0, 1, 2] = 0.75
    expected[1, 0, 0, 0] = 0.25
    expected[2, 0, 1, 0] = 1.0
    assert torch.equal(latent_mask(mask, temporal=4, spatial=8), expected)
    # Another compression (2x in time, 4x in space) from the same function.
    assert latent_mask(mask, temporal=2, spatial=4).shape == (5, 1, 4, 6)


def _masked_data(root):
    """The three good clips of make_video_folder; clip1 gets a mask image over its square's path."""
    from PIL import Image

    root = make_video_folder(root, broken=False)
    image = np.zeros((40, 56, 3), np.uint8)
    image[4:30, 6:42] = 255
    Image.fromarray(image).save(root / "mask1.png")
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    rows[1]["mask"] = "mask1.png"
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_a_mask_is_cached_on_the_latent_grid_and_keyed_by_its_bytes(tmp_path, components):
    from PIL import Image

    vae, text = components
    plain = run(make_video_folder(tmp_path / "plain", broken=False), vae, text, tmp_path / "cache")
    root = _masked_data(tmp_path / "data")
    first = run(root, vae, text, tmp_path / "cache")
    # Only the masked clip is new: entries of clips without a mask keep their names.
    assert first.encoded == 1
    assert [e.masked for e in first.examples] == [False, True, False]
    assert first.examples[0].latents == plain.examples[0].latents
    assert first.examples[1].latents != plain.examples[1].latents

    clip = scan_folder(root)[0][1]
    _, pixels, _ = load_masked_clip(clip, BUCKETS, 8)
    cached = read_mask(first.examples[1])
    mean, _ = read_latents(first.examples[1])
    assert cached.shape == (3, 1, 4, 6) and mean.shape == (3, 4, 4, 6)
    assert torch.equal(cached, latent_mask(pixels, vae.config.temporal_compression, vae.config.spatial_compression))
    assert float(cached.max()) == 1.0 and float(cached.min()) == 0.0

    data = CachedDataset(first)
    assert data.has_masks
    assert data.masks([0, 2]) is None
    masks = data.masks([1, 0])
    assert masks.shape == (2, 3, 1, 4, 6)
    assert torch.equal(masks[0], cached) and not masks[1].any()

    # A changed mask file re-encodes that clip alone.
    image = np.zeros((40, 56, 3), np.uint8)
    image[0:8, 0:8] = 255
    Image.fromarray(image).save(root / "mask1.png")
    changed = run(root, vae, text, tmp_path / "cache")
    assert changed.encoded == 1
    assert changed.examples[1].latents != first.examples[1].latents
    assert [e.latents for e in changed.examples[::2]] == [e.latents for e in first.examples[::2]]
    assert float(read_mask(changed.examples[1])[:, 0, 1:, 1:].max()) == 0.0  # only the top-left cell
    assert run(root, vae, text, tmp_path / "cache").encoded == 0


def test_a_frame_rate_given_as_a_float_reads_the_entries_of_the_same_integer_rate(tmp_path, components):
    """`--fps 8` (a float) asks for the rate a run left at the model's 8 used: its clips are read back,
    not encoded again."""
    vae, text = components
    root = make_video_folder(tmp_path / "data", broken=False)
    assert run(root, vae, text, tmp_path / "cache").encoded == 3
    clips, _ = scan_folder(root)
    again = precompute(clips, BUCKETS, 8.0, vae, text, tmp_path / "cache", max_sequence_length=16, progress=False)
    assert again.encoded == 0
    other = precompute(clips, BUCKETS, 7.5, vae, text, tmp_path / "cache", max_sequence_length=16, progress=False)
    assert other.encoded == 3


def test_a_cache_entry_whose_header_nests_too_deep_is_not_intact(tmp_path):
    # "[[[[..." exhausts the JSON parser's recursion: a RecursionError stopped the run.
    from cogvideox.train.cache import _intact

    nested = b"[" * 100_000 + b"]" * 100_000
    entry = tmp_path / "entry.safetensors"
    entry.write_bytes(len(nested).to_bytes(8, "little") + nested)
    assert _intact(entry) is False
