"""The job queue's contract, run unchanged against SQLite and PostgreSQL: ordering, paging, claiming each
job once under concurrency, leases that expire and re-queue, cancellation, limits, statistics."""

import threading
import time

import pytest

pytest.importorskip("fastapi")

from cogvideox.errors import InputError  # noqa: E402
from cogvideox.serve.jobs import GENERATION_BUCKETS, PostgresStore, SQLiteStore, is_job_id, open_store  # noqa: E402

PARAMS = {"prompt": "a cat", "seed": 1}


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path):
    """A factory of stores on one queue (several = several processes sharing it)."""
    if request.param == "sqlite":
        path = tmp_path / "jobs.sqlite3"
        make = lambda: SQLiteStore(path)  # noqa: E731
    else:
        url = request.getfixturevalue("pg_url")
        make = lambda: PostgresStore(url, max_connections=4)  # noqa: E731
    stores = []

    def factory():
        stores.append(make())
        return stores[-1]

    yield factory
    for store in stores:
        store.close()


def test_open_store_picks_the_backend(tmp_path):
    assert isinstance(open_store(None, tmp_path), SQLiteStore)
    assert (tmp_path / "jobs.sqlite3").is_file()
    assert isinstance(open_store(f"sqlite:///{tmp_path}/other.db", tmp_path), SQLiteStore)
    assert (tmp_path / "other.db").is_file()
    mode = SQLiteStore(tmp_path / "wal.db")._run("PRAGMA journal_mode")[0][0]["journal_mode"]
    assert mode == "wal"
    with pytest.raises(InputError, match="--db mysql:// is not supported"):
        open_store("mysql://u@h/db", tmp_path)
    assert not (tmp_path / "mysql:").exists()


def test_ids_cannot_name_other_files():
    store_id = "video_" + "0123456789abcdef01234567"
    assert is_job_id(store_id)
    for bad in ("../jobs", "video_../../etc/passwd", "video_0123", store_id + "/x", store_id.upper(), ""):
        assert not is_job_id(bad)


def test_create_get_and_page_newest_first(backend):
    store = backend()
    ids = [store.create("m", "alice", {**PARAMS, "i": i}).id for i in range(5)]
    job = store.get(ids[2])
    assert (job.status, job.params["i"], job.owner, job.progress, job.attempts) == ("queued", 2, "alice", 0, 0)
    assert store.get("video_" + "0" * 24) is None

    page, more = store.page(limit=2)
    assert [j.id for j in page] == ids[:-3:-1] and more
    page, more = store.page(limit=2, after=page[-1].id)
    assert [j.id for j in page] == [ids[2], ids[1]] and more
    page, more = store.page(limit=2, after=page[-1].id)
    assert [j.id for j in page] == [ids[0]] and not more
    page, more = store.page(limit=10, newest_first=False)
    assert [j.id for j in page] == ids and not more


def test_get_and_page_can_be_scoped_to_an_owner(backend):
    """The API passes the caller's key hash: another owner's job reads as no job, and pages skip it."""
    store = backend()
    alices = [store.create("m", "alice", PARAMS).id for _ in range(3)]
    bobs = store.create("m", "bob", PARAMS).id
    assert store.get(alices[0], owner="alice").id == alices[0]
    assert store.get(alices[0], owner="bob") is None
    assert store.get(bobs).owner == "bob"  # unscoped: the workers' view

    page, more = store.page(limit=2, owner="alice")
    assert [j.id for j in page] == [alices[2], alices[1]] and more
    page, more = store.page(limit=2, after=page[-1].id, owner="alice")
    assert [j.id for j in page] == [alices[0]] and not more
    page, more = store.page(limit=10, newest_first=False, owner="alice")
    assert [j.id for j in page] == alices and not more
    assert [j.id for j in store.page(limit=10, owner="bob")[0]] == [bobs]
    assert [j.id for j in store.page(limit=10, owner="carol")[0]] == []
    assert len(store.page(limit=10)[0]) == 4


def test_claims_are_fifo_and_per_model(backend):
    store = backend()
    first = store.create("m", "o", PARAMS)
    store.create("other-model", "o", PARAMS)
    second = store.create("m", "o", PARAMS)
    claimed = store.claim("w1", "m", lease_seconds=30)
    assert claimed.id == first.id and claimed.status == "in_progress" and claimed.worker == "w1"
    assert claimed.attempts == 1 and claimed.lease_until > time.time() + 20
    assert store.claim("w1", "m", 30).id == second.id
    assert store.claim("w1", "m", 30) is None  # the other model's job is not ours


def test_concurrent_workers_claim_each_job_exactly_once(backend):
    """Four workers, each with its own connection(s), race for 60 jobs: every job is taken exactly once."""
    stores = [backend() for _ in range(4)]
    ids = {stores[0].create("m", "o", PARAMS).id for _ in range(60)}
    taken = {i: [] for i in range(4)}

    def work(i):
        while (job := stores[i].claim(f"w{i}", "m", 30)) is not None:
            taken[i].append(job.id)
            assert stores[i].complete(job.id, f"w{i}", {"denoise": 0.01})

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    all_taken = [job_id for jobs in taken.values() for job_id in jobs]
    assert sorted(all_taken) == sorted(ids)  # each once: no job twice, none missing
    assert stores[0].stats()["by_status"]["completed"] == 60


