"""Fixtures shared by the pipeline, loading and CLI tests: tiny CogVideoX model folders, built once per session.

Each folder is written by the reference (`diffusers.CogVideoXPipeline.save_pretrained`), so loading it
tests the official layout, and the reference pipeline built from it is the truth the tests compare to.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_cogvideox

# The test models are tiny: one thread is as fast as several, and on a shared, busy machine several
# threads spin-wait on each other (measured: 66 s instead of 4 s for test_pipeline.py under load).
torch.set_num_threads(1)


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (the default, pyproject.toml): one worker per core, at most 8. Each worker holds torch,
    transformers and diffusers (1-2 GB) and builds the session's tiny models once; more workers than that
    wait on the few slow files (demo training, torchrun launches) anyway."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 8))


# The files that take longest (30-60 s of test time each, measured with --junitxml), run first: with
# `--dist loadfile` each file goes whole to the next free worker in collection order, so a long file
# collected last would leave one worker running it alone at the end.
SLOW_FILES = (
    "test_benchmarks.py", "test_parallel_cli.py", "test_parallel.py", "test_serve_browser.py",
    "test_train_finetune.py", "test_demo_teach.py", "test_batch.py", "test_demo_build.py", "test_inversion.py",
)  # fmt: skip


def pytest_collection_modifyitems(config, items):
    """The slow files first, in SLOW_FILES' order; the rest, and the tests within each file, as collected."""
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))


@pytest.fixture(scope="session")
def tiny_rope_dir(tmp_path_factory):
    """CogVideoX 1.0 with 3D RoPE (like 5B), DDIM scheduler."""
    return make_tiny_cogvideox(tmp_path_factory.mktemp("tiny-rope"), variant="rope")


@pytest.fixture(scope="session")
def tiny_sincos_dir(tmp_path_factory):
    """CogVideoX 1.0 with the 3D sin-cos table (like 2B), DDIM scheduler with SNR shift 3."""
    return make_tiny_cogvideox(tmp_path_factory.mktemp("tiny-sincos"), variant="sincos")


@pytest.fixture(scope="session")
def tiny_i2v_dir(tmp_path_factory):
    """Like 5B-I2V: 3D RoPE plus a learned position table (one video size: 9 frames at 64x64)."""
    return make_tiny_cogvideox(tmp_path_factory.mktemp("tiny-i2v"), variant="i2v")


@pytest.fixture(scope="session")
def tiny_v15_i2v_dir(tmp_path_factory):
    """Like 1.5-5B-I2V: 2x2x2 patches, `ofs`, image latents divided by the VAE scaling factor; DPM."""
    return make_tiny_cogvideox(tmp_path_factory.mktemp("tiny-v15-i2v"), variant="1.5-i2v", scheduler="dpm")


@pytest.fixture(scope="session")
def tiny_v15_dir(tmp_path_factory):
    """CogVideoX 1.5 (2x2x2 patches, slice RoPE, frame padding), DPM scheduler."""
    return make_tiny_cogvideox(tmp_path_factory.mktemp("tiny-v15"), variant="1.5", scheduler="dpm")


# ----------------------------------------------------------------------------------------------------
# The serve tests' PostgreSQL: a fresh schema per test in the database COGVIDEOX_TEST_PG_URL names.


@pytest.fixture
def pg_url():
    """A PostgreSQL URL whose connections work in a new, empty schema (dropped afterwards); skipped when
    COGVIDEOX_TEST_PG_URL is not set (scripts/ci-services.sh starts a server and prints the URL)."""
    import os
    import secrets
    from urllib.parse import quote

    from serve_helpers import PG_URL_ENV, service_missing

    url = os.environ.get(PG_URL_ENV)
    if not url:
        service_missing(f"no PostgreSQL server: set {PG_URL_ENV} (scripts/ci-services.sh starts one)")
    psycopg = pytest.importorskip("psycopg")
    schema = "test_" + secrets.token_hex(4)
    try:
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute(f"CREATE SCHEMA {schema}")
    except psycopg.OperationalError as e:
        service_missing(f"PostgreSQL at {PG_URL_ENV} is not answering: {e}")
    separator = "&" if "?" in url else "?"
    yield f"{url}{separator}options={quote(f'-csearch_path={schema}')}"
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f"DROP SCHEMA {schema} CASCADE")
