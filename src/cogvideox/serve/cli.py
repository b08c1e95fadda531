"""`cogvideox serve` and `cogvideox worker`: parse, build the pieces, run.

cogvideox serve --model THUDM/CogVideoX-2b                 # API + page + one worker, on 127.0.0.1:8000
cogvideox serve --model M --db postgresql://... --no-worker  # API only, in front of ...
cogvideox worker --model M --db postgresql://...            # ... one of these per GPU
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import re
import signal
import socket
import sys
from pathlib import Path

from cogvideox.cli_args import (
    add_enhancer_arguments,
    add_memory_arguments,
    add_model_arguments,
    add_speed_arguments,
    file_name,
    non_blank,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    prompt_enhancer,
)

ENV_API_KEYS = "COGVIDEOX_API_KEYS"  # comma-separated

log = logging.getLogger("cogvideox.serve")

LOG_LEVELS = ("debug", "info", "warning", "error")


def port_number(text: str) -> int:
    """A `type=` for --port: a TCP port, 1 to 65535 (0, "any free port", would leave the address unknown)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number from 1 to 65535, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 1 to 65535, got {port}")
    return port


MAX_POLL_SECONDS = 3600


def poll_seconds(text: str) -> float:
    """A `type=` for --poll-interval: seconds above 0, at most an hour (a wait past 2**63 ns overflows the
    clock, and stopped the worker's loop, while the server answered as if it ran)."""
    seconds = positive_float(text)
    if seconds > MAX_POLL_SECONDS:
        raise argparse.ArgumentTypeError(f"expected a number of seconds up to {MAX_POLL_SECONDS}, got {text}")
    return seconds


def _add_common(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, revision=False, offline=False)
    add_memory_arguments(parser)
    add_speed_arguments(parser)  # a server pays --compile's warm-up once, on its first video
    parser.add_argument(
        "--model-name",
        default=None,
        type=non_blank("a model name"),
        help="the name clients give as `model` (default: the folder's or repo's name)",
    )
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a LoRA (diffusers layout: pytorch_lora_weights.safetensors or its folder) that requests may run by "
        "NAME (lora: \"NAME:SCALE\"); repeat for several, all loaded at start, chosen per video. Workers need the "
        "same NAMEs. Not with --quantize or --compile, which fold LoRAs into the weights for good (default: none)",
    )
    parser.add_argument(
        "--db",
        default=None,
        type=file_name,
        help="the job queue: postgresql://USER:PASSWORD@HOST/DB (shared by several workers and machines) or a "
        "SQLite file; default: DATA_DIR/jobs.sqlite3",
    )
    parser.add_argument(
        "--data-dir",
        default="cogvideox-data",
        type=file_name,
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
        "--poll-interval",
        type=poll_seconds,
        default=0.5,
        help=f"seconds between looks at an empty queue, at most {MAX_POLL_SECONDS} (default: 0.5)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=LOG_LEVELS,
        help="least severe log messages shown: " + ", ".join(LOG_LEVELS) + " (default: info)",
    )


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
        "--host",
        default="127.0.0.1",
        type=non_blank("an address such as 127.0.0.1, or 0.0.0.0 for every interface"),  # "" is every interface
        help="address to listen on (default: 127.0.0.1, this machine only)",
    )
    serve.add_argument("--port", type=port_number, default=8000, help="port to listen on, 1-65535 (default: 8000)")
    serve.add_argument(
        "--api-key",
        action="append",
        default=[],
        help=f"require Authorization: Bearer KEY on every endpoint but /healthz; repeat for several keys "
        f"(also read from ${ENV_API_KEYS}, comma-separated) (default: none, open to whoever reaches --host)",
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
        "--max-steps",
        type=positive_int,
        default=100,
        help="largest num_inference_steps accepted; a request without one gets the model's default (50), capped "
        "at this (default: 100)",
    )
    serve.add_argument(
        "--sizes",
        type=non_blank("sizes such as 768x1360,1360x768"),  # blank: an unset variable, not "no extra sizes"
        help="sizes accepted besides the model's native one, comma-separated WIDTHxHEIGHT (default: none, only "
        "the native size)",
    )
    serve.add_argument(
        "--expire-after",
        type=positive_float,
        metavar="HOURS",
        help="delete each finished video (its job, MP4, GIF and thumbnails, first frame) this many hours after "
        "it finished, as OpenAI's videos expire; the API shows when in expires_at (default: keep them)",
    )
    serve.add_argument(
        "--no-worker",
        action="store_true",
        help="API only: separate `cogvideox worker` processes generate (default: one worker in this process)",
    )
    add_enhancer_arguments(serve, "each request's prompt into a detailed description (unless the request "
                           "says enhance_prompt: false)")
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


