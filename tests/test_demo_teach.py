"""The teach experiment end to end at smoke size, for the default concept "diagonally" and for orange:
clips rendered, a LoRA trained on the demo model, videos generated and judged with and without it, a
report written; a rerun reuses every stage."""

import json
import shutil

import numpy as np
import pytest
from safetensors.torch import load_file

from cogvideox import InputError, read_video
from cogvideox.demo import teach as teach_module
from cogvideox.demo import world
from cogvideox.demo.judge import judge
from cogvideox.demo.teach import TeachConfig, caption_subset, teach

SMOKE = dict(clips=3, replay=0.34, steps=2, batch_size=1, rank=4, checkpoint_every=1, seeds=1,
             concept_captions=2, base_captions=2, inference_steps=2, eval_batch=4, progress=False)
SMOKE_FLAGS = ["--concept", "diagonally", "--clips", "3", "--replay", "0.34", "--steps", "2", "--batch-size", "1",
               "--rank", "4", "--seeds", "1", "--concept-captions", "2", "--base-captions", "2", "--inference-steps",
               "2", "--eval-batch", "4", "--no-progress"]
DIAGONAL = world.directions(include_extra=True)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    work = tmp_path_factory.mktemp("teach")
    config = TeachConfig(work=str(work), **SMOKE)
    assert config.concept == "diagonally"  # the default
    return config, work, teach(config)


def test_training_clips_are_the_concept_plus_base_training_replay(smoke):
    config, work, _ = smoke
    rows = [json.loads(line) for line in (work / "data" / "metadata.jsonl").read_text().splitlines()]
    assert (config.concept_clips, config.replay_clips) == (2, 1) and len(rows) == 3
    assert [r["caption"] for r in rows[:2]] == list(world.concept_captions("diagonally")[:2])
    assert [r["video"] for r in rows] == ["clips/diagonally-0000.mp4", "clips/diagonally-0001.mp4",
                                          "clips/replay-0002.mp4"]
    assert rows[2]["caption"] in world.training_captions()  # replay never shows a held-out caption
    manifest = json.loads((work / "data" / "manifest.json").read_text())
    assert manifest["counts"] == {"diagonally": 2, "replay": 1}
    assert manifest["settings"]["concept"] == "diagonally"
    assert manifest["settings"]["diagonally_vector"] == list(world.direction_vector("diagonally"))
    for row in rows:
        frames, fps = read_video(work / "data" / row["video"])
        assert frames.shape == (world.FRAMES, world.HEIGHT, world.WIDTH, 3) and fps == 8
        # What the fine-tune sees after the MP4 round trip still reads as the caption's colour and motion.
        assert judge(frames, directions=DIAGONAL).matches(row["caption"])
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
    assert report["concept"] == report["summary"]["concept"] == "diagonally"
    assert report["stages"] == {"data": "rendered", "finetune": "trained",
                                "evaluate": dict.fromkeys(["concept-model", "base-model", "concept-model-lora",
                                                           "base-model-lora"], "generated")}
    expected = {"concept": caption_subset(world.concept_captions("diagonally"), 2),
                "base": caption_subset(world.all_captions(), 2)}
    for name in ("concept", "base"):
        for variant in ("model", "model+lora"):
            part = report["evaluation"][name][variant]
            stored = json.loads((work / "eval" / f"{teach_module.part_name(name, variant)}.json").read_text())["score"]
            videos = stored["per_video"]
            assert [v["caption"] for v in videos] == list(expected[name]) and {v["seed"] for v in videos} == {0}
            assert part["videos"] == 2
            # The shares are those of the per-video verdicts.
            for key, field in (("accuracy", "correct"), ("colour_accuracy", "colour_correct"),
                               ("direction_accuracy", "direction_correct"), ("seen_concept", "seen_concept")):
                assert part[key] == round(sum(v[field] for v in videos) / 2, 4)
            for v in videos:
                colour, _, direction, _ = world.parse_caption(v["caption"], include_extra=True)
                assert v["correct"] == (v["colour"] == colour and v["direction"] == direction)
                # A concept caption's verdict is the extended palette's, so it alone can say "diagonally".
                assert v["seen_concept"] >= (v["direction"] == "diagonally")
                if name == "base":
                    assert v["direction"] != "diagonally"  # judged as demo.evaluate judges: base palettes
    s = report["summary"]
    concept = report["evaluation"]["concept"]["model+lora"]
    assert s["concept_accuracy"] == concept["accuracy"]
    assert s["concept_direction_accuracy"] == concept["direction_accuracy"]
    assert s["concept_accuracy_without_lora"] == report["evaluation"]["concept"]["model"]["accuracy"]
    assert s["base_accuracy_before"] == report["evaluation"]["base"]["model"]["accuracy"]
    assert s["base_seen_concept_after"] == report["evaluation"]["base"]["model+lora"]["seen_concept"]
    assert s["concept_learned"] == (s["concept_accuracy"] >= 0.8)
    assert s["base_kept"] == (s["base_accuracy_after"] >= s["base_accuracy_before"] - 0.05)
    table = teach_module.table(report)
    assert "diagonally learned (>= 80% correct)" in table and "base subset" in table and "seen diagonally" in table
    vae = report["vae_reconstructs_concept"]
    assert vae["concept"] == "diagonally"
    assert vae["videos"] == 2 and len(vae["failures"]) == round(2 * (1 - vae["seen_concept"]))
    assert f"diagonally seen in the VAE's reconstructions: {vae['seen_concept']:.1%} of 2" in table


