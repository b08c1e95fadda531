"""Latents on disk and the VAE alone: generate --output NAME.safetensors, cogvideox decode and encode.

Decoded latents give the direct run's video exactly; encoding matches the reference VAE's posterior mean
times its scaling factor; every mistake is one line."""

import json

import numpy as np
import pytest
import torch
from helpers import sample_frames

from cogvideox import InputError, LatentVideo, Pipeline, VideoAutoencoder, read_video
from cogvideox.cli import main
from cogvideox.fast.oom import out_of_vae_memory
from cogvideox.video import read_metadata

SMALL = dict(height=32, width=48, num_inference_steps=2, max_sequence_length=8)
FLAGS = ["--steps", "2", "--quiet"]


@pytest.mark.parametrize("variant", ["rope", "1.5"])
def test_saved_latents_decode_to_the_direct_video(variant, tiny_rope_dir, tiny_v15_dir, tmp_path):
    folder = {"rope": tiny_rope_dir, "1.5": tiny_v15_dir}[variant]
    pipe = Pipeline.from_pretrained(folder)
    direct = pipe("a cat", seed=4, **SMALL)
    stopped = pipe("a cat", seed=4, output_type="latent", **SMALL)
    assert stopped.frames is None
    one = stopped.latents[0, stopped.padding_frames :]  # 1.5 drops its padding frame, as decoding does
    LatentVideo(one, str(folder), 8, record={"prompt": "a cat"}).save(tmp_path / "cat.safetensors")

    loaded = LatentVideo.load(tmp_path / "cat.safetensors")
    assert torch.equal(loaded.latents, one) and loaded.latents.dtype == one.dtype
    assert (loaded.model, loaded.fps, loaded.made_by, loaded.record) == (str(folder), 8, "generate", {"prompt": "a cat"})
    assert loaded.num_frames == direct.frames[0].shape[0]
    video = VideoAutoencoder.from_pretrained(folder).decode(loaded.latents)
    assert np.array_equal(video, direct.frames[0])


def test_encode_matches_the_reference_vae(tiny_rope_dir):
    diffusers = pytest.importorskip("diffusers")
    frames = sample_frames(9, 40, 56)
    ours = VideoAutoencoder.from_pretrained(tiny_rope_dir).encode(frames, 32, 48, resize="crop")

    reference = diffusers.AutoencoderKLCogVideoX.from_pretrained(tiny_rope_dir / "vae").eval()
    from cogvideox.conditioning import prepare_video  # the pipeline's own pixels, checked against the reference

    with torch.no_grad():
        mean = reference.encode(prepare_video(frames, 32, 48, "crop")).latent_dist.mode()
    expected = (reference.config.scaling_factor * mean)[0].permute(1, 0, 2, 3)
    assert ours.shape == expected.shape == (3, 4, 4, 6)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_decode_checks_the_latents_fit(tiny_rope_dir):
    vae = VideoAutoencoder.from_pretrained(tiny_rope_dir)
    with pytest.raises(InputError, match=r"latents of shape \[3, 16, 4, 6\] do not fit this VAE: it decodes "
                                         r"\[frames, 4, height/8, width/8\]"):  # fmt: skip
        vae.decode(torch.zeros(3, 16, 4, 6))


def test_the_vae_alone_takes_tiling_and_slicing_as_true_or_false(tiny_rope_dir):
    for flag in ("tiling", "slicing"):
        with pytest.raises(InputError, match=f"{flag} must be True or False, got 'false'"):
            VideoAutoencoder.from_pretrained(tiny_rope_dir, **{flag: "false"})
    assert VideoAutoencoder.from_pretrained(tiny_rope_dir, tiling=True).vae.use_tiling


