"""The fine-tuning run: it learns, resumes bit for bit, writes a LoRA or a model folder, validates, trains
the same with compiled blocks, and several processes average their gradients."""

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli_rank, fail_training_at, free_port, join_or_fail, make_video_folder, start_processes
from safetensors.torch import load_file

from cogvideox import InputError, Pipeline, read_video
from cogvideox.train.checkpoint import step_generator
from cogvideox.train.config import FinetuneConfig
from cogvideox.train.finetune import Run, finetune, learning_rate


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_video_folder(tmp_path_factory.mktemp("data"))


def config(data_dir, model, out, **changes):
    values = dict(data=str(data_dir), output=str(out), model=str(model), buckets=["9x32x48"], rank=4, lr=1e-2,
                  warmup_steps=0, steps=6, checkpoint_every=3, progress=False)
    return FinetuneConfig(**(values | changes))


def losses(out):
    records = map(json.loads, (Path(out) / "loss.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"], r["lr"]) for r in records if "loss" in r]  # not the validation rounds' colours


def interrupt_at(monkeypatch, stop: int):
    """Ctrl-C at step `stop`; returns the original `Run.train_step`, to put back for the resumed run."""
    return fail_training_at(monkeypatch, stop, KeyboardInterrupt())


def test_a_few_lora_steps_lower_the_loss(data_dir, tiny_rope_dir, tmp_path):
    run = Run(config(data_dir, tiny_rope_dir, tmp_path, batch_size=2, lr=2e-2, caption_dropout=0.0))
    run.prepare_data()
    run.prepare_model()

    def held_loss():  # the same 16 draws (clips, t, noise) before and after
        with torch.no_grad():
            return sum(run.loss(step_generator(123, k)).item() for k in range(16)) / 16

    before = held_loss()
    for step in range(40):
        run.train_step(step)
    assert held_loss() < 0.8 * before


def test_run_reports_skipped_videos_and_writes_a_lora(data_dir, tiny_rope_dir, tmp_path, capsys):
    path = finetune(config(data_dir, tiny_rope_dir, tmp_path, steps=2, validation_every=2,
                           validation_prompts=["a cat sits on the mat"], validation_steps=2))
    assert path == tmp_path / "pytorch_lora_weights.safetensors"
    out = capsys.readouterr().out
    for line in ("skipped videos/nocaption.mp4: no caption", "skipped videos/corrupt.mp4: cannot decode",
                 "skipped videos/short.mp4: too short: 4 frames at 8 fps"):
        assert line in out
    assert "videos/corrupt.mp4: cannot decode" in (tmp_path / "skipped.txt").read_text()
    assert [s for s, _, _ in losses(tmp_path)] == [1, 2]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    frames, fps = read_video(tmp_path / "validation" / "step-2-0.mp4")
    assert frames.shape == (9, 32, 48, 3) and fps == 8
    # Step 0 is the base model's round, the reference; each round's colours are in the log.
    assert (tmp_path / "validation" / "step-0-0.mp4").is_file()
    rounds = [r for r in map(json.loads, (tmp_path / "loss.jsonl").read_text().splitlines()) if "loss" not in r]
    assert [r["step"] for r in rounds] == [0, 2] and all(0 <= r["validation_saturation"][0] <= 1 for r in rounds)
    # The result loads back and matches the trained adapter.
    pipe = Pipeline.from_pretrained(tiny_rope_dir, lora=path)
    saved = load_file(str(path))
    key = "transformer.transformer_blocks.1.attn1.to_v.lora_B.weight"
    assert torch.equal(pipe.transformer.transformer_blocks[1].attn1.to_v.lora_B[path.parent.name].weight,
                       saved[key])
    assert saved[key].abs().max() > 0  # trained away from its zero start