def test_the_vae_check_reads_each_concept_through_the_vae(tmp_path):
    """The shipped VAE never saw orange: the check must say so (it reads it as another colour), and every
    failure names the caption and the colour and direction read. It draws the diagonal motion."""
    config = TeachConfig(work=str(tmp_path), concept="orange", concept_captions=4, progress=False)
    result = teach_module.vae_draws_concept(config)
    assert (result["concept"], result["videos"], result["seen_concept"]) == ("orange", 4, 0.0)
    assert len(result["failures"]) == 4
    for failure in result["failures"]:
        caption, seen = failure.split(": reconstructed as ")
        colour, direction = seen.split()
        assert caption.startswith("a orange ") and colour in world.COLOURS and direction in world.DIRECTIONS
    result = teach_module.vae_draws_concept(TeachConfig(work=str(tmp_path), concept_captions=4, progress=False))
    assert (result["concept"], result["videos"]) == ("diagonally", 4)
    assert result["seen_concept"] >= 0.75 and len(result["failures"]) == round(4 * (1 - result["seen_concept"]))


def test_sample_videos_are_written(smoke):
    _, work, _ = smoke
    names = sorted(p.name for p in (work / "samples").glob("*.mp4"))
    assert names == ["base-model-lora-seed0.mp4", "base-model-seed0.mp4", "concept-model-lora-seed0.mp4",
                     "concept-model-seed0.mp4"]
    frames, _ = read_video(work / "samples" / "concept-model-lora-seed0.mp4")
    assert frames.shape == (world.FRAMES, world.HEIGHT, world.WIDTH, 3)


def test_rerun_from_the_command_line_reuses_every_stage(smoke, capsys):
    _, work, first = smoke
    loss_log = (work / "run" / "loss.jsonl").read_text()
    assert teach_module.main(["--work", str(work), *SMOKE_FLAGS]) == 0
    out = capsys.readouterr().out
    assert "diagonally learned" in out and "old concepts kept" in out
    report = json.loads((work / "report.json").read_text())
    assert report["stages"]["data"] == "reused" and report["stages"]["finetune"] == "reused"
    assert set(report["stages"]["evaluate"].values()) == {"reused"}
    assert report["evaluation"] == first["evaluation"]
    assert (work / "run" / "loss.jsonl").read_text() == loss_log