# Why a bind failed, and what to do about it, by errno.
_BIND_HINTS = {
    errno.EADDRINUSE: "stop the server using it or choose another --port",
    errno.EACCES: "ports below 1024 need privileges; choose a higher --port",
    errno.EADDRNOTAVAIL: "give an address of this machine as --host (0.0.0.0 for all of them)",
}


def check_listening(host: str, port: int) -> None:
    """Raise `InputError` unless `host`:`port` can be listened on, bound the way uvicorn binds it.

    Run before the model loads and the worker starts: otherwise a port in use only fails inside uvicorn,
    after the log has announced the address and with the worker already taking jobs."""
    from cogvideox.errors import InputError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            if os.name != "nt":  # as uvicorn: a port a stopped server left in TIME_WAIT can be reused
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except socket.gaierror as e:
        raise InputError(f"cannot listen on {where}: unknown host {host!r} ({e.strerror})") from None
    except OSError as e:
        reason = (e.strerror or str(e)).lower()
        hint = _BIND_HINTS.get(e.errno)
        raise InputError(f"cannot listen on {where}: {reason}" + (f"; {hint}" if hint else "")) from None


def load_settings(args: argparse.Namespace) -> tuple[dict, dict | None]:
    """The worker's `Pipeline.from_pretrained` keywords (dtype, device and the memory flags) and its
    `Pipeline.accelerate` keywords (None without speed flags), checked before any weights load: a flag
    the device cannot run is an `InputError` at start, not a failure of the first job."""
    from cogvideox import loading
    from cogvideox.cli_args import memory_settings, speed_settings
    from cogvideox.errors import InputError

    loading.parse_dtype(args.dtype)
    device = loading.choose_device(args.device)
    speed = speed_settings(args, device)
    if args.lora and speed is not None:
        rewriting = [flag for flag, on in (("--quantize", speed["quantize"]), ("--compile", speed["compile"])) if on]
        if rewriting:
            raise InputError(f"--lora serves LoRAs chosen per video, which {' and '.join(rewriting)} would fold into "
                             "the weights for good; leave those out (the step cache and --attention keep LoRAs "
                             "choosable)")  # fmt: skip
        speed["fuse_qkv"] = False  # fused QKV would fold them too
    loading.check_variant(args.variant)
    load = dict(dtype=args.dtype, device=args.device, **memory_settings(args, device))
    return load | ({"variant": args.variant} if args.variant is not None else {}), speed


_LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def served_loras(values: list[str], check_files: bool = True) -> dict[str, str]:
    """--lora NAME=PATH values as {name: path}; `InputError` for a bad name, a name given twice, or (when
    `check_files`, on a machine that runs them) a path that is not a LoRA file or folder."""
    from cogvideox.errors import InputError
    from cogvideox.train.lora import read_lora

    loras: dict[str, str] = {}
    for value in values:
        name, equals, path = value.partition("=")
        if not equals or not path:
            raise InputError(f"--lora {value}: give NAME=PATH, the name requests use and the LoRA's file or folder")
        if not _LORA_NAME.fullmatch(name):
            raise InputError(f"--lora {value}: a name is 1-64 letters, digits, '_', '.' or '-', starting with a letter "
                             "or digit")  # fmt: skip
        if name in loras:
            raise InputError(f"--lora {name} is given twice")
        if check_files:
            read_lora(path)  # a missing or foreign file fails here, not on the first video that names it
            path = str(Path(path).resolve())
        loras[name] = path
    return loras


def make_data_dir(data_dir: str) -> None:
    """Create --data-dir and its videos/ folder, and write a file there, or raise `InputError` saying why
    not (a file of that name, no permission, a read-only mount), before the queue opens and the model
    loads: a folder that exists but takes no file would fail every job after its generation."""
    from cogvideox.errors import InputError
    from cogvideox.files import probe_writable

    videos = Path(data_dir) / "videos"
    try:
        videos.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reason = (e.strerror or str(e)).lower()
        raise InputError(f"--data-dir {data_dir}: cannot make {e.filename or data_dir} ({reason}); give a folder "
                         "this process can write") from None
    try:
        probe_writable(videos)
    except OSError as e:
        reason = (e.strerror or str(e)).lower()
        raise InputError(f"--data-dir {data_dir}: cannot write in {videos} ({reason}); give a folder this process "
                         "can write") from None
    removed = remove_stale_parts(videos)
    if removed:
        log.info("removed %d file(s) a process stopped while it wrote them, from %s", removed, videos)


