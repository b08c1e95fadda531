"""Loss logs: one JSON line per logged step, and a PNG of the curve."""

from __future__ import annotations

import json
from pathlib import Path

from cogvideox.files import parse_json


class JsonlLog:
    """Appends `{"step": ..., **values}` lines. Lines past the step a run continues from are dropped so the
    file holds one continuous curve; a run that starts over keeps those of step 0 (the base model's
    validation round, whose videos a restart does not make again)."""

    def __init__(self, path: str | Path, resume_step: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in self.read() if r["step"] <= resume_step]
        with self.path.open("w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")

    def write(self, step: int, **values: float) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")

    def read(self) -> list[dict]:
        """The records; a line that is not one (cut short when a run was killed as it wrote) is left out."""
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = parse_json(line)
            except ValueError:  # a line cut short by a crash, or damaged
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
        return records


def plot_curve(records: list[dict], key: str, path: str | Path, title: str = "") -> Path | None:
    """Saves the `key` curve (raw and smoothed) as a PNG. Returns None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [r["step"] for r in records if key in r]
    values = [r[key] for r in records if key in r]
    if not values:
        return None
    smooth, acc = [], values[0]
    for v in values:
        acc = 0.95 * acc + 0.05 * v
        smooth.append(acc)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, values, alpha=0.3, label=key)
    ax.plot(steps, smooth, label=f"{key} (smoothed)")
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.set_title(title or key)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
