"""`cogvideox serve` and `cogvideox worker`: parse, build the pieces, run.

cogvideox serve --model THUDM/CogVideoX-2b                 # API + page + one worker, on 127.0.0.1:8000
cogvideox serve --model M --db postgresql://... --no-worker  # API only, in front of ...
cogvideox worker --model M --db postgresql://...            # ... one of these per GPU
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
from pathlib import Path

from cogvideox.cli_args import (
    add_model_arguments,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)

ENV_API_KEYS = "COGVIDEOX_API_KEYS"  # comma-separated
ENV_ENHANCER_KEY = "COGVIDEOX_ENHANCER_API_KEY"

log = logging.getLogger("cogvideox.serve")


def _add_common(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, revision=False, offline=False)
    parser.add_argument(
        "--model-name", default=None, help="the name clients give as `model` (default: the folder's or repo's name)"
    )
    parser.add_argument(
        "--db",
        default=None,
        help="the job queue: postgresql://USER:PASSWORD@HOST/DB (shared by several workers and machines) or a "
        "SQLite file; default: DATA_DIR/jobs.sqlite3",
    )
    parser.add_argument(
        "--data-dir",
        default="cogvideox-data",
        help="where the MP4s (and the default SQLite queue) live; workers on other machines must see the same "
        "folder (a network mount); default: ./cogvideox-data",
    )
    parser.add_argument(
        "--lease-seconds",
        type=positive_float,
        default=60.0,
        help="a running job whose worker has not checked in for this long goes back to the queue (default: 60)",
    )
    parser.add_argument(
        "--poll-interval", type=positive_float, default=0.5, help="seconds between looks at an empty queue"
    )
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def add_serve_parsers(commands) -> None:
    """Add `serve` and `worker` to the `cogvideox` command's sub-parsers."""
    serve = commands.add_parser(
        "serve",
        help="run the HTTP API (OpenAI's video API shape) and web page, with one worker in-process",
        description="Serve text-to-video over HTTP: POST /v1/videos, GET /v1/videos/{id}[/content], a web page "
        "at /, /metrics for Prometheus. Jobs wait in a database (SQLite by default, PostgreSQL for several "
        "workers) and survive restarts.",
    )
    _add_common(serve)
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)"
    )
    serve.add_argument("--port", type=positive_int, default=8000, help="port (default: 8000)")
    serve.add_argument(
        "--api-key",
        action="append",
        default=[],
        help=f"require Authorization: Bearer KEY on every endpoint but /healthz; repeat for several keys "
        f"(also read from ${ENV_API_KEYS}, comma-separated)",
    )
    serve.add_argument(
        "--rate-limit",
        type=non_negative_float,
        default=30.0,
        help="new videos per minute per key; 0: no limit (default: 30)",
    )
    serve.add_argument(
        "--max-queue",
        type=non_negative_int,
        default=100,
        help="queued + running videos per key; 0: no limit (default: 100)",
    )
    serve.add_argument(
        "--max-steps", type=positive_int, default=100, help="largest num_inference_steps accepted (default: 100)"
    )
    serve.add_argument(
        "--sizes", default="", help="sizes accepted besides the model's native one, comma-separated WIDTHxHEIGHT"
    )
    serve.add_argument(
        "--no-worker", action="store_true", help="API only: separate `cogvideox worker` processes generate"
    )
    serve.add_argument(
        "--prompt-enhancer",
        default=None,
        metavar="URL",
        help="rewrite prompts with this OpenAI-compatible chat endpoint (such as http://host:port/v1); off by "
        f"default; its key from ${ENV_ENHANCER_KEY}",
    )
    serve.add_argument("--enhancer-model", default="gpt-4o-mini", help="chat model of --prompt-enhancer")
    serve.set_defaults(run=run_serve)

    worker = commands.add_parser(
        "worker",
        help="run a worker that takes jobs from a `serve` queue (one per GPU)",
        description="Take jobs from the queue a `cogvideox serve` uses (--db and --data-dir the same as its) "
        "and generate them. Run one per GPU, on as many machines as share the database.",
    )
    _add_common(worker)
    worker.set_defaults(run=run_worker)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # transformers' own bars and notices while the T5 loads are noise in a service log
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _require_serve_extra() -> None:
    from cogvideox.errors import CogVideoXError

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise CogVideoXError('serving needs the serve extra: pip install "cogvideox[serve]"') from None


def _build_worker(args, spec, store):
    from cogvideox.serve.worker import PipelineGenerator, Worker

    return Worker(
        store,
        PipelineGenerator(args.model, dtype=args.dtype, device=args.device),
        args.data_dir,
        spec.name,
        lease_seconds=args.lease_seconds,
        poll_interval=args.poll_interval,
    )


def run_serve(args: argparse.Namespace) -> int:
    _require_serve_extra()
    import uvicorn

    from cogvideox.loading import parse_dtype
    from cogvideox.serve.app import Settings, create_app
    from cogvideox.serve.jobs import open_store
    from cogvideox.serve.spec import ModelSpec

    _setup_logging(args.log_level)
    parse_dtype(args.dtype)
    sizes = tuple(s.strip() for s in args.sizes.split(",") if s.strip())
    spec = ModelSpec.load(args.model, args.model_name, sizes)
    keys = tuple(args.api_key) + tuple(k.strip() for k in os.environ.get(ENV_API_KEYS, "").split(",") if k.strip())
    if not keys and not _is_loopback(args.host):
        log.warning("listening on %s without an API key: anyone who can reach it can use the GPU", args.host)
    settings = Settings(
        data_dir=Path(args.data_dir),
        api_keys=keys,
        rate_limit=args.rate_limit,
        max_active_per_key=args.max_queue,
        max_steps=args.max_steps,
        prompt_enhancer=args.prompt_enhancer,
        enhancer_model=args.enhancer_model,
        enhancer_api_key=os.environ.get(ENV_ENHANCER_KEY),
    )
    store = open_store(args.db, args.data_dir)
    worker = None if args.no_worker else _build_worker(args, spec, store)
    app = create_app(spec, store, settings, worker)
    log.info("serving %s (sizes %s) at http://%s:%d/", spec.name, ", ".join(spec.sizes), args.host, args.port)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        store.close()
    return 0


def run_worker(args: argparse.Namespace) -> int:
    _require_serve_extra()
    from cogvideox.loading import parse_dtype
    from cogvideox.serve.jobs import open_store
    from cogvideox.serve.spec import ModelSpec

    _setup_logging(args.log_level)
    parse_dtype(args.dtype)
    spec = ModelSpec.load(args.model, args.model_name)
    store = open_store(args.db, args.data_dir)
    worker = _build_worker(args, spec, store)
    # SIGTERM (a service manager stopping us) as Ctrl-C: finish the step, hand the job back, exit.
    signal.signal(signal.SIGTERM, lambda *_: worker.stop(timeout=0))
    try:
        worker.run()
    except KeyboardInterrupt:
        worker.stop(timeout=0)
    finally:
        store.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m cogvideox.serve serve|worker ...`: the same commands outside the `cogvideox` CLI."""
    from cogvideox.errors import CogVideoXError
    from cogvideox.models.config import ConfigError

    parser = argparse.ArgumentParser(prog="python -m cogvideox.serve")
    add_serve_parsers(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (CogVideoXError, ConfigError) as e:
        print(f"cogvideox: error: {e}", file=sys.stderr)
        return 2