# A file is written under a temporary name (`files.write_into_place`) in seconds; one this old was left by a
# process killed while it wrote, and no process of the service will finish it.
STALE_PART_S = 3600


def remove_stale_parts(folder: Path, now: float | None = None) -> int:
    """Delete the temporary files (.NAME.XXXX.SUFFIX.part) in `folder` older than `STALE_PART_S`, left by a
    process killed while it wrote them; how many. Younger ones may be another worker's, being written."""
    import time

    before = (time.time() if now is None else now) - STALE_PART_S
    removed = 0
    for part in folder.glob(".*.part"):
        try:
            if part.stat().st_mtime < before:
                part.unlink()
                removed += 1
        except FileNotFoundError:  # another process's cleanup came first
            pass
    return removed


def _build_worker(args, spec, store, load: dict, speed: dict | None, loras: dict[str, str]):
    from cogvideox.serve.worker import PipelineGenerator, Worker

    return Worker(
        store,
        PipelineGenerator(args.model, load=load, speed=speed, loras=loras),
        args.data_dir,
        spec.name,
        lease_seconds=args.lease_seconds,
        poll_interval=args.poll_interval,
    )


def api_keys(flags: list[str], variable: str | None) -> tuple[str, ...]:
    """The keys from `--api-key` flags and the environment variable's value (None: unset). An empty key
    is refused, not skipped: `--api-key "$KEY"` with KEY unset would otherwise open the service to all."""
    from cogvideox.errors import InputError

    for key in flags:
        if not key.strip():
            raise InputError("--api-key is empty (an unset variable?); give a key, or leave the flag out to run without keys")
    from_variable = () if variable is None else tuple(k.strip() for k in variable.split(",") if k.strip())
    if variable is not None and not from_variable:
        raise InputError(f"${ENV_API_KEYS} is set but holds no key; unset it to run without keys")
    keys = tuple(k.strip() for k in flags) + from_variable
    for key in keys:
        # A header is Latin-1 to the server and ASCII to most clients: a key with another character could
        # never be sent as it was given, and would lock every client out.
        if not all(" " <= character <= "~" for character in key):
            raise InputError("an API key may hold printable ASCII characters only (letters, digits, punctuation), "
                             "as an HTTP header carries it; choose another key")  # fmt: skip
    return keys


def run_serve(args: argparse.Namespace) -> int:
    _require_serve_extra()
    import uvicorn

    from cogvideox.serve.app import Settings, create_app
    from cogvideox.serve.jobs import open_store
    from cogvideox.serve.spec import ModelSpec

    _setup_logging(args.log_level)
    # A request waits for its rewrite: fewer, shorter tries than a command's, then the prompt as given.
    enhancer = prompt_enhancer(args, timeout=30.0, attempts=2, backoff=0.5)
    load, speed = load_settings(args)
    keys = api_keys(args.api_key, os.environ.get(ENV_API_KEYS))
    check_listening(args.host, args.port)
    sizes = tuple(s.strip() for s in (args.sizes or "").split(",") if s.strip())
    loras = served_loras(args.lora, check_files=not args.no_worker)  # an API alone only needs the names
    spec = ModelSpec.load(args.model, args.model_name, sizes, tuple(loras), args.variant)
    if not keys and not _is_loopback(args.host):
        log.warning("listening on %s without an API key: anyone who can reach it can use the GPU", args.host)
    settings = Settings(
        data_dir=Path(args.data_dir),
        api_keys=keys,
        rate_limit=args.rate_limit,
        max_active_per_key=args.max_queue,
        max_steps=args.max_steps,
        prompt_enhancer=enhancer,
        expire_after=args.expire_after * 3600 if args.expire_after else None,
    )
    make_data_dir(args.data_dir)
    store = open_store(args.db, args.data_dir)
    worker = None if args.no_worker else _build_worker(args, spec, store, load, speed, loras)
    app = create_app(spec, store, settings, worker)
    log.info("serving %s (sizes %s) at http://%s:%d/", spec.name, ", ".join(spec.sizes), args.host, args.port)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        store.close()
    return 0


def run_worker(args: argparse.Namespace) -> int:
    _require_serve_extra()
    from cogvideox.serve.jobs import open_store
    from cogvideox.serve.spec import ModelSpec

    _setup_logging(args.log_level)
    load, speed = load_settings(args)
    loras = served_loras(args.lora)
    spec = ModelSpec.load(args.model, args.model_name, loras=tuple(loras), variant=args.variant)
    make_data_dir(args.data_dir)
    store = open_store(args.db, args.data_dir)
    worker = _build_worker(args, spec, store, load, speed, loras)
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