@pytest.mark.parametrize("kind", ["lora", "full-cpu-offload"])
def test_resume_after_an_interruption_is_bit_identical(data_dir, tiny_rope_dir, tmp_path, monkeypatch, kind):
    extra = dict(full=True, optimizer="adamw-cpu", lr=1e-3) if kind == "full-cpu-offload" else {}
    extra |= dict(grad_accum=2, schedule="cosine", warmup_steps=2)
    straight = finetune(config(data_dir, tiny_rope_dir, tmp_path / "a", **extra))

    original = interrupt_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        finetune(config(data_dir, tiny_rope_dir, tmp_path / "b", **extra))
    # Step 4, done since the checkpoint of step 3, is saved as the run stops.
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-3.pt", "step-4.pt"]
    monkeypatch.setattr(Run, "train_step", original)
    resumed = finetune(config(data_dir, tiny_rope_dir, tmp_path / "b", **extra))

    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert len(losses(tmp_path / "a")) == 6
    # The log's clock runs on across the restart: the resumed steps do not start from 0 s again.
    seconds = [json.loads(line)["seconds"] for line in (tmp_path / "b" / "loss.jsonl").read_text().splitlines()]
    assert seconds == sorted(seconds) and seconds[3] >= seconds[2]
    if kind == "lora":
        a, b = load_file(str(straight)), load_file(str(resumed))
    else:
        a = load_file(str(straight / "transformer" / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(resumed / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                    reason="Inductor's CPU backend needs a C compiler")  # fmt: skip
def test_compiled_lora_training_matches_eager_and_resumes_bit_for_bit(data_dir, tiny_rope_dir, tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    steps = dict(steps=4, checkpoint_every=2)
    eager = load_file(str(finetune(config(data_dir, tiny_rope_dir, tmp_path / "eager", **steps))))
    compiled = load_file(str(finetune(config(data_dir, tiny_rope_dir, tmp_path / "a", compile=True, **steps))))
    # Rounding-level differences: Inductor's fused kernels sum in another order than eager's (measured:
    # losses at most 1.2e-7 apart relative over 6 steps, the adapters 2.8e-7; see test_fast_compile for
    # why Adam lets the adapters drift further than the losses).
    for (s, loss, lr), (s_eager, loss_eager, lr_eager) in zip(losses(tmp_path / "a"), losses(tmp_path / "eager")):
        assert (s, lr) == (s_eager, lr_eager) and abs(loss - loss_eager) <= 1e-6 * loss_eager, (s, loss, loss_eager)
    assert eager.keys() == compiled.keys()
    for key in eager:
        assert torch.allclose(compiled[key], eager[key], rtol=0, atol=1e-5), key
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 1  # one for both blocks, none for the recompute

    original = interrupt_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        finetune(config(data_dir, tiny_rope_dir, tmp_path / "b", compile=True, **steps))
    monkeypatch.setattr(Run, "train_step", original)
    resumed = load_file(str(finetune(config(data_dir, tiny_rope_dir, tmp_path / "b", compile=True, **steps))))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert all(torch.equal(resumed[k], compiled[k]) for k in compiled)
    assert counters["stats"]["unique_graphs"] == graphs  # new models, the same compiled code


def test_full_fine_tuning_writes_a_model_folder(data_dir, tiny_rope_dir, tmp_path):
    base = shutil.copytree(tiny_rope_dir, tmp_path / "base")
    (base / "sampling.json").write_text(json.dumps({"guidance_scale": 2.5}))  # the base recommends 2.5
    out = tmp_path / "run"
    path = finetune(config(data_dir, base, out, full=True, steps=2, lr=1e-3))
    assert path == out / "model"
    tuned = Pipeline.from_pretrained(path)
    assert tuned.sampling_defaults["guidance_scale"] == 2.5  # the base's sampling.json came along
    base = Pipeline.from_pretrained(tiny_rope_dir)
    changed = [k for k, v in tuned.transformer.state_dict().items() if not torch.equal(v, base.transformer.state_dict()[k])]
    assert len(changed) > 20  # every trained tensor moved
    assert all(torch.equal(v, base.vae.state_dict()[k]) for k, v in tuned.vae.state_dict().items())
    checkpoint = torch.load(out / "checkpoints" / "step-2.pt", weights_only=False)
    for key, value in checkpoint["weights"].items():
        assert torch.equal(tuned.transformer.state_dict()[key], value), key


def test_validation_follows_the_models_recommended_guidance(data_dir, tiny_rope_dir, tmp_path, monkeypatch):
    base = shutil.copytree(tiny_rope_dir, tmp_path / "base")
    (base / "sampling.json").write_text(json.dumps({"guidance_scale": 2.5, "use_dynamic_cfg": True}))
    seen = []
    check = Pipeline.check_request

    def spy(self, prompt, **kwargs):
        seen.append((kwargs["guidance_scale"], kwargs["use_dynamic_cfg"], kwargs["dynamic_cfg"]))
        return check(self, prompt, **kwargs)

    monkeypatch.setattr(Pipeline, "check_request", spy)
    out = tmp_path / "run"
    validated = dict(validation_every=2, validation_prompts=["a cat"], validation_steps=2, checkpoint_every=2)
    finetune(config(data_dir, base, out, steps=2, **validated))
    assert seen == [(2.5, True, "reference")] * 2  # step 0 and 2: the model's scale and dynamic CFG, as `generate`
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["validation_guidance"] == 2.5  # what was used, not "the model's"

    # A resumed run keeps the guidance it recorded (here that of a run started when the default was a
    # fixed 6), even though the model recommends another ...
    (out / "config.json").write_text(json.dumps(recorded | {"validation_guidance": 6.0}))
    # (a guidance its log has no base model's round of: that round first, then step 4's) ...
    finetune(config(data_dir, base, out, steps=4, **validated))
    assert seen[2:] == [(6.0, True, "reference")] * 2
    assert json.loads((out / "config.json").read_text())["validation_guidance"] == 6.0
    # ... unless it is given one.
    finetune(config(data_dir, base, out, steps=6, validation_guidance=4.0, **validated))
    assert seen[4:] == [(4.0, True, "reference")] * 2
    assert json.loads((out / "config.json").read_text())["validation_guidance"] == 4.0

    # The demo model recommends 2.5 (read from its folder, no weights loaded).
    assert Run(FinetuneConfig(data="d", output=str(tmp_path / "demo"))).validation_guidance == 2.5


def test_validation_every_past_the_steps_warns(data_dir, tiny_rope_dir, tmp_path):
    with pytest.warns(UserWarning, match="validation_every is 5 but the run has only 2 steps: no validation videos"):
        finetune(config(data_dir, tiny_rope_dir, tmp_path, steps=2, validation_every=5, validation_prompts=["a cat"]))
    assert not (tmp_path / "validation").exists()


def test_cogvideox_1_5_pads_odd_latent_frames(data_dir, tiny_v15_dir, tmp_path):
    run = Run(config(data_dir, tiny_v15_dir, tmp_path, steps=1))
    run.prepare_data()
    run.prepare_model()
    seen = []
    forward = run.transformer.forward

    def spy(hidden_states, *args, **kwargs):
        seen.append(tuple(hidden_states.shape))
        return forward(hidden_states, *args, **kwargs)

    run.transformer.forward = spy
    loss = run.train_step(0)
    assert seen == [(1, 4, 4, 4, 6)]  # 9 frames -> 3 latent frames, one copy of the first in front
    assert loss == loss and loss > 0


def test_offloaded_activations_train_the_same_lora_bit_for_bit(data_dir, tiny_rope_dir, tmp_path, monkeypatch):
    from cogvideox.models import transformer as transformer_module

    plain = finetune(config(data_dir, tiny_rope_dir, tmp_path / "a", steps=2))
    used = []
    real = transformer_module.HostSaves
    monkeypatch.setattr(transformer_module, "HostSaves", lambda model: used.append(1) or real(model))
    with pytest.warns(UserWarning, match="on the CPU they are there already, so it saves no memory"):
        offloaded = finetune(config(data_dir, tiny_rope_dir, tmp_path / "b", steps=2, offload_activations=True))
    assert used  # the setting reached the model
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    a, b = load_file(str(plain)), load_file(str(offloaded))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_int8_base_trains_a_lora_that_loads_into_the_plain_model(data_dir, tiny_rope_dir, tmp_path):
    from torch import nn

    from cogvideox.fast.quantize import Int8WeightOnlyLinear
    from cogvideox.train.lora import LoRALinear

    run = Run(config(data_dir, tiny_rope_dir, tmp_path / "probe", steps=1, quantize_base="int8"))
    run.prepare_data()
    run.prepare_model()
    block = run.transformer.transformer_blocks[0]
    # the adapted layers and their adapters as they were; the other frozen linears of the blocks in int8
    assert isinstance(block.attn1.to_q, LoRALinear) and type(block.attn1.to_q.lora_A["default"]) is nn.Linear
    assert isinstance(block.ff.net[2], Int8WeightOnlyLinear) and isinstance(block.norm1.linear, Int8WeightOnlyLinear)
    assert all(p.dtype == torch.float32 for p in run.trainable.values()) and run.trainable

    plain = finetune(config(data_dir, tiny_rope_dir, tmp_path / "a", steps=3))
    int8 = finetune(config(data_dir, tiny_rope_dir, tmp_path / "b", steps=3, quantize_base="int8"))
    (first, *_), (first_int8, *_) = losses(tmp_path / "a"), losses(tmp_path / "b")
    # the first loss (adapters at zero) is the base's: int8 moves it a little, not much
    assert first[1] != first_int8[1] and abs(first_int8[1] - first[1]) <= 0.05 * first[1]
    a, b = load_file(str(plain)), load_file(str(int8))
    assert a.keys() == b.keys()  # the same LoRA layout: it loads wherever the plain run's does
    assert all(torch.isfinite(b[k]).all() for k in b)
    pipe = Pipeline.from_pretrained(tiny_rope_dir, lora=[(str(int8), 1.0)])
    assert pipe.transformer.transformer_blocks[0].attn1.to_q.lora_A


def test_an_int8_base_is_for_lora_only(tmp_path):
    from cogvideox.train.config import FinetuneConfig, check_config

    with pytest.raises(InputError, match="quantize_base is for LoRA"):
        check_config(FinetuneConfig(data="d", output=str(tmp_path), full=True, quantize_base="int8"))
    with pytest.raises(InputError, match="quantize_base must be int8"):
        check_config(FinetuneConfig(data="d", output=str(tmp_path), quantize_base="fp8"))


def test_saved_attention_trains_the_same_lora_bit_for_bit(data_dir, tiny_rope_dir, tmp_path, monkeypatch):
    from cogvideox.models.transformer import ExpertBlock

    plain = finetune(config(data_dir, tiny_rope_dir, tmp_path / "a", steps=2))
    used = []
    real = ExpertBlock.checkpointed
    monkeypatch.setattr(ExpertBlock, "checkpointed", lambda *a: used.append(1) or real(*a))
    saved = finetune(config(data_dir, tiny_rope_dir, tmp_path / "b", steps=2, save_attention=True))
    assert used  # the setting reached the model
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    a, b = load_file(str(plain)), load_file(str(saved))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(InputError, match="save_attention needs gradient_checkpointing"):
        config(data_dir, tiny_rope_dir, tmp_path / "c", save_attention=True, gradient_checkpointing=False)


def test_a_lora_target_that_matches_no_layer_fails_before_the_data_is_encoded(data_dir, tiny_rope_dir, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setattr(Run, "prepare_data", lambda *a: pytest.fail("encoded the data before checking the targets"))
    # One target right, one misspelt: the misspelt one is named, with what a block's linears are called.
    with pytest.raises(InputError, match="no linear layer matches the LoRA target\\(s\\) 'to_qq'; a block's "
                       "linear layers are norm1.linear, attn1.to_q, "):
        finetune(config(data_dir, tiny_rope_dir, tmp_path, targets=["to_q", "to_qq"]))


def test_resuming_with_other_settings_is_refused(data_dir, tiny_rope_dir, tmp_path, monkeypatch):
    finetune(config(data_dir, tiny_rope_dir, tmp_path, steps=3))
    with monkeypatch.context() as m:  # from the run's config.json, before the data and the model load
        m.setattr(Run, "__init__", lambda *a: pytest.fail("loaded the model before comparing the settings"))
        with pytest.raises(InputError, match="holds a run with other settings \\(rank differs\\)"):
            finetune(config(data_dir, tiny_rope_dir, tmp_path, steps=4, rank=8))
    (tmp_path / "config.json").unlink()  # without the record, the checkpoint itself still tells
    with pytest.raises(InputError, match="holds a run with other settings \\(rank differs\\)"):
        finetune(config(data_dir, tiny_rope_dir, tmp_path, steps=4, rank=8))


def test_the_same_model_folder_spelt_otherwise_resumes(data_dir, tiny_rope_dir, tmp_path, monkeypatch):
    """`--model ./m`, `m` and an absolute path name one model: the run continues, from the record's check
    and from the checkpoint's; another folder is still refused."""
    monkeypatch.chdir(tiny_rope_dir.parent)
    finetune(config(data_dir, f"./{tiny_rope_dir.name}", tmp_path / "run", steps=2))
    finetune(config(data_dir, tiny_rope_dir.name, tmp_path / "run", steps=3))
    (tmp_path / "run" / "config.json").unlink()  # the checkpoint's own record
    finetune(config(data_dir, tiny_rope_dir.resolve(), tmp_path / "run", steps=4))
    assert [step for step, *_ in losses(tmp_path / "run")] == [1, 2, 3, 4]
    other = tmp_path / "copy"
    shutil.copytree(tiny_rope_dir, other)
    with pytest.raises(InputError, match="holds a run with other settings \\(model differs\\)"):
        finetune(config(data_dir, other, tmp_path / "run", steps=5))


def test_a_run_past_the_asked_steps_is_refused_before_loading(data_dir, tiny_rope_dir, tmp_path, monkeypatch):
    finetune(config(data_dir, tiny_rope_dir, tmp_path, steps=3))
    before = (tmp_path / "loss.jsonl").read_text()
    monkeypatch.setattr(Run, "__init__", lambda *a: pytest.fail("loaded the model for nothing"))
    with pytest.raises(InputError) as refused:
        finetune(config(data_dir, tiny_rope_dir, tmp_path, steps=2))
    assert str(refused.value) == f"{tmp_path} is already at step 3 (asked for 2): nothing to train; raise --steps to continue"
    assert (tmp_path / "loss.jsonl").read_text() == before  # the run's log is untouched


def test_no_usable_video_is_a_user_error(tiny_rope_dir, tmp_path):
    root = make_video_folder(tmp_path / "data", count=0)
    with pytest.raises(InputError, match="no usable videos"):
        finetune(config(root, tiny_rope_dir, tmp_path / "out"))


def test_learning_rate_schedule(tmp_path):
    c = FinetuneConfig(data="d", output="o", lr=1.0, warmup_steps=10, steps=110, schedule="cosine", min_lr_ratio=0.1)
    assert learning_rate(c, 0) == 0.1 and learning_rate(c, 9) == 1.0
    assert abs(learning_rate(c, 60) - 0.55) < 1e-9 and abs(learning_rate(c, 110) - 0.1) < 1e-9
    assert learning_rate(FinetuneConfig(data="d", output="o", warmup_steps=0), 500) == 1e-4


def test_two_processes_average_their_gradients(data_dir, tiny_rope_dir, tmp_path):
    """`cogvideox train` under two gloo processes (what torchrun sets up) against one process that
    averages the two ranks' gradients itself."""
    steps = 2
    argv = ["train", str(data_dir), "--output", str(tmp_path / "ddp"), "--model", str(tiny_rope_dir),
            "--bucket", "9x32x48", "--rank", "4", "--lr", "1e-2", "--warmup-steps", "0", "--steps", str(steps),
            "--quiet", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    logs = tmp_path / "logs"
    logs.mkdir()
    join_or_fail(start_processes(cli_rank, (argv, str(free_port()), str(logs)), 2), 300, "two-process training")
    # The run's last line is said once, by rank 0, not once per process.
    outs = [(logs / f"rank-{rank}.out").read_text() for rank in range(2)]
    assert outs[0].count("wrote ") == 1 and "final loss" in outs[0] and outs[1] == "", outs

    run = Run(config(data_dir, tiny_rope_dir, tmp_path / "one", steps=steps, cache_dir=str(tmp_path / "cache")))
    run.prepare_data()
    run.prepare_model()
    params = list(run.trainable.values())
    logged = []
    for step in range(steps):
        total = 0.0
        for rank in range(2):
            run.procs.rank, run.procs.world_size = rank, 2  # the two ranks' draws, their strata included
            loss = run.loss(run.generator(step), step)
            loss.backward()
            total += loss.item() / 2
        for p in params:
            p.grad /= 2
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        run.optimizer.step()
        run.optimizer.zero_grad()
        logged.append(total)
    assert [round(loss, 5) for _, loss, _ in losses(tmp_path / "ddp")] == [round(x, 5) for x in logged]
    saved = load_file(str(tmp_path / "ddp" / "pytorch_lora_weights.safetensors"))
    for name, p in run.trainable.items():
        key = "transformer." + name.replace(".default.", ".")
        assert torch.allclose(saved[key], p.detach(), atol=1e-6), key

    # Resumed on one process: it goes on, and says in one warning why its curve differs; once saved with
    # one process, the next resume on one says nothing.
    resumed = config(data_dir, tiny_rope_dir, tmp_path / "ddp", steps=steps + 1, cache_dir=str(tmp_path / "cache"))
    with pytest.warns(UserWarning) as caught:
        finetune(resumed)
    said = [str(w.message) for w in caught if "process(es)" in str(w.message)]
    assert said == [f"{tmp_path / 'ddp' / 'checkpoints' / 'step-2.pt'} was saved with 2 process(es), now 1: the "
                    "effective batch (2 clips per step then, 1 now) and the data order differ, so the loss curve is "
                    "not the one the run would have drawn"]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        finetune(dataclasses.replace(resumed, steps=steps + 2))
    assert not [w for w in caught if "process(es)" in str(w.message)]
    assert [step for step, *_ in losses(tmp_path / "ddp")] == [1, 2, 3, 4]


def test_a_steps_timesteps_take_one_stratum_each(data_dir, tiny_rope_dir, tmp_path):
    """Batch 2, 2 micro-batches, 2 processes: the 8 draws of a step take the 8 eighths of [0, 1000) once
    between them, in an order that changes from step to step; --timesteps uniform draws them freely."""
    run = Run(config(data_dir, tiny_rope_dir, tmp_path, batch_size=2, grad_accum=2))
    run.alphas_cumprod = torch.zeros(1000)  # all `timesteps` reads of the model
    run.procs.world_size = 2
    orders = []
    for step in range(3):
        drawn = []
        for rank in range(2):
            run.procs.rank = rank
            for micro in range(2):
                drawn += run.timesteps(step, micro, run.generator(step, micro)).tolist()
        strata = [t // 125 for t in drawn]
        assert sorted(strata) == list(range(8)), drawn
        orders.append(strata)
    assert orders[0] != orders[1] != orders[2]
    run.procs.rank = 0
    assert drawn[:2] == run.timesteps(2, 0, run.generator(2, 0)).tolist()  # a function of the step: resumable
    run.timestep_sampling = "uniform"  # --timesteps uniform, or a resumed run that began before the setting
    assert run.timesteps(0, 0, run.generator(0, 0)) is None


def test_a_run_resumed_without_the_setting_keeps_its_timestep_sampling(data_dir, tiny_rope_dir, tmp_path):
    """config.json records the sampling used; a run recorded before the setting existed drew uniformly
    and goes on so; `timesteps` given explicitly wins."""
    finetune(config(data_dir, tiny_rope_dir, tmp_path, steps=3, checkpoint_every=3))
    record = json.loads((tmp_path / "config.json").read_text())
    assert record["timesteps"] == "stratified"
    for recorded, given, want in [("stratified", None, "stratified"), (None, None, "uniform"),
                                  (None, "stratified", "stratified"), ("stratified", "uniform", "uniform")]:
        (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in (record | {"timesteps": recorded}).items()
                                                          if v is not None}))  # fmt: skip
        run = Run(config(data_dir, tiny_rope_dir, tmp_path, steps=4, checkpoint_every=3, timesteps=given))
        run.prepare_data()
        run.prepare_model()
        assert run.resume() == 3
        assert run.timestep_sampling == want, (recorded, given)


def test_the_demo_model_fine_tunes_through_the_same_call(tmp_path):
    from cogvideox.demo import DEMO_MODEL_DIR

    data = make_video_folder(tmp_path / "data", count=2, frames=18, broken=False)
    path = finetune(FinetuneConfig(data=str(data), output=str(tmp_path / "out"), rank=4, steps=2, lr=1e-3,
                                   warmup_steps=0, progress=False))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model"] is None
    pipe = Pipeline.from_pretrained(DEMO_MODEL_DIR, lora=path)
    assert pipe.transformer.transformer_blocks[0].attn1.to_q.lora_A["out"].weight.shape[0] == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast training runs on CUDA only")
@pytest.mark.parametrize("optimizer", ["adamw", "adamw-8bit", "adamw-cpu"])
def test_cuda_bf16_training_learns(data_dir, tiny_rope_dir, tmp_path, optimizer):
    if optimizer == "adamw-8bit":
        pytest.importorskip("bitsandbytes", reason="adamw-8bit needs bitsandbytes")
    run = Run(config(data_dir, tiny_rope_dir, tmp_path, device="cuda", dtype="bf16", optimizer=optimizer,
                     batch_size=2, lr=2e-2, caption_dropout=0.0))
    run.prepare_data()
    run.prepare_model()
    assert next(run.transformer.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in run.trainable.values())  # fp32 LoRA weights

    def held_loss():
        with torch.no_grad(), run.autocast():
            return sum(run.loss(step_generator(123, k)).item() for k in range(16)) / 16

    before = held_loss()
    for step in range(40):
        run.train_step(step)
    assert held_loss() < 0.8 * before


# ----------------------------------------------------------------------------------------------------
# Masked loss


@pytest.fixture(scope="module")
def masked_dir(tmp_path_factory):
    """The three good clips; clip0 and clip2 have a mask image over part of the frame."""
    import numpy as np
    from PIL import Image

    root = make_video_folder(tmp_path_factory.mktemp("masked"), broken=False)
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    for i, box in ((0, (4, 20, 6, 30)), (2, (24, 40, 30, 56))):
        image = np.zeros((40, 56, 3), np.uint8)
        image[box[0] : box[1], box[2] : box[3]] = 255
        Image.fromarray(image).save(root / f"mask{i}.png")
        rows[i]["mask"] = f"mask{i}.png"
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _spy_on_v_loss(monkeypatch):
    """Record each v_loss call's inputs, its generator's state before the call, and its result."""
    from cogvideox.train import finetune as finetune_module

    calls = []
    real = finetune_module.v_loss

    def spy(transformer, x0, text, table, generator, rotary=None, weight=None, timesteps=None):
        state = generator.get_state()
        loss = real(transformer, x0, text, table, generator, rotary=rotary, weight=weight, timesteps=timesteps)
        calls.append(dict(x0=x0, text=text, generator_state=state, rotary=rotary, weight=weight, loss=loss,
                          timesteps=timesteps))  # fmt: skip
        return loss

    monkeypatch.setattr(finetune_module, "v_loss", spy)
    return calls


def test_the_masked_loss_is_the_weighted_mean_of_the_squared_errors(masked_dir, tiny_rope_dir, tmp_path, monkeypatch):
    from cogvideox.train.cache import read_mask
    from cogvideox.train.objective import noisy_latents, per_sample, velocity

    calls = _spy_on_v_loss(monkeypatch)
    run = Run(config(masked_dir, tiny_rope_dir, tmp_path, batch_size=3, caption_dropout=0.0, mask_weight=5.0,
                     cache_dir=str(tmp_path / "cache")))
    run.prepare_data()
    run.prepare_model()
    drawn = []
    draw = run.dataset.draw
    run.dataset.draw = lambda *a: drawn.append(draw(*a)) or drawn[-1]
    with torch.no_grad():
        loss = run.loss(step_generator(7, 0))
    (call,) = calls
    # The weight: 5 on the masked cells, 1 elsewhere and on the clip without a mask.
    masks = []
    for i in drawn[0]:
        example = run.dataset.examples[i]
        masks.append(read_mask(example) if example.masked else torch.zeros(3, 1, 4, 6))
    expected_weight = 1.0 + 4.0 * torch.stack(masks)
    assert torch.equal(call["weight"], expected_weight)
    # (the resize to the bucket softens the box's edge: some cells get a share of it)
    assert float(expected_weight.min()) == 1.0 and float(expected_weight.max()) == 5.0

    # By hand, from the same generator state: sum(w * err^2) / sum(w).
    g = torch.Generator().set_state(call["generator_state"])
    x0 = call["x0"].float()
    t = torch.randint(0, run.alphas_cumprod.shape[0], (3,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    ab = per_sample(run.alphas_cumprod, t, x0)
    with torch.no_grad():
        pred = run.transformer(noisy_latents(x0, noise, ab), call["text"], t, image_rotary_emb=call["rotary"])
    err = (pred.float() - velocity(x0, noise, ab)) ** 2
    w = expected_weight.expand_as(err)
    assert torch.allclose(loss, (w * err).sum() / w.sum(), rtol=1e-6)
    assert not torch.allclose(loss, err.mean(), rtol=1e-3)  # the weight matters

    # mask_weight 1 ignores the masks: the same draws give the plain mean.
    plain = Run(config(masked_dir, tiny_rope_dir, tmp_path / "plain", batch_size=3, caption_dropout=0.0,
                       cache_dir=str(tmp_path / "cache")))
    plain.prepare_data()
    plain.prepare_model()
    with torch.no_grad():
        unweighted = plain.loss(step_generator(7, 0))
    assert calls[1]["weight"] is None
    assert torch.allclose(unweighted, err.mean(), rtol=1e-6)


def test_cogvideox_1_5_pads_the_mask_like_the_latents(masked_dir, tiny_v15_dir, tmp_path, monkeypatch):
    calls = _spy_on_v_loss(monkeypatch)
    run = Run(config(masked_dir, tiny_v15_dir, tmp_path, steps=1, mask_weight=3.0, cache_dir=str(tmp_path / "c")))
    run.prepare_data()
    run.prepare_model()
    for step in range(4):
        run.train_step(step)
    weights = [c["weight"] for c in calls if c["weight"] is not None]
    assert weights, "no masked clip was drawn"
    for weight in weights:
        assert weight.shape == (1, 4, 1, 4, 6)  # 3 latent frames, the first one copied in front
        assert torch.equal(weight[:, 0], weight[:, 1]) and weight.max() == 3.0


def test_a_mask_weight_without_masks_warns_once(data_dir, tiny_rope_dir, tmp_path):
    run = Run(config(data_dir, tiny_rope_dir, tmp_path, mask_weight=4.0, cache_dir=str(tmp_path / "cache")))
    with pytest.warns(UserWarning, match="mask_weight is 4 but no clip in .* has a mask; the loss is unweighted"):
        run.prepare_data()
    run.prepare_model()
    assert run.loss(step_generator(0, 0)) > 0  # the run still works


def test_a_second_run_into_the_same_folder_is_refused(data_dir, tiny_rope_dir, tmp_path, monkeypatch):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".train.lock", "a") as held:  # a run is training there
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with monkeypatch.context() as m:
            m.setattr(Run, "prepare_data", lambda self: pytest.fail("encoded the data for a refused run"))
            with pytest.raises(InputError) as refused:
                finetune(config(data_dir, tiny_rope_dir, out, steps=2))
    assert str(refused.value) == f"another run is training into {out}; wait for it to finish, or give another --output"
    assert not (out / "loss.jsonl").exists()
    finetune(config(data_dir, tiny_rope_dir, out, steps=2))  # once it is done, the folder is free again
    assert [s for s, _, _ in losses(out)] == [1, 2]


@pytest.mark.parametrize("failure", ["oserror", "torch"])
def test_a_full_disk_during_a_checkpoint_loses_no_checkpoint(data_dir, tiny_rope_dir, tmp_path, monkeypatch, failure):
    import errno

    from cogvideox.train import checkpoint

    original = torch.save

    def disk_full_at_step_4(state, f, *args, **kwargs):
        if state["step"] != 4:
            return original(state, f, *args, **kwargs)
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        if failure == "oserror":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full_at_step_4)
    with pytest.raises(InputError) as refused:
        finetune(config(data_dir, tiny_rope_dir, tmp_path, steps=4, checkpoint_every=2, keep_checkpoints=1))
    why = "No space left on device" if failure == "oserror" else "the write failed"
    assert str(refused.value) == (
        f"cannot write the checkpoint {tmp_path / 'checkpoints' / 'step-4.pt'}: {why} (is the disk full?); free "
        "some space and run the same command again to continue from step 2, its newest checkpoint"
    )
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2.pt"]  # no half-written file
    monkeypatch.setattr(checkpoint.torch, "save", original)
    finetune(config(data_dir, tiny_rope_dir, tmp_path, steps=4, checkpoint_every=2, keep_checkpoints=1))
    assert [s for s, _, _ in losses(tmp_path)] == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-4.pt"]


def test_validation_videos_cut_off_by_an_interruption_are_made_on_resume(data_dir, tiny_rope_dir, tmp_path, monkeypatch):
    settings = dict(steps=4, checkpoint_every=2, validation_every=2, validation_prompts=["a cat", "a dog"],
                    validation_steps=2)
    original = Run.validate

    def ctrl_c_during_the_second_video(self, step):
        measured = original(self, step)
        if step == 0:  # the base model's round goes through
            return measured
        (self.out / "validation" / f"step-{step}-1.mp4").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(Run, "validate", ctrl_c_during_the_second_video)
    with pytest.raises(KeyboardInterrupt):
        finetune(config(data_dir, tiny_rope_dir, tmp_path, **settings))
    monkeypatch.setattr(Run, "validate", original)
    finetune(config(data_dir, tiny_rope_dir, tmp_path, **settings))
    assert sorted(p.name for p in (tmp_path / "validation").iterdir()) == [
        "step-0-0.mp4", "step-0-1.mp4", "step-2-0.mp4", "step-2-1.mp4", "step-4-0.mp4", "step-4-1.mp4"]
    assert [s for s, _, _ in losses(tmp_path)] == [1, 2, 3, 4]


def test_burnt_validation_colours_are_a_warning(data_dir, tiny_rope_dir, tmp_path, monkeypatch):
    """A round with a video whose colours left the base model's far behind warns, naming the figures and
    the levers; a resumed run still knows the base model's figures from its log."""
    from cogvideox.train import colour

    def figures(saturation, vivid, blown):
        return {"validation_saturation": [saturation], "validation_vivid": [vivid], "validation_blown": [blown],
                "validation_detail": [0.01]}

    rounds = iter([figures(0.30, 0.02, 0.0),  # step 0: the base model
                   figures(0.35, 0.04, 0.01),  # step 2: fine
                   figures(0.40, 0.03, 0.57)])  # step 4: blown out  # fmt: skip
    monkeypatch.setattr(colour, "measure", lambda videos: next(rounds))
    settings = dict(validation_every=2, validation_prompts=["a cat"], validation_steps=2, checkpoint_every=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning up to step 2
        finetune(config(data_dir, tiny_rope_dir, tmp_path, steps=2, **settings))
    with pytest.warns(UserWarning, match=r'validation video 0 \("a cat": .*blown-out pixels 0% -> 57%, .*\) at step 4 '
                      r"have left the base model's far behind.*learning rate \(0.01\) is likely too high"):
        finetune(config(data_dir, tiny_rope_dir, tmp_path, steps=4, **settings))
    logged = [r for r in map(json.loads, (tmp_path / "loss.jsonl").read_text().splitlines()) if "loss" not in r]
    assert [(r["step"], r["validation_blown"]) for r in logged] == [(0, [0.0]), (2, [0.01]), (4, [0.57])]
    assert logged[0]["validation"] == {"prompts": ["a cat"], "steps": 2, "seed": 42, "guidance": 6.0,
                                       "size": "9x32x48"}

    # Resumed with another validation prompt: the base round was of "a cat", so "a dog" is not held against
    # it, but against the base model's round of "a dog", made first (the LoRA left out).
    rounds = iter([figures(0.30, 0.02, 0.0), figures(0.40, 0.03, 0.57)])
    with pytest.warns(UserWarning, match=r'validation video 0 \("a dog": .*blown-out pixels 0% -> 57%.*at step 6 '):
        finetune(config(data_dir, tiny_rope_dir, tmp_path, steps=6, **(settings | {"validation_prompts": ["a dog"]})))
    logged = [r for r in map(json.loads, (tmp_path / "loss.jsonl").read_text().splitlines()) if "loss" not in r]
    assert [(r["step"], r["validation"]["prompts"]) for r in logged[3:]] == [(0, ["a dog"]), (6, ["a dog"])]


def test_a_run_resumed_with_other_validation_settings_makes_their_base_round(data_dir, tiny_rope_dir, tmp_path):
    """The base model's videos of the new prompts are made at the resume, with the LoRA left out: the very
    videos a fresh run's step 0 makes of them."""
    settings = dict(validation_every=2, validation_steps=2, checkpoint_every=2)
    finetune(config(data_dir, tiny_rope_dir, tmp_path / "run", steps=2, validation_prompts=["a cat"], **settings))
    finetune(config(data_dir, tiny_rope_dir, tmp_path / "run", steps=4, validation_prompts=["a dog"], **settings))
    finetune(config(data_dir, tiny_rope_dir, tmp_path / "fresh", steps=1, validation_every=1, validation_steps=2,
                    validation_prompts=["a dog"]))  # fmt: skip
    made = sorted(p.name for p in (tmp_path / "run" / "validation").iterdir())
    assert made == ["base-2-0.mp4", "step-0-0.mp4", "step-2-0.mp4", "step-4-0.mp4"]
    base = read_video(tmp_path / "run" / "validation" / "base-2-0.mp4")[0]
    assert np.array_equal(base, read_video(tmp_path / "fresh" / "validation" / "step-0-0.mp4")[0])
    assert not np.array_equal(base, read_video(tmp_path / "run" / "validation" / "step-4-0.mp4")[0])  # trained
    records = [json.loads(line) for line in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    dog = [r for r in records if r.get("validation", {}).get("prompts") == ["a dog"]]
    assert [r["step"] for r in dog] == [0, 4]
    fresh_base = json.loads((tmp_path / "fresh" / "loss.jsonl").read_text().splitlines()[0])
    assert fresh_base["step"] == 0 and dog[0]["validation_saturation"] == fresh_base["validation_saturation"]


def test_a_full_fine_tune_resumed_with_other_validation_settings_says_its_burn_watch_is_off(data_dir, tiny_rope_dir,
                                                                                          tmp_path):
    """Full fine-tuning changed the base model's weights in place: no base round can be made for the new
    settings, and the run says so rather than watch nothing in silence."""
    settings = dict(full=True, lr=1e-3, validation_every=2, validation_steps=2, checkpoint_every=2)
    finetune(config(data_dir, tiny_rope_dir, tmp_path, steps=2, validation_prompts=["a cat"], **settings))
    with pytest.warns(UserWarning, match=r"no base model's validation round made with these validation settings .*"
                                         r"full fine-tuning keeps no copy of the base model's weights .*"
                                         r"the burn watch is off for this run"):
        finetune(config(data_dir, tiny_rope_dir, tmp_path, steps=4, validation_prompts=["a dog"], **settings))
    assert not any(p.name.startswith("base-") for p in (tmp_path / "validation").iterdir())


def test_a_burn_warning_names_the_default_learning_rate(data_dir, tiny_rope_dir, tmp_path, monkeypatch):
    """A run left at the default lr warns about a burn as one with --lr does (the warning once failed to
    format the unset lr and stopped the run with a traceback)."""
    from cogvideox.train import colour

    def figures(blown):
        return {"validation_saturation": [0.3], "validation_vivid": [0.02], "validation_blown": [blown],
                "validation_detail": [0.01]}

    rounds = iter([figures(0.0), figures(0.6)])
    monkeypatch.setattr(colour, "measure", lambda videos: next(rounds))
    settings = dict(validation_every=1, validation_prompts=["a cat"], validation_steps=2, lr=None)
    with pytest.warns(UserWarning, match=r"at step 1 have left .*the learning rate \(0.0001\) is likely too high.*"
                                         r"resume from an earlier checkpoint \(delete the newer ones in checkpoints/\)"):
        finetune(config(data_dir, tiny_rope_dir, tmp_path, steps=1, **settings))


def test_a_run_restarted_before_its_first_checkpoint_keeps_the_base_models_colours(data_dir, tiny_rope_dir, tmp_path,
                                                                                  monkeypatch):
    """A start that fails after the base model's round (out of memory at the first step, say) leaves its
    videos, which the next start does not make again: their figures stay in the log too, so that the
    burn watch still has them."""
    from cogvideox.train import colour

    def figures(blown):
        return {"validation_saturation": [0.3], "validation_vivid": [0.02], "validation_blown": [blown],
                "validation_detail": [0.01]}

    rounds = iter([figures(0.0), figures(0.6)])
    monkeypatch.setattr(colour, "measure", lambda videos: next(rounds))

    def out_of_memory(self, step):
        raise RuntimeError("CUDA out of memory")

    original = Run.train_step
    monkeypatch.setattr(Run, "train_step", out_of_memory)
    settings = dict(steps=2, validation_every=2, validation_prompts=["a cat"], validation_steps=2)
    with pytest.raises(RuntimeError, match="out of memory"):
        finetune(config(data_dir, tiny_rope_dir, tmp_path, **settings))
    monkeypatch.setattr(Run, "train_step", original)
    with pytest.warns(UserWarning, match=r"blown-out pixels 0% -> 60%.* at step 2 have left the base model's"):
        finetune(config(data_dir, tiny_rope_dir, tmp_path, **settings))
    logged = [r for r in map(json.loads, (tmp_path / "loss.jsonl").read_text().splitlines()) if "loss" not in r]
    assert [(r["step"], r["validation_blown"]) for r in logged] == [(0, [0.0]), (2, [0.6])]


def test_validation_rounds_show_their_progress(data_dir, tiny_rope_dir, tmp_path, capsys):
    """A validation round (minutes for a large model, before the first step too) has a progress bar of its
    sampling steps, not a silent pause."""
    finetune(config(data_dir, tiny_rope_dir, tmp_path, steps=1, validation_every=1, progress=True,
                    validation_prompts=["a cat", "a dog"], validation_steps=2))
    err = capsys.readouterr().err
    assert "validation videos of step 0:   0%|          | 0/4" in err
    assert "validation videos of step 1:   0%|          | 0/4" in err
    assert "fine-tune" in err



def test_running_out_of_memory_keeps_the_steps_done_since_the_last_checkpoint(data_dir, tiny_rope_dir, tmp_path,
                                                                             monkeypatch):
    """A step that runs out of GPU memory (a larger bucket's first draw, hundreds of steps in) stops the run
    as Ctrl-C does: the steps done since the newest checkpoint are saved first, not lost."""
    out_of_memory = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    original = fail_training_at(monkeypatch, 4, out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        finetune(config(data_dir, tiny_rope_dir, tmp_path, steps=5, checkpoint_every=3))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-3.pt", "step-4.pt"]
    monkeypatch.setattr(Run, "train_step", original)
    finetune(config(data_dir, tiny_rope_dir, tmp_path, steps=5, checkpoint_every=3))
    assert [s for s, _, _ in losses(tmp_path)] == [1, 2, 3, 4, 5]


def test_a_full_disk_when_the_lora_is_written_is_one_line_saying_how_to_get_it(data_dir, tiny_rope_dir, tmp_path,
                                                                              monkeypatch):
    """The last checkpoint is written before the result: a result that cannot be written (a full disk) is an
    error of one line naming the file, and the same command writes it once there is room."""
    import errno

    from cogvideox.train import lora

    original = lora.save_file

    def disk_full(state, filename, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(lora, "save_file", disk_full)
    with pytest.raises(InputError) as refused:
        finetune(config(data_dir, tiny_rope_dir, tmp_path, steps=2, checkpoint_every=5))
    message = str(refused.value)
    assert message == (f"cannot write {tmp_path / 'pytorch_lora_weights.safetensors'}: No space left on device; run "
                       "the same command again once that is mended to continue from step 2, its newest checkpoint")
    monkeypatch.setattr(lora, "save_file", original)
    assert finetune(config(data_dir, tiny_rope_dir, tmp_path, steps=2, checkpoint_every=5)).is_file()
    assert [s for s, _, _ in losses(tmp_path)] == [1, 2]


def test_a_full_disk_under_the_log_is_one_line_naming_the_step_to_continue_from(data_dir, tiny_rope_dir, tmp_path,
                                                                              monkeypatch):
    import errno

    from cogvideox.train.log import JsonlLog

    original = JsonlLog.write

    def disk_full_at_step_3(self, step, **values):
        if step == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        return original(self, step, **values)

    monkeypatch.setattr(JsonlLog, "write", disk_full_at_step_3)
    with pytest.raises(InputError) as refused:
        finetune(config(data_dir, tiny_rope_dir, tmp_path, steps=3, checkpoint_every=2))
    assert str(refused.value) == (f"{tmp_path / 'loss.jsonl'}: No space left on device; run the same command again "
                                  "once that is mended to continue from step 2, its newest checkpoint")


@pytest.mark.parametrize("text", [b"[" * 100_000 + b"]" * 100_000, b'{"lr": "\xff"}'], ids=["nested", "latin-1"])
def test_a_run_record_json_cannot_read_is_no_record(tmp_path, text):
    """A RecursionError traceback before, for a record nested past the JSON parser's stack."""
    from cogvideox.train.finetune import read_recorded_config

    (tmp_path / "config.json").write_bytes(text)
    assert read_recorded_config(tmp_path) == {}


def test_a_variant_is_the_base_that_trains_and_a_setting_of_the_run(data_dir, tiny_rope_dir, tmp_path, monkeypatch):
    """`variant="fp16"` (`--variant fp16`) trains on the variant's weights, those `Pipeline.from_pretrained`
    loads with it; a run made on them does not resume on the plain weights."""
    from helpers import make_variant_model

    model = make_variant_model(tiny_rope_dir, tmp_path / "model")
    run = Run(config(data_dir, model, tmp_path / "run", variant="fp16"))
    run.prepare_model()
    want = Pipeline.from_pretrained(model, variant="fp16").transformer.state_dict()
    got = {k: v for k, v in run.transformer.state_dict().items() if k in want}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    finetune(config(data_dir, model, tmp_path / "run", variant="fp16", steps=2))
    with pytest.raises(InputError, match="holds a run with other settings \\(variant differs\\)"):
        finetune(config(data_dir, model, tmp_path / "run", steps=3))
