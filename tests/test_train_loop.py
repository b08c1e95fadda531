"""The training loop: it learns, logs, plots, and a resumed run continues bit for bit."""

import json

import torch
from torch import nn

from cogvideox.train.ema import EMA
from cogvideox.train.log import JsonlLog
from cogvideox.train.loop import TrainConfig, learning_rate, train


def make_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.SiLU(), nn.Linear(16, 1))
    target_w = torch.tensor([[1.0, -2.0, 0.5, 3.0]])

    def loss_fn(m, step, gen):
        x = torch.randn(32, 4, generator=gen)
        y = x @ target_w.T + 0.01 * torch.randn(32, 1, generator=gen)
        return ((m(x) - y) ** 2).mean()

    return model, loss_fn


def test_loss_goes_down_and_is_logged(tmp_path):
    model, loss_fn = make_problem()
    cfg = TrainConfig(steps=200, lr=1e-2, log_every=10, checkpoint_every=100)
    train(model, loss_fn, cfg, tmp_path, name="toy", progress=False)
    records = [json.loads(line) for line in (tmp_path / "toy-loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(10, 201, 10))
    assert records[-1]["loss"] < 0.1 * records[0]["loss"]
    assert (tmp_path / "toy-loss.png").stat().st_size > 1000
    assert (tmp_path / "toy-200.pt").is_file()


def test_resume_is_bit_identical(tmp_path):
    cfg = dict(lr=1e-2, log_every=1, checkpoint_every=5, ema_decay=0.9, warmup_steps=3)
    straight, loss_fn = make_problem()
    train(straight, loss_fn, TrainConfig(steps=12, **cfg), tmp_path / "a", name="toy", progress=False)

    resumed, loss_fn = make_problem()
    train(resumed, loss_fn, TrainConfig(steps=7, **cfg), tmp_path / "b", name="toy", progress=False)
    again, loss_fn = make_problem()  # a fresh process would start from new weights: the checkpoint wins
    train(again, loss_fn, TrainConfig(steps=12, **cfg), tmp_path / "b", name="toy", progress=False)

    for a, b in zip(straight.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    log_a = (tmp_path / "a" / "toy-loss.jsonl").read_text()
    log_b = (tmp_path / "b" / "toy-loss.jsonl").read_text()
    assert log_a == log_b


def test_warmup_and_cosine_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(cfg, 0) == 0.1
    assert learning_rate(cfg, 9) == 1.0
    assert abs(learning_rate(cfg, 100) - 0.1) < 1e-9
    assert 0.1 < learning_rate(cfg, 55) < 1.0


def test_ema_tracks_weights():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], start + 0.5)
    ema.copy_to(model)
    assert torch.allclose(model.weight, start + 0.5)


def test_a_log_line_cut_short_by_a_kill_does_not_stop_the_resume(tmp_path):
    path = tmp_path / "loss.jsonl"
    lines = [json.dumps({"step": s, "loss": 0.5 / s}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + '\n{"step": 5, "lo')  # killed while writing step 5
    log = JsonlLog(path, resume_step=3)
    log.write(4, loss=0.25)
    assert log.read() == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}, {"step": 3, "loss": 0.5 / 3},
                          {"step": 4, "loss": 0.25}]
    assert path.read_text().splitlines()[-1] == '{"step": 4, "loss": 0.25}'


def test_stratified_timesteps_cover_the_strata_and_stay_uniform():
    from cogvideox.train.objective import stratified_timesteps

    T = 1000
    # One draw per step: the plain uniform draw, bit for bit.
    one = stratified_timesteps(T, 1, range(0, 1), torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
    assert torch.equal(one, torch.randint(0, T, (1,), generator=torch.Generator().manual_seed(2)))
    # 6 draws of a step in parts of 2 and 4 (two processes): each of the 6 strata once, each t inside its own.
    lows = torch.tensor([k * T // 6 for k in range(7)])  # [floor(k T / 6), floor((k + 1) T / 6)): stratum k
    seen = []
    for step in range(2000):
        parts = [stratified_timesteps(T, 6, mine, torch.Generator().manual_seed(step),
                                      torch.Generator().manual_seed(10**6 + 7 * step + mine.start))
                 for mine in (range(0, 2), range(2, 6))]  # fmt: skip
        drawn = torch.cat(parts)
        assert sorted((torch.searchsorted(lows, drawn, right=True) - 1).tolist()) == list(range(6)), drawn
        seen.append(drawn)
    seen = torch.cat(seen).double()
    # Each draw on its own is uniform on [0, T): mean (T - 1) / 2, variance (T^2 - 1) / 12.
    assert abs(seen.mean().item() - (T - 1) / 2) < 10
    assert abs(seen.var().item() / ((T**2 - 1) / 12) - 1) < 0.05
    counts = torch.bincount((seen // 100).long(), minlength=10)
    assert counts.min() > 0.9 * len(seen) / 10
    # More draws than timesteps: strata of width 1, shared.
    many = stratified_timesteps(10, 25, range(25), torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
    assert many.min() >= 0 and many.max() <= 9 and len(set(many.tolist())) == 10


def test_damaged_log_lines_are_passed_over(tmp_path):
    """A line nested past the JSON parser's stack was a RecursionError, bytes that are not UTF-8 a
    UnicodeDecodeError, when the log was read back (resume, the loss plot)."""
    path = tmp_path / "loss.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 0.5}\n' + b"[" * 100_000 + b"]" * 100_000 + b'\n{"step": 2, "\xff": 1}\n'
                     + b'{"step": 3, "loss": 0.25}\n')  # fmt: skip
    assert [r["step"] for r in JsonlLog(path, resume_step=3).read()] == [1, 2, 3]
