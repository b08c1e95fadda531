"""Load on loopback, bounded in time: 200 jobs submitted at once, 50 clients polling them, 2 workers sharing
the queue. No request fails; every job completes, and is generated exactly once.

The workers get a stand-in generator (`CountingGenerator`: a 2-frame clip after 20 ms, counted per prompt)
instead of the Pipeline: the test is about the queue and the API under concurrency, and the real model's
seconds per job would only stretch it. They are two `Worker`s with their own database connections, as two
worker processes would be. Run against PostgreSQL (the multi-worker setup), and against SQLite too.
"""

import asyncio
import time

import httpx
import pytest

pytest.importorskip("fastapi")

from serve_helpers import CountingGenerator, serving, write_config_folder  # noqa: E402

from cogvideox.serve.app import Settings, create_app  # noqa: E402
from cogvideox.serve.jobs import PostgresStore, SQLiteStore  # noqa: E402
from cogvideox.serve.spec import ModelSpec  # noqa: E402
from cogvideox.serve.worker import Worker, video_path  # noqa: E402

JOBS, POLLERS, WORKERS = 200, 50, 2
DEADLINE = 60.0  # seconds for everything after the server is up


async def submit_and_poll(url: str, start_workers) -> tuple[list[str], list[dict], list[int]]:
    """Queue every job at once, then start the workers and poll until each job is finished."""
    limits = httpx.Limits(max_connections=POLLERS + 10, max_keepalive_connections=POLLERS + 10)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        created = await asyncio.gather(
            *(client.post("/v1/videos", json={"prompt": f"job {i}", "num_inference_steps": 1}) for i in range(JOBS))
        )
        codes = [r.status_code for r in created]
        ids = [r.json()["id"] for r in created if r.status_code == 200]
        depth = (await client.get("/metrics")).text
        assert f'cogvideox_queue_depth{{model="tiny"}} {JOBS}' in depth
        start_workers()
        final: dict[str, dict] = {}
        deadline = time.monotonic() + DEADLINE

        async def poll(mine: list[str]) -> None:
            pending = list(mine)
            while pending and time.monotonic() < deadline:
                for video_id in list(pending):
                    response = await client.get(f"/v1/videos/{video_id}")
                    codes.append(response.status_code)
                    if response.status_code == 200 and response.json()["status"] not in ("queued", "in_progress"):
                        final[video_id] = response.json()
                        pending.remove(video_id)
                await asyncio.sleep(0.05)

        await asyncio.gather(*(poll(ids[i::POLLERS]) for i in range(POLLERS)))
        return ids, [final.get(i, {}) for i in ids], codes


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_200_jobs_50_pollers_2_workers(backend, tmp_path, request):
    if backend == "postgres":
        url = request.getfixturevalue("pg_url")
        open_store = lambda size: PostgresStore(url, max_connections=size)  # noqa: E731
    else:
        open_store = lambda size: SQLiteStore(tmp_path / "jobs.sqlite3")  # noqa: E731
    spec = ModelSpec.from_folder(write_config_folder(tmp_path / "model"), "tiny")
    api_store = open_store(20)
    generate = CountingGenerator(delay=0.02)
    workers = [
        Worker(open_store(2), generate, tmp_path, spec.name, lease_seconds=30, poll_interval=0.02)
        for _ in range(WORKERS)
    ]
    app = create_app(spec, api_store, Settings(data_dir=tmp_path, rate_limit=0, max_active_per_key=0))
    start = time.monotonic()
    with serving(app) as url:
        try:
            ids, videos, codes = asyncio.run(submit_and_poll(url, lambda: [w.start() for w in workers]))
        finally:
            for worker in workers:
                worker.stop()
    elapsed = time.monotonic() - start

    assert len(ids) == JOBS
    assert set(codes) == {200}, f"failed requests: {sorted(c for c in codes if c != 200)[:10]}"
    assert [v.get("status") for v in videos] == ["completed"] * JOBS
    assert generate.calls == {f"job {i}": 1 for i in range(JOBS)}  # each generated once and only once
    jobs = [api_store.get(i) for i in ids]
    assert {j.attempts for j in jobs} == {1}
    assert {j.worker for j in jobs} == {w.name for w in workers}  # both workers took a share
    assert all(video_path(tmp_path, i).is_file() for i in ids)
    assert elapsed < DEADLINE + 30
    print(f"{backend}: {JOBS} jobs, {len(codes)} requests in {elapsed:.1f} s")
    for store in [api_store, *(w.store for w in workers)]:
        store.close()