def test_an_expired_lease_goes_back_to_the_next_worker(backend):
    crashed, survivor = backend(), backend()
    job = crashed.create("m", "o", PARAMS)
    assert crashed.claim("dead", "m", lease_seconds=0.3).id == job.id
    assert survivor.claim("alive", "m", 30) is None  # the lease still holds
    time.sleep(0.4)
    again = survivor.claim("alive", "m", 30)
    assert again.id == job.id and again.attempts == 2 and again.worker == "alive"
    # The worker that lost the lease can no longer report on the job.
    assert not crashed.heartbeat(job.id, "dead", 30, 50)
    assert not crashed.complete(job.id, "dead", {})
    assert not crashed.fail(job.id, "dead", "x", "y")
    assert survivor.heartbeat(job.id, "alive", 30, 40)
    assert survivor.get(job.id).progress == 40
    assert survivor.complete(job.id, "alive", {"denoise": 1.5, "decode": 0.5})
    done = survivor.get(job.id)
    assert (done.status, done.progress, done.timings, done.generation_seconds) == (
        "completed",
        100,
        {"denoise": 1.5, "decode": 0.5},
        2.0,
    )


def test_a_job_whose_workers_keep_dying_fails(backend):
    store = backend()
    job = store.create("m", "o", PARAMS)
    for attempt in (1, 2):
        assert store.claim(f"w{attempt}", "m", lease_seconds=0.01, max_attempts=2).attempts == attempt
        time.sleep(0.02)
    assert store.claim("w3", "m", 30, max_attempts=2) is None
    failed = store.get(job.id)
    assert failed.status == "failed" and failed.error["code"] == "worker_lost"


def test_cancel_and_delete(backend):
    store = backend()
    for _ in range(3):
        store.create("m", "o", PARAMS)
    running = store.claim("w", "m", 30)
    done = store.claim("w2", "m", 30)
    store.complete(done.id, "w2", {})
    queued = store.page(limit=1)[0][0]

    assert not store.delete(running.id)  # an active job is cancelled, not deleted
    assert store.cancel(running.id) and store.get(running.id).status == "cancelled"
    assert not store.heartbeat(running.id, "w", 30, 10)  # the worker learns it at its next heartbeat
    assert not store.complete(running.id, "w", {})
    assert store.cancel(queued.id) and store.claim("w", "m", 30) is None
    assert not store.cancel(done.id)  # finished: nothing to cancel
    for job in (running, queued, done):
        assert store.delete(job.id) and store.get(job.id) is None
    assert not store.delete(done.id)


def test_release_puts_a_job_back_as_it_was(backend):
    store = backend()
    job = store.create("m", "o", PARAMS)
    store.claim("w", "m", 30)
    assert store.release(job.id, "w")
    back = store.get(job.id)
    assert (back.status, back.worker, back.attempts) == ("queued", None, 0)


def test_owner_limit_counts_active_jobs_only(backend):
    store = backend()
    first = store.create("m", "alice", PARAMS, owner_limit=2)
    assert store.create("m", "alice", PARAMS, owner_limit=2) is not None
    assert store.create("m", "alice", PARAMS, owner_limit=2) is None
    assert store.create("m", "bob", PARAMS, owner_limit=2) is not None  # per owner
    store.cancel(first.id)
    assert store.create("m", "alice", PARAMS, owner_limit=2) is not None


def test_stats_count_statuses_and_bucket_generation_time(backend):
    store = backend()
    seconds = [0.5, 3.0, 100.0]
    for s in seconds:
        job = store.create("m", "o", PARAMS)
        store.claim("w", "m", 30)
        store.complete(job.id, "w", {"denoise": s})
    store.create("m", "o", PARAMS)
    stats = store.stats()
    assert stats["by_status"] == {"queued": 1, "in_progress": 0, "completed": 3, "failed": 0, "cancelled": 0}
    generation = stats["generation"]
    assert generation["count"] == 3 and generation["sum"] == pytest.approx(sum(seconds))
    assert generation["buckets"] == {b: sum(s <= b for s in seconds) for b in GENERATION_BUCKETS}


def test_an_unreachable_postgres_is_one_clear_error(caplog):
    """Said once, with libpq's reason and without the password, and without the pool's retry warnings."""
    pytest.importorskip("psycopg_pool")
    from cogvideox.errors import CogVideoXError

    with pytest.raises(CogVideoXError) as error:
        PostgresStore("postgresql://user:secret@127.0.0.1:9/db", connect_timeout=0.3)
    assert str(error.value) == (
        "cannot connect to PostgreSQL at postgresql://127.0.0.1:9/db (Connection refused): is the server running, "
        "and are the user, password and database right?"
    )
    assert not [r for r in caplog.records if r.name.startswith("psycopg")]


def test_expire_removes_finished_jobs_older_than_the_cutoff_once(backend):
    """Completed, failed and cancelled jobs that finished before the cutoff go (oldest first, `limit` at a
    time); active ones and newer ones stay; two sweepers sharing the queue never both get a row."""
    store, other = backend(), backend()
    done, failed, cancelled, running, queued = (store.create("m", "o", PARAMS).id for _ in range(5))
    store.cancel(cancelled)
    for job_id in (done, failed, running):
        assert store.claim("w", "m", 60).id == job_id
    store.complete(done, "w", {"denoise": 1.0})
    store.fail(failed, "w", "x", "y")
    cutoff = time.time() + 1  # all three finished before it
    assert store.expire(cutoff - 3600) == []  # none finished an hour earlier
    first = store.expire(cutoff, limit=2)
    assert [j.id for j in first] == [done, failed] and first[0].status == "completed"
    assert [j.id for j in other.expire(cutoff)] == [cancelled]  # created third: ordered by creation
    assert store.expire(cutoff) == [] and other.expire(cutoff) == []
    assert {j.id for j in store.page(10)[0]} == {running, queued}