def test_other_data_or_training_settings_in_the_same_work_folder_are_refused(smoke):
    _, work, _ = smoke
    refused = r"holds clips of the concept 'diagonally'; give another --work folder or --concept diagonally"
    with pytest.raises(InputError, match=refused):
        teach_module.make_data(TeachConfig(work=str(work), **(SMOKE | {"concept": "orange"})))
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
    with pytest.raises(InputError, match="leave no diagonally clip"):
        TeachConfig(work=str(tmp_path), clips=2, replay=0.9)
    with pytest.raises(InputError, match="replay must be a share"):
        TeachConfig(work=str(tmp_path), replay=1.0)
    with pytest.raises(InputError, match="unknown concept 'up-right'; choose one of orange, diagonally"):
        TeachConfig(work=str(tmp_path), concept="up-right")
    # The concept sets how many captions there are to evaluate; all of them by default.
    assert TeachConfig(work=str(tmp_path)).concept_captions == 54
    assert TeachConfig(work=str(tmp_path), concept="orange").concept_captions == 36
    with pytest.raises(InputError, match="concept_captions must be at most 54"):
        TeachConfig(work=str(tmp_path), concept_captions=55)
    with pytest.raises(InputError, match="concept_captions must be at most 36"):
        TeachConfig(work=str(tmp_path), concept="orange", concept_captions=37)
    with pytest.raises(InputError, match="mask_weight must be positive, got 0"):
        TeachConfig(work=str(tmp_path), mask_weight=0)
    assert teach_module.main(["--work", str(tmp_path / "w"), "--replay", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "replay must be a share in [0, 1)" in err
    assert teach_module.main(["--work", str(tmp_path / "w"), "--concept", "pink"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown concept 'pink'; choose one of orange, diagonally" in err
    assert not (tmp_path / "w").exists()


def test_evaluation_parts_are_kept_per_concept(smoke, tmp_path):
    """The same captions, model and LoRA judged for another concept are generated again: the concept sets
    the judge's palettes, so it is part of each part's key."""
    _, work, report = smoke
    copy = tmp_path / "work"
    shutil.copytree(work, copy)
    lora = copy / report["finetune"]["lora"]
    config = TeachConfig(work=str(copy), **SMOKE)
    assert set(teach_module.evaluate_parts(config, lora)[1].values()) == {"reused"}
    orange = TeachConfig(work=str(copy), **(SMOKE | {"concept": "orange"}))
    parts, how = teach_module.evaluate_parts(orange, lora)
    assert set(how.values()) == {"generated"}
    assert {v["caption"] for v in parts[("concept", "model")]["per_video"]} <= set(world.concept_captions("orange"))


def test_teach_orange_end_to_end(tmp_path, capsys):
    """The colour concept through the command line at the smallest size, and a data folder rendered
    before there was a choice of concept (no "concept" in its manifest) is orange's."""
    flags = ["--concept", "orange", "--clips", "2", "--replay", "0.34", "--steps", "1", "--batch-size", "1",
             "--rank", "4", "--seeds", "1", "--concept-captions", "1", "--base-captions", "1",
             "--inference-steps", "2", "--no-progress"]
    assert teach_module.main(["--work", str(tmp_path), *flags]) == 0
    out = capsys.readouterr().out
    assert "orange learned (>= 80% correct)" in out and "seen orange" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["concept"] == report["summary"]["concept"] == "orange"
    assert report["vae_reconstructs_concept"]["concept"] == "orange"
    assert report["data"] == {"folder": "data", "concept_clips": 1, "replay_clips": 1}
    rows = [json.loads(line) for line in (tmp_path / "data" / "metadata.jsonl").read_text().splitlines()]
    assert rows[0] == {"video": "clips/orange-0000.mp4", "caption": world.concept_captions("orange")[0],
                       "mask": "masks/orange-0000.mp4"}
    for name in ("concept", "base"):
        for variant in ("model", "model+lora"):
            [video] = json.loads((tmp_path / "eval" / f"{teach_module.part_name(name, variant)}.json").read_text())[
                "score"]["per_video"]
            if name == "concept":
                assert video["caption"] in world.concept_captions("orange")
            assert video["seen_concept"] >= (video["colour"] == "orange")
            assert video["direction"] in world.DIRECTIONS + ("unknown",)  # orange's palette: base directions
    manifest_path = tmp_path / "data" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["settings"]["orange_rgb"] == list(world.EXTRA_COLOUR_RGB["orange"])
    del manifest["settings"]["concept"]
    manifest_path.write_text(json.dumps(manifest))
    config = TeachConfig(work=str(tmp_path), concept="orange", clips=2, replay=0.34)
    assert teach_module.make_data(config) == (tmp_path / "data", True)
    with pytest.raises(InputError, match="holds clips of the concept 'orange'"):
        teach_module.make_data(TeachConfig(work=str(tmp_path), clips=2, replay=0.34))