def test_the_vae_alone_refuses_what_it_cannot_encode_or_decode(tiny_rope_dir):
    """Frames the VAE would drop, sizes it would crop, latents that are not a tensor: one-line errors,
    not a shorter or smaller video, nor a traceback from torch or PIL."""
    vae = VideoAutoencoder.from_pretrained(tiny_rope_dir)
    frames = sample_frames(9, 32, 48)
    for call, message in [
        (lambda: vae.encode(frames[:4]), r"the VAE encodes 4k\+1 frames, got 4; use the first 1"),
        (lambda: vae.encode(sample_frames(9, 30, 46)), "the frames' height 30 is not a multiple of 8: give height="),
        (lambda: vae.encode(frames, 20, 48), "height must be a positive multiple of 8, got 20"),
        (lambda: vae.encode(frames, 32, 0), "width must be a positive multiple of 8, got 0"),
        (lambda: vae.encode(frames, -32, 48), "height must be a positive multiple of 8, got -32"),
        (lambda: vae.encode(frames[0]), r"expected frames shaped \[F, H, W, 3\]"),
        (lambda: vae.decode(np.zeros((3, 4, 4, 6), np.float32)), "latents must be a torch tensor .*, got ndarray"),
        (lambda: vae.decode(torch.zeros(0, 4, 4, 6)), r"latents of shape \[0, 4, 4, 6\] are empty"),
        (lambda: vae.decode(torch.zeros(3, 4, 4, 6, device="meta")), "latents must be on the CPU or a GPU, got "
                                                                     "them on meta"),
        (lambda: vae.decode(torch.zeros(3, 4, 4, 6), progress="no"), "progress must be True or False, got 'no'"),
    ]:
        with pytest.raises(InputError, match=message):
            call()
    # What the pipeline takes as frames, the VAE takes too: a list of frames, floats in [0, 1], a tensor.
    want = vae.encode(frames)
    assert torch.equal(vae.encode(list(frames)), want)
    assert torch.equal(vae.encode(torch.from_numpy(frames)), want)
    assert vae.encode(frames.astype(np.float32) / 255).shape == want.shape


def test_a_latent_video_holds_one_videos_tensor():
    latents = torch.zeros(3, 4, 4, 6)
    for kwargs, message in [
        (dict(latents=latents.numpy()), r"must be one video's tensor \[frames, channels, height, width\], got ndarray"),
        (dict(latents=latents[None]), r"got \[1, 3, 4, 4, 6\]"),  # a pipeline's batch: take one video of it
        (dict(latents=latents, made_by="decode"), "made_by must be one of generate, encode, got 'decode'"),
        (dict(latents=latents.int()), "latents must be floating-point, got torch.int32"),
        (dict(latents=latents, fps="8"), "fps must be a positive number, got '8'"),
        (dict(latents=latents, fps=float("nan")), "fps must be a positive number, got nan"),
        (dict(latents=latents, fps=-1), "fps must be a positive number, got -1"),
        (dict(latents=latents, model=3), "model must be a str or None, got 3"),
        (dict(latents=latents, record="x"), "record must be a dict or None, got 'x'"),
        (dict(latents=latents, source=3), "source must be a str or None, got 3"),
    ]:
        with pytest.raises(InputError, match=message):
            LatentVideo(**(dict(model=None, fps=8) | kwargs))


@pytest.mark.parametrize(
    "method, path, message",
    [
        ("save", None, "path must be a file name .* got None"),
        ("save", "", "path must be a file name .* got ''"),
        ("save", 3, "path must be a file name .* got 3"),
        ("save", ".", r"path \. is a folder; give a file name such as"),
        ("save", "x.mp4", "path x.mp4: the latents are written as safetensors; give a name such as x.safetensors"),
        ("save", "missing/x.safetensors", "path folder missing does not exist"),
        ("load", None, "path must be a file name .* got None"),
        ("load", 3, "path must be a file name .* got 3"),
    ],
)
def test_a_latent_videos_path_is_checked(tmp_path, monkeypatch, method, path, message):
    """An IsADirectoryError, OSError or TypeError before, and a safetensors file written under a .mp4 name."""
    monkeypatch.chdir(tmp_path)
    video = LatentVideo(latents=torch.zeros(3, 4, 4, 6), model=None, fps=8)
    with pytest.raises(InputError, match=message):
        video.save(path) if method == "save" else LatentVideo.load(path)
    assert list(tmp_path.iterdir()) == []


def test_out_of_memory_in_the_vae_names_the_flag():
    message = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
               "1.00 GiB is free.")  # fmt: skip

    class Vae:
        use_tiling, use_slicing = False, False

    error = out_of_vae_memory("decode", message, Vae())
    assert str(error) == "out of GPU memory in VAE decoding: it asked for 2.00 GiB more with 1.00 GiB free; try --vae-tiling"
    Vae.use_tiling = True
    assert out_of_vae_memory("encode", message, Vae()).suggestion == "fewer --frames, a smaller --height/--width"


