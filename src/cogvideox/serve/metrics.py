"""`/metrics` in Prometheus' text format, read from the queue itself, so every API server reports the same
numbers whichever workers did the work."""

from __future__ import annotations

from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render(stats: dict[str, Any], model: str) -> str:
    """Queue depth, jobs by status, and the histogram of generation seconds (`JobStore.stats()`)."""
    label = f'model="{_escape(model)}"'
    by_status = stats["by_status"]
    generation = stats["generation"]
    lines = [
        "# HELP cogvideox_queue_depth Jobs waiting for a worker.",
        "# TYPE cogvideox_queue_depth gauge",
        f"cogvideox_queue_depth{{{label}}} {by_status['queued']}",
        "# HELP cogvideox_jobs Jobs in the queue's database, by status.",
        "# TYPE cogvideox_jobs gauge",
        *(f'cogvideox_jobs{{{label},status="{s}"}} {n}' for s, n in by_status.items()),
        "# HELP cogvideox_generation_seconds Time from a job's start to its MP4, completed jobs.",
        "# TYPE cogvideox_generation_seconds histogram",
        *(f'cogvideox_generation_seconds_bucket{{{label},le="{le}"}} {n}' for le, n in generation["buckets"].items()),
        f'cogvideox_generation_seconds_bucket{{{label},le="+Inf"}} {generation["count"]}',
        f"cogvideox_generation_seconds_sum{{{label}}} {generation['sum']!r}",
        f"cogvideox_generation_seconds_count{{{label}}} {generation['count']}",
    ]
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
