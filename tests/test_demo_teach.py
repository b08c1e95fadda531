"""The teach-orange experiment end to end at smoke size: clips rendered, a LoRA trained on the demo
model, videos generated and judged with and without it, a report written; a rerun reuses every stage."""

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from cogvideox import InputError, read_video
from cogvideox.demo import teach as teach_module
from cogvideox.demo import world
from cogvideox.demo.judge import judge
from cogvideox.demo.teach import TeachConfig, caption_subset, teach

SMOKE = dict(clips=3, replay=0.34, steps=2, batch_size=1, rank=4, checkpoint_every=1, seeds=1,
             orange_captions=2, base_captions=2, inference_steps=2, eval_batch=4, progress=False)
SMOKE_FLAGS = ["--clips", "3", "--replay", "0.34", "--steps", "2", "--batch-size", "1", "--rank", "4", "--seeds", "1",
               "--orange-captions", "2", "--base-captions", "2", "--inference-steps", "2", "--eval-batch", "4",
               "--no-progress"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    work = tmp_path_factory.mktemp("teach")
    config = TeachConfig(work=str(work), **SMOKE)
    return config, work, teach(config)


def test_training_clips_are_orange_plus_base_training_replay(smoke):
    config, work, _ = smoke
    rows = [json.loads(line) for line in (work / "data" / "metadata.jsonl").read_text().splitlines()]
    assert (config.orange_clips, config.replay_clips) == (2, 1) and len(rows) == 3
    assert [r["caption"] for r in rows[:2]] == list(world.extra_captions()[:2])
    assert rows[2]["caption"] in world.training_captions()  # replay never shows a held-out caption
    manifest = json.loads((work / "data" / "manifest.json").read_text())
    assert manifest["counts"] == {"orange": 2, "replay": 1}
    for row in rows:
        frames, fps = read_video(work / "data" / row["video"])
        assert frames.shape == (world.FRAMES, world.HEIGHT, world.WIDTH, 3) and fps == 8
        # What the fine-tune sees after the MP4 round trip still reads as the caption's colour and motion.
        assert judge(frames, world.colours(include_extra=True)).matches(row["caption"])
        # Its mask marks the object: every pixel far from the background colour, and little else.
        mask, mask_fps = read_video(work / "data" / row["mask"])
        assert mask.shape == frames.shape and mask_fps == 8
        bright = mask.mean(-1) > 127
        object_pixels = np.abs(frames.astype(int) - frames[:, :1, :1].astype(int)).max(-1) > 60
        assert object_pixels.any() and bright[object_pixels].all()
        assert bright.mean() < 4 * object_pixels.mean()  # the object grown by its outline, not the frame


def test_a_lora_is_trained_on_the_demo_model(smoke):
    _, work, report = smoke
    run = work / "run"
    losses = [json.loads(line) for line in (run / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == [1, 2]
    assert report["finetune"]["final_loss"] == losses[-1]["loss"]
    assert (run / "checkpoints" / "step-2.pt").is_file()
    weights = load_file(str(work / report["finetune"]["lora"]))
    b = [v for k, v in weights.items() if k.endswith("lora_B.weight")]
    assert b and all(v.shape[1] == 4 for v in b)  # rank 4
    assert max(v.abs().max() for v in b) > 0  # trained away from the zero start
    trained = json.loads((run / "config.json").read_text())
    assert trained["model"] is None  # the shipped demo model
    assert trained["mask_weight"] == 10.0  # the object's latent cells weighted as in the model's own training


def test_report_structure_and_numbers(smoke):
    config, work, report = smoke
    assert json.loads((work / "report.json").read_text()) == report
    assert report["stages"] == {"data": "rendered", "finetune": "trained",
                                "evaluate": dict.fromkeys(["orange-model", "base-model", "orange-model-lora",
                                                           "base-model-lora"], "generated")}
    expected = {"orange": caption_subset(world.extra_captions(), 2), "base": caption_subset(world.all_captions(), 2)}
    for name in ("orange", "base"):
        for variant in ("model", "model+lora"):
            part = report["evaluation"][name][variant]
            stored = json.loads((work / "eval" / f"{teach_module.part_name(name, variant)}.json").read_text())["score"]
            videos = stored["per_video"]
            assert [v["caption"] for v in videos] == list(expected[name]) and {v["seed"] for v in videos} == {0}
            assert part["videos"] == 2
            # The shares are those of the per-video verdicts.
            for key, field in (("accuracy", "correct"), ("colour_accuracy", "colour_correct"),
                               ("direction_accuracy", "direction_correct"), ("seen_orange", "seen_orange")):
                assert part[key] == round(sum(v[field] for v in videos) / 2, 4)
            for v in videos:
                colour, _, direction, _ = world.parse_caption(v["caption"], include_extra=True)
                assert v["correct"] == (v["colour"] == colour and v["direction"] == direction)
    s = report["summary"]
    assert s["orange_accuracy"] == report["evaluation"]["orange"]["model+lora"]["accuracy"]
    assert s["base_accuracy_before"] == report["evaluation"]["base"]["model"]["accuracy"]
    assert s["orange_learned"] == (s["orange_accuracy"] >= 0.8)
    assert s["base_kept"] == (s["base_accuracy_after"] >= s["base_accuracy_before"] - 0.05)
    table = teach_module.table(report)
    assert "orange learned (>= 80% correct)" in table and "base subset" in table
    vae = report["vae_reconstructs_orange"]
    assert vae["videos"] == 2 and len(vae["failures"]) == round(2 * (1 - vae["orange"]))
    assert f"the VAE gives back orange as orange: {vae['orange']:.1%} of 2" in table


def test_the_vae_check_reads_orange_through_the_vae(tmp_path):
    """The shipped VAE never saw orange: the check must say so (it reads it as another colour), and every
    failure names the caption and the colour read."""
    result = teach_module.vae_draws_orange(TeachConfig(work=str(tmp_path), orange_captions=4, progress=False))
    assert result["videos"] == 4
    assert result["orange"] == 0.0
    assert all(f.startswith("a orange ") and "reconstructed as" in f for f in result["failures"])


def test_sample_videos_are_written(smoke):
    _, work, _ = smoke
    names = sorted(p.name for p in (work / "samples").glob("*.mp4"))
    assert names == ["base-model-lora-seed0.mp4", "base-model-seed0.mp4", "orange-model-lora-seed0.mp4",
                     "orange-model-seed0.mp4"]
    frames, _ = read_video(work / "samples" / "orange-model-lora-seed0.mp4")
    assert frames.shape == (world.FRAMES, world.HEIGHT, world.WIDTH, 3)


def test_rerun_from_the_command_line_reuses_every_stage(smoke, capsys):
    _, work, first = smoke
    loss_log = (work / "run" / "loss.jsonl").read_text()
    assert teach_module.main(["--work", str(work), *SMOKE_FLAGS]) == 0
    out = capsys.readouterr().out
    assert "orange learned" in out and "old concepts kept" in out
    report = json.loads((work / "report.json").read_text())
    assert report["stages"]["data"] == "reused" and report["stages"]["finetune"] == "reused"
    assert set(report["stages"]["evaluate"].values()) == {"reused"}
    assert report["evaluation"] == first["evaluation"]
    assert (work / "run" / "loss.jsonl").read_text() == loss_log


def test_other_data_or_training_settings_in_the_same_work_folder_are_refused(smoke):
    _, work, _ = smoke
    with pytest.raises(InputError, match="other settings"):
        teach(TeachConfig(work=str(work), **(SMOKE | {"clips": 4})))
    with pytest.raises(InputError, match=r"trained with lr 0.001; give another --work folder or --lr 0.001"):
        teach(TeachConfig(work=str(work), **(SMOKE | {"lr": 3e-3})))
    refused = r"trained with mask_weight 10; give another --work folder or --mask-weight 10"
    with pytest.raises(InputError, match=refused):
        teach(TeachConfig(work=str(work), **(SMOKE | {"mask_weight": 5.0})))


def test_a_data_folder_rendered_without_masks_is_rendered_again(tmp_path):
    config = TeachConfig(work=str(tmp_path), **SMOKE)
    folder, reused = teach_module.make_data(config)
    assert not reused
    # What the data stage wrote before masks existed: no "masks" setting, rows without a mask.
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["settings"]["masks"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"video": r["video"], "caption": r["caption"]}) + "\n"
                                                   for r in rows))
    for row in rows:
        (folder / row["mask"]).unlink()
    assert teach_module.make_data(config) == (folder, False)
    again = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert again == rows and all((folder / r["mask"]).is_file() for r in again)
    assert teach_module.make_data(config) == (folder, True)


def test_config_mistakes(tmp_path, capsys):
    with pytest.raises(InputError, match="leave no orange clip"):
        TeachConfig(work=str(tmp_path), clips=2, replay=0.9)
    with pytest.raises(InputError, match="replay must be a share"):
        TeachConfig(work=str(tmp_path), replay=1.0)
    with pytest.raises(InputError, match="orange_captions must be at most 36"):
        TeachConfig(work=str(tmp_path), orange_captions=37)
    with pytest.raises(InputError, match="mask_weight must be positive, got 0"):
        TeachConfig(work=str(tmp_path), mask_weight=0)
    assert teach_module.main(["--work", str(tmp_path / "w"), "--replay", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "replay must be a share in [0, 1)" in err
    assert not (tmp_path / "w").exists()