def test_generate_to_latents_then_decode_gives_the_same_video(capsys, tmp_path):
    direct, latents = tmp_path / "direct-%02d.png", tmp_path / "ball.safetensors"
    argv = ["generate", "a red ball moves up", "--seed", "3", *FLAGS]
    assert main([*argv, "-o", str(direct)]) == 0
    capsys.readouterr()
    assert main([*argv, "-o", str(latents)]) == 0
    out = capsys.readouterr().out
    assert "wrote " + str(latents) + " (latents 5x8x8x12 for 17 frames at 96x64, 8 fps, seed 3)" in out
    assert f"make the video with: cogvideox decode {latents}" in out
    assert not list(tmp_path.glob("*.mp4"))  # nothing decoded

    assert main(["decode", str(latents), "--quiet"]) == 0  # default name: the latents' with .mp4
    assert "wrote " + str(tmp_path / "ball.mp4") + " (17 frames, 96x64, 8 fps)" in capsys.readouterr().out
    assert main(["decode", str(latents), "-o", str(tmp_path / "decoded-%02d.png"), "--quiet"]) == 0
    for i in range(17):  # lossless frames: pixel for pixel
        assert (tmp_path / f"decoded-{i:02d}.png").read_bytes() == (tmp_path / f"direct-{i:02d}.png").read_bytes()
    # The generation's record travels through the latents into the video.
    assert read_metadata(tmp_path / "ball.mp4") == read_metadata(tmp_path / "direct-00.png")
    # At another rate, the record says the rate the file plays at.
    assert main(["decode", str(latents), "-o", str(tmp_path / "slow.gif"), "--fps", "4", "--quiet"]) == 0
    assert read_video(tmp_path / "slow.gif")[1] == 4
    assert read_metadata(tmp_path / "slow.gif") == read_metadata(tmp_path / "ball.mp4") | {"fps": 4}
    capsys.readouterr()
    assert main(["info", str(latents)]) == 0
    assert "again: cogvideox generate 'a red ball moves up' --seed 3" in capsys.readouterr().out


def test_latents_the_folder_refuses_are_saved_elsewhere_and_the_others_written(capsys, tmp_path, monkeypatch):
    """The folder took files at the start but not at the end (a full disk): no generation is lost."""
    import tempfile

    save, refused = LatentVideo.save, tmp_path / "ball-1.safetensors"

    def disk_full_for_one(self, path):
        if path == refused:
            raise OSError(28, "No space left on device")
        return save(self, path)

    monkeypatch.setattr(LatentVideo, "save", disk_full_for_one)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "rescue"))
    (tmp_path / "rescue").mkdir()
    argv = ["generate", "a red ball", "--num-videos", "2", "--frames", "9", "-o", str(tmp_path / "ball.safetensors")]
    assert main([*argv, *FLAGS]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cogvideox: error: could not write {refused} ([Errno 28] No space left on device); the "
                          f"latents file was saved to {tmp_path / 'rescue'}")  # fmt: skip
    assert err.count("\n") == 1 and not refused.exists()
    rescued = LatentVideo.load(next((tmp_path / "rescue").glob("*/ball-1.safetensors")))
    assert rescued.record["video_number"] == [1, 2]
    assert LatentVideo.load(tmp_path / "ball-2.safetensors").record["video_number"] == [2, 2]


def test_encode_writes_the_latents_and_the_round_trip(capsys, tiny_rope_dir, tmp_path):
    from cogvideox import export_video

    export_video(sample_frames(9, 40, 56), tmp_path / "in.mp4", fps=8)
    source = read_video(tmp_path / "in.mp4")[0]
    latents, round_trip = tmp_path / "in.safetensors", tmp_path / "round.mp4"
    argv = ["encode", str(tmp_path / "in.mp4"), "-o", str(latents), "--reconstruct", str(round_trip),
            "--model", str(tiny_rope_dir), "--height", "32", "--width", "48", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("encoded 9 frames at 48x32 into latents 3x4x4x6 | wrote ")
    assert "dB against the input" in out

    saved = LatentVideo.load(latents)
    assert (saved.made_by, saved.model, saved.fps, saved.source) == ("encode", str(tiny_rope_dir.resolve()), 8,
                                                                     str(tmp_path / "in.mp4"))  # fmt: skip
    expected = VideoAutoencoder.from_pretrained(tiny_rope_dir).encode(source, 32, 48)
    torch.testing.assert_close(saved.latents, expected, rtol=0, atol=0)
    # decode finds the model the latents name, and makes the round trip's video again.
    assert main(["decode", str(latents), "-o", str(tmp_path / "again.mp4"), "--quiet"]) == 0
    assert np.array_equal(read_video(tmp_path / "again.mp4")[0], read_video(round_trip)[0])
    capsys.readouterr()
    assert main(["info", str(latents)]) == 1
    assert capsys.readouterr().out.strip() == f"{latents}: latents of {tmp_path / 'in.mp4'} made by cogvideox " \
                                              "encode (no generation to record)"


def test_encode_every_frame_reconstructs_at_the_videos_own_rate(capsys, tiny_rope_dir, tmp_path):
    """--video-fps source takes the frames as stored: the round trip plays at the file's 10 fps, and the
    latents record it for decode."""
    from cogvideox import export_video

    export_video(sample_frames(9, 32, 48), tmp_path / "in.mp4", fps=10)
    latents, round_trip = tmp_path / "in.safetensors", tmp_path / "round.mp4"
    assert main(["encode", str(tmp_path / "in.mp4"), "-o", str(latents), "--reconstruct", str(round_trip),
                 "--video-fps", "source", "--model", str(tiny_rope_dir), "--quiet"]) == 0  # fmt: skip
    assert read_video(round_trip)[1] == 10 and LatentVideo.load(latents).fps == 10
    assert main(["decode", str(latents), "-o", str(tmp_path / "again.mp4"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["info", str(round_trip), str(tmp_path / "again.mp4")]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{path}: the VAE round trip of {tmp_path / 'in.mp4'} by cogvideox encode (no generation to record)"
        for path in (round_trip, tmp_path / "again.mp4")]  # fmt: skip


def test_encode_reads_the_png_frames_export_writes(capsys, tiny_rope_dir, tmp_path):
    """A PNG sequence (the lossless output) is an input too: the same latents as the frames themselves."""
    from cogvideox import export_video

    frames = sample_frames(9, 32, 48)
    (tmp_path / "frames").mkdir()
    export_video(frames, tmp_path / "frames" / "%04d.png")
    latents = tmp_path / "in.safetensors"
    assert main(["encode", str(tmp_path / "frames" / "%04d.png"), "-o", str(latents), "--model", str(tiny_rope_dir),
                 "--height", "32", "--width", "48", "--quiet"]) == 0  # fmt: skip
    expected = VideoAutoencoder.from_pretrained(tiny_rope_dir).encode(frames, 32, 48)
    torch.testing.assert_close(LatentVideo.load(latents).latents, expected, rtol=0, atol=0)
    capsys.readouterr()


def test_info_describes_an_inversion_instead_of_refusing_it(capsys, tmp_path):
    from cogvideox.inversion import Inversion

    request = dict(prompt="a cat", negative_prompt="", guidance_scale=1.0, num_inference_steps=3, num_frames=9,
                   height=32, width=48, max_sequence_length=8)  # fmt: skip
    inverted = Inversion(torch.zeros(1, 3, 4, 4, 6), **request).save(tmp_path / "inv.safetensors")
    assert main(["info", str(inverted)]) == 1  # no generation record, as encoded latents
    out = capsys.readouterr()
    assert out.err == "" and out.out == (f"{inverted}: noise of a DDIM inversion (cogvideox invert) of 9 frames at "
                                         f"48x32 in 3 steps, prompt 'a cat'; sample it with: cogvideox regenerate "
                                         f"{inverted}\n")  # fmt: skip


def test_mistakes_are_one_line(capsys, tmp_path):
    from cogvideox import export_video

    export_video(sample_frames(9, 40, 56), tmp_path / "in.mp4", fps=8)
    inverted = tmp_path / "inv.safetensors"
    from safetensors.torch import save_file

    from cogvideox import inversion

    save_file({"latents": torch.zeros(1)}, str(inverted), metadata={"format": inversion.FORMAT, "request": "{}"})
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(1)}, str(foreign))
    gone = tmp_path / "gone.safetensors"
    LatentVideo(torch.zeros(3, 8, 8, 12), str(tmp_path / "deleted-model"), 8).save(gone)
    video = str(tmp_path / "in.mp4")
    cases = [
        (["decode", video], "in.mp4 is not a latents file: those are .safetensors files written by cogvideox generate"),
        (["decode", str(tmp_path / "none.safetensors")], "no latents file at"),
        (["decode", str(inverted)], "holds inverted noise (cogvideox invert); sample it with cogvideox regenerate"),
        (["decode", str(foreign)], "holds no latent video"),
        (["decode", str(gone)], "the latents were made with the model in " + str(tmp_path / "deleted-model")),
        (["decode", str(gone), "-o", str(tmp_path / "x.avi")], "videos are written as MP4"),
        (["encode", video], "nothing to write: give --output LATENTS.safetensors and/or --reconstruct VIDEO.mp4"),
        (["encode", video, "-o", str(tmp_path / "l.pt")], "the latents are written as safetensors; give a name "
                                                         "such as l.safetensors"),
        (["encode", video, "-o", str(tmp_path / "l.safetensors"), "--height", "60"], "--height must be a multiple "
                                                                                      "of 8, got 60"),
        (["encode", video, "-o", str(tmp_path / "l.safetensors"), "--frames", "8"], "num_frames must be 8k+1"),
        (["generate", "a cat", "-o", str(tmp_path / "l.safetensors"), "--extend", video], "--extend writes the "
                                                                                          "video with its continuation"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("cogvideox: error: ") and message in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "l.safetensors").exists()


def test_latent_files_are_safetensors_with_readable_metadata(tmp_path):
    from safetensors import safe_open

    path = LatentVideo(torch.ones(2, 4, 3, 5, dtype=torch.bfloat16), None, 16, "encode", source="a.mp4").save(
        tmp_path / "l.safetensors"
    )
    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == ["latents"] and f.get_tensor("latents").dtype == torch.bfloat16
        metadata = f.metadata()
    assert metadata["format"] == "cogvideox-latents"
    fields = json.loads(metadata["video"])
    assert fields == {"model": None, "fps": 16, "made_by": "encode", "record": None, "source": "a.mp4"}
    assert not list(tmp_path.glob(".*"))  # no temporary file left beside it


def test_the_vae_alone_needs_and_downloads_only_its_own_weights(tiny_rope_dir, tmp_path, monkeypatch):
    """`decode --model REPO` on a machine without the model fetches the configs and the VAE, not the
    transformer or T5 (20 GB of a 5B model against its VAE's few hundred MB)."""
    import fnmatch
    import shutil

    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    fetched = []

    def snapshot_download(repo_id, revision=None, allow_patterns=(), local_files_only=False, **kwargs):
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        folder = tmp_path / "hub" / repo_id.replace("/", "--")
        for file in tiny_rope_dir.rglob("*"):
            name = file.relative_to(tiny_rope_dir).as_posix()
            if file.is_file() and any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, folder / name)
                fetched.append(name)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    latents = VideoAutoencoder.from_pretrained(tiny_rope_dir).encode(sample_frames(9, 32, 48))
    vae = VideoAutoencoder.from_pretrained("tiny/cogvideox")
    assert "vae/diffusion_pytorch_model.safetensors" in fetched and "transformer/config.json" in fetched
    assert not [name for name in fetched if name.startswith(("transformer/", "text_encoder/")) and
                name.endswith(".safetensors")], fetched  # fmt: skip
    reference = VideoAutoencoder.from_pretrained(tiny_rope_dir).decode(latents)
    assert np.array_equal(vae.decode(latents), reference)
    # The whole pipeline, from the same partial folder, names what it lacks.
    from cogvideox import LoadError, loading

    with pytest.raises(LoadError, match="missing transformer/diffusion_pytorch_model.safetensors"):
        loading.check_model_dir(tmp_path / "hub" / "tiny--cogvideox")


def test_a_file_about_to_be_replaced_is_said_so(capsys, tiny_rope_dir, tmp_path):
    latents = tmp_path / "l.safetensors"
    LatentVideo(torch.zeros(3, 4, 4, 6), str(tiny_rope_dir), 8).save(latents)
    (tmp_path / "l.mp4").write_bytes(b"old")
    assert main(["decode", str(latents), "--quiet"]) == 0
    assert "l.mp4 exists and will be replaced by the decoded video" in capsys.readouterr().err
    assert read_video(tmp_path / "l.mp4")[0].shape == (9, 32, 48, 3)
    # A refused request replaces nothing, and does not say it will.
    before = latents.read_bytes()
    argv = ["encode", str(tmp_path / "l.mp4"), "-o", str(latents), "--frames", "8", "--model", str(tiny_rope_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cogvideox: error: num_frames must be 8k+1") and err.count("\n") == 1
    assert latents.read_bytes() == before
    # Nor does a decode the model refuses.
    wrong = tmp_path / "wrong.safetensors"
    LatentVideo(torch.zeros(3, 5, 4, 6), str(tiny_rope_dir), 8).save(wrong)
    (tmp_path / "wrong.mp4").write_bytes(b"old")
    assert main(["decode", str(wrong), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "do not fit this VAE" in err and "will be replaced" not in err
    assert (tmp_path / "wrong.mp4").read_bytes() == b"old"


def test_the_vae_alone_turns_running_out_of_gpu_memory_into_advice(tiny_rope_dir, monkeypatch):
    """The pipeline's out-of-memory guard serves the VAE alone too: an untiled decode tries again in tiles
    (with a warning); a tiled one that still runs out says what is left to try."""
    vae = VideoAutoencoder.from_pretrained(tiny_rope_dir)
    tries = []

    def out_of_memory(z):
        tries.append(vae.vae.use_tiling)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                          "capacity of 79.19 GiB of which 1.00 GiB is free.")  # fmt: skip

    monkeypatch.setattr(vae.vae, "decode", out_of_memory)
    from cogvideox.errors import OutOfMemoryError

    with pytest.warns(UserWarning, match="try --vae-tiling; decoding again in tiles"):
        with pytest.raises(OutOfMemoryError, match="out of GPU memory in VAE decoding: it asked for 2.00 GiB more "
                                                   "with 1.00 GiB free; try fewer --frames"):  # fmt: skip
            vae.decode(torch.zeros(3, 4, 4, 6))
    assert tries == [False, True] and not vae.vae.use_tiling  # tiling was for the retry only


@pytest.mark.parametrize(
    "fields, why",
    [
        ({"fps": "8"}, "fps is '8', not a positive number"),
        ({"fps": None}, "fps is None, not a positive number"),
        ({"model": 5}, "model is 5, not a str"),
        ({"record": ["a cat"]}, "record is ['a cat'], not a dict"),
        ({"record": "a cat"}, "record is 'a cat', not a dict"),
        ({"source": 5, "made_by": "encode"}, "source is 5, not a str"),
        ({"made_by": ["encode"]}, "made_by is ['encode'], not one of generate, encode"),
    ],
    ids=["fps text", "fps null", "model number", "record list", "record text", "source number", "made_by list"],
)
def test_latents_metadata_of_the_wrong_type_is_one_line_naming_the_file(capsys, tmp_path, fields, why):
    """An edited or damaged file: info and decode stopped with an AttributeError or TypeError traceback, or
    later, in the middle of the decode."""
    from safetensors.torch import save_file

    path = tmp_path / "l.safetensors"
    video = {"model": None, "fps": 8, "made_by": "generate", "record": None, "source": None} | fields
    save_file({"latents": torch.zeros(2, 8, 4, 6)}, str(path), metadata={"format": "cogvideox-latents",
                                                                          "video": json.dumps(video)})
    for command in ("info", "decode"):
        assert main([command, str(path), "--quiet"] if command == "decode" else [command, str(path)]) == 2
        err = capsys.readouterr().err
        assert err == f"cogvideox: error: cannot read {path} as latents: its metadata is damaged ({why})\n"
    assert not (tmp_path / "l.mp4").exists()


@pytest.mark.parametrize(
    "latents, why",
    [(torch.full((2, 8, 4, 6), float("nan")), "the latents hold NaN or infinite values"),
     (torch.zeros(2, 8, 4, 6, dtype=torch.int32), "latents must be floating-point, got torch.int32")],
    ids=["nan", "int"],
)
def test_latents_that_cannot_make_a_video_are_refused_before_decoding(capsys, tmp_path, latents, why):
    """NaN latents (from a run whose sampling failed) decoded to a video of garbage, written without a word."""
    video = LatentVideo(latents.float(), None, 8)
    video.latents = latents  # as an edited or foreign file holds them
    path = video.save(tmp_path / "l.safetensors")
    assert main(["decode", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cogvideox: error: {why}") and err.count("\n") == 1
    assert not (tmp_path / "l.mp4").exists()
