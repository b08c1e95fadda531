"""A worker: claims jobs from the queue, runs the `Pipeline` on them, writes the MP4s, reports back.

One worker per GPU (`cogvideox worker`), or one inside the API process (`cogvideox serve`'s default). The
generation itself is the library's: the worker only turns a job's parameters into a `Pipeline` call and
its progress callback into lease renewals, and the callback is also where a cancelled job is stopped.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

import cogvideox.video
from cogvideox.errors import InputError, NonFiniteError, OutOfMemoryError
from cogvideox.serve.inputs import input_path, read_input_video
from cogvideox.serve.jobs import Job, JobStore
from cogvideox.video import export_or_rescue, read_video

log = logging.getLogger("cogvideox.serve")

# Share of the progress bar the denoising loop fills; decoding and writing the MP4 take the rest.
_DENOISE_SHARE = 90
# Seconds waited before each new try at writing a video the data folder refused (a full disk, which the
# sweep of expired videos or the operator may free meanwhile); after the last, the video goes elsewhere.
WRITE_RETRY_DELAYS = (2.0, 10.0)


def video_path(data_dir: str | Path, job_id: str) -> Path:
    """Where a job's MP4 lives (ids are checked by `jobs.is_job_id` before they get here)."""
    return Path(data_dir) / "videos" / f"{job_id}.mp4"


@dataclass
class Generated:
    frames: np.ndarray  # uint8 [F, H, W, 3]
    timings: dict[str, float]
    record: dict | None = None  # how it was made (`cogvideox.provenance`), kept in the MP4


class Generator(Protocol):
    """Makes the frames of one job; calls `on_step(done, total)` after each denoising step."""

    def __call__(self, params: dict[str, Any], on_step: Callable[[int, int], None]) -> Generated: ...


def load_served_loras(pipe, loras: dict[str, str]) -> None:
    """Load the LoRAs a service serves ({name: path}) into `pipe` under their names, none of them running:
    each job chooses its own (`Pipeline.set_adapters`)."""
    for name, path in loras.items():
        pipe.load_lora(path, name=name)
        log.info("LoRA %s: %s", name, path)
    if loras:
        pipe.set_adapters([])


class PipelineGenerator:
    """The real generator: a `Pipeline`, loaded on first use (in the worker's thread) or handed in.

    load: `Pipeline.from_pretrained`'s keywords besides the model (dtype, device, offload, text_device,
    vae_tiling); speed: `Pipeline.accelerate`'s (quantize, compile, cache, attention), or None for none.
    loras: {name: path} of the LoRAs a job may run (`serve --lora NAME=PATH`), all loaded at start and
    chosen per job (`Pipeline.set_adapters`); a handed-in `pipe` must hold them under those names
    (`load_served_loras`).
    """

    def __init__(self, model: str | None = None, load: dict | None = None, speed: dict | None = None, pipe=None,
                 loras: dict[str, str] | None = None):  # fmt: skip
        self.model, self.load_options, self.speed = model, dict(load or {}), speed
        self.pipe = pipe
        self.loras = dict(loras or {})

    def load(self) -> None:
        if self.pipe is None:
            from cogvideox.pipeline import Pipeline

            pipe = Pipeline.from_pretrained(self.model, **self.load_options)
            load_served_loras(pipe, self.loras)  # before accelerate(), which keeps them live (see serve)
            if self.speed:
                log.info("speed levers: %s", pipe.accelerate(**self.speed).acceleration.describe())
            if pipe.offload_choice:  # after quantising, which may let "auto" choose a faster mode
                log.info("%s", pipe.offload_choice)
            self.pipe = pipe

    def __call__(self, params: dict[str, Any], on_step: Callable[[int, int], None]) -> Generated:
        from cogvideox.request import denoising_steps

        self.load()
        runs = denoising_steps(params["num_inference_steps"], params.get("strength"))
        prompt = params.get("enhanced_prompt") or params["prompt"]
        request = dict(
            negative_prompt=params["negative_prompt"],
            num_frames=params["num_frames"],
            height=params["height"],
            width=params["width"],
            num_inference_steps=params["num_inference_steps"],
            guidance_scale=params["guidance_scale"],
            riflex=params.get("riflex", False),
        )
        if "resize" in params:  # the first frame or the video sent: how it is resized
            request["resize"] = params["resize"]
        chosen = params.get("lora", [])
        if chosen or self.loras:
            missing = [name for name, _ in chosen if name not in self.loras]
            if missing:
                raise InputError(f"this worker serves no LoRA named {missing[0]!r} (start it with --lora "
                                 f"{missing[0]}=PATH, as the server)")  # fmt: skip
            self.pipe.set_adapters([name for name, _ in chosen], [scale for _, scale in chosen])
        result = self.pipe(
            prompt,
            **request,
            seed=params["seed"],
            image=params.get("image"),
            last_image=params.get("last_image"),
            video=params.get("video"),  # a remix: the frames it redraws
            strength=params.get("strength"),
            progress=False,
            callback=lambda i, t, latents: on_step(i + 1, runs),
        )
        return Generated(result.frames[0], dict(result.timings), self._record(prompt, params, request, chosen))

    def _record(self, prompt: str, params: dict[str, Any], request: dict, loras: list) -> dict:
        from cogvideox import provenance
        from cogvideox.batch import pipeline_settings

        images = params.get("image") is not None
        sent = params.get("video_input") is not None  # a video the client sent, redrawn (not a remix's)
        given = "image" if images else "video" if sent else None
        settings = pipeline_settings(self.pipe, prompt, request, params["fps"], given) | {"model": self.model}
        if self.load_options.get("variant") is not None:
            settings["variant"] = self.load_options["variant"]
        return provenance.record(
            prompt,
            params["seed"],
            settings,
            prompt_idea=params["prompt"] if prompt != params["prompt"] else None,
            image=params.get("input_name") if images else None,  # the client's name for it: the file it has
            last_image=params.get("last_name"),
            video=params.get("input_name") if sent else None,
            video_fps=params["fps"] if sent else None,
            remix_of=params.get("remix_of"),
            strength=params.get("strength"),
            lora=[[self.loras[name], scale] for name, scale in loras],
            **provenance.lever_settings(self.pipe),
        )


class _StorageError(Exception):
    """The video was made but could not be written to the server's data folder."""


class _Stop(Exception):
    """Raised from the progress callback to abandon the running job."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # "lost" (cancelled, deleted or taken over) or "shutdown"


class _Lease:
    """Renews a claimed job's lease from a background thread while the job runs, carrying its progress.

    A thread, not the step callback, so that a long step or the VAE decode cannot outlast the lease.
    """

    def __init__(self, store: JobStore, job: Job, worker: str, lease_seconds: float) -> None:
        self.store, self.job, self.worker, self.lease_seconds = store, job, worker, lease_seconds
        self.progress = 0
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job.id}", daemon=True)

    def __enter__(self) -> _Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def _beat(self) -> None:
        interval = min(0.5, self.lease_seconds / 4)
        while not self._done.wait(interval):
            try:
                if not self.store.heartbeat(self.job.id, self.worker, self.lease_seconds, self.progress):
                    self.lost.set()
                    return
            except Exception as e:  # the database is away for a moment: keep working, try again
                log.warning("lease renewal of %s failed: %s", self.job.id, e)


class Worker:
    """Runs jobs of one model from `store`, one at a time, writing MP4s under `data_dir/videos`."""

    def __init__(
        self,
        store: JobStore,
        generate: Generator,
        data_dir: str | Path,
        model: str,
        lease_seconds: float = 60.0,
        poll_interval: float = 0.5,
        max_attempts: int = 3,
        write_retry_delays: tuple[float, ...] = WRITE_RETRY_DELAYS,
    ) -> None:
        self.store, self.generate, self.model = store, generate, model
        self.data_dir = Path(data_dir)
        (self.data_dir / "videos").mkdir(parents=True, exist_ok=True)
        self.lease_seconds, self.poll_interval, self.max_attempts = lease_seconds, poll_interval, max_attempts
        self.write_retry_delays = write_retry_delays
        self.name = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.state = "loading"
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------------------------------------------
    # Running

    def run_once(self) -> bool:
        """Claim and run one job; False when the queue had none."""
        job = self.store.claim(self.name, self.model, self.lease_seconds, self.max_attempts)
        if job is None:
            return False
        log.info("%s: running %s (attempt %d)", self.name, job.id, job.attempts)
        with _Lease(self.store, job, self.name, self.lease_seconds) as lease:

            def on_step(done: int, total: int) -> None:
                lease.progress = _DENOISE_SHARE * done // total
                if lease.lost.is_set():
                    raise _Stop("lost")
                if self._stopping.is_set():
                    raise _Stop("shutdown")

            try:
                generated = self.generate(self._inputs(job.params), on_step)
                if lease.lost.is_set():
                    raise _Stop("lost")
                start = time.perf_counter()
                path = self._store(job, generated)
                timings = {**generated.timings, "write": time.perf_counter() - start}
            except _Stop as stop:
                if stop.reason == "shutdown":
                    self.store.release(job.id, self.name)
                log.info("%s: stopped %s (%s)", self.name, job.id, stop.reason)
                return True
            except Exception as e:
                self._report_failure(job, e)
                return True
        if not self.store.complete(job.id, self.name, timings):
            self._discard(job, path)
        return True

    def _store(self, job: Job, generated: Generated) -> Path:
        """Write the job's MP4. A data folder that refuses it (a full disk) is tried again after each of
        `write_retry_delays`; then the video is written to a new temporary folder, so that the minutes of
        work that made it are not lost, and `_StorageError` says where it went (or that it is lost too)."""
        path = video_path(self.data_dir, job.id)
        fps, record = job.params["fps"], generated.record
        for delay in self.write_retry_delays:
            try:
                return cogvideox.video.export_video(generated.frames, path, fps=fps, metadata=record)
            except (InputError, OSError) as e:  # the request was fine: the server's own folder is not (full)
                log.warning("%s: job %s: cannot write %s (%s); trying again in %gs", self.name, job.id, path,
                            e, delay)  # fmt: skip
            if self._stopping.wait(delay):  # shutting down: no more waiting, the video is kept at once
                break
        try:
            return export_or_rescue(generated.frames, path, fps=fps, metadata=record)
        except InputError as e:  # "could not write PATH (why); the video was saved to RESCUE instead"
            raise _StorageError(str(e)) from None
        except OSError as e:  # the temporary folder takes no file either
            raise _StorageError(f"could not write {path} nor a copy in the temporary folder ({e}); "
                                "the video is lost") from None  # fmt: skip

    def _inputs(self, params: dict[str, Any]) -> dict[str, Any]:
        """A job's parameters with its inputs read: the path of its first frame (image-to-video), the frames
        of the video it redraws (one the client sent, or the one it remixes)."""
        if params.get("image") is not None:
            path = input_path(self.data_dir, params["image"])
            last = input_path(self.data_dir, params["last_image"]) if params.get("last_image") else None
            if not path.is_file() or (last is not None and not last.is_file()):
                which = "first" if not path.is_file() else "last"
                raise InputError(f"the {which} frame of this video is gone from the server (its input was deleted)")
            return params | {"image": path, "last_image": last}
        if params.get("video_input") is not None:
            if not input_path(self.data_dir, params["video_input"]).is_file():
                raise InputError("the video this job redraws is gone from the server (its input was deleted)")
            frames = read_input_video(self.data_dir, params["video_input"], params["fps"], params["num_frames"])
            return params | {"video": frames}
        source = params.get("remix_of")
        if source is None:
            return params
        path = video_path(self.data_dir, source)
        if not path.is_file():
            raise InputError(f"video {source}, which this remix redraws, was deleted before the remix ran")
        return params | {"video": read_video(path)[0]}

    def _report_failure(self, job: Job, error: Exception) -> None:
        if isinstance(error, _StorageError):
            # The operator's problem, and the caller need not learn the server's paths.
            log.error("%s: job %s: cannot store its video: %s", self.name, job.id, error)
            code, message = "internal_error", "the server could not store the video; its operator has the details"
        elif isinstance(error, InputError):
            log.warning("%s: job %s refused: %s", self.name, job.id, error)
            code, message = "invalid_request", str(error)
        elif isinstance(error, NonFiniteError):
            code, message = "generation_failed", str(error)
        elif isinstance(error, OutOfMemoryError) or (
            isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
        ):
            stage = ""
            if isinstance(error, OutOfMemoryError):
                # The pipeline's own error names CLI flags: those are for the operator, the log has them.
                log.warning("%s: job %s: %s", self.name, job.id, error)
                stage = f" ({error.stage})"
            code = "out_of_memory"
            message = f"the GPU ran out of memory{stage}; try a smaller size or fewer seconds"
            _free_gpu_memory()
        else:
            log.exception("%s: job %s failed", self.name, job.id)
            code, message = "internal_error", f"{type(error).__name__}: {error}"
        self.store.fail(job.id, self.name, code, message)

    def _discard(self, job: Job, path: Path) -> None:
        """The job was cancelled, deleted or failed while its file was being written: remove the file,
        unless another worker has the job (it writes the same file: same id, same seed)."""
        current = self.store.get(job.id)
        if current is None or current.status in ("cancelled", "failed"):
            path.unlink(missing_ok=True)

    def run(self) -> None:
        """Load the model, then work until `stop()`."""
        load = getattr(self.generate, "load", None)
        try:
            if load is not None:
                load()
        except Exception as e:
            self.state = "failed"
            log.error("%s: could not load the model: %s", self.name, e)
            raise
        self.state = "ready"
        log.info("%s: ready for %s jobs", self.name, self.model)
        while not self._stopping.is_set():
            try:
                busy = self.run_once()
            except Exception as e:  # the database is away: wait and try again
                log.warning("%s: queue unavailable: %s", self.name, e)
                busy = False
            if not busy:
                self._wake.wait(self.poll_interval)
                self._wake.clear()

    # -------------------------------------------------------------------------------------------------
    # In a thread

    def start(self) -> Worker:
        """Run in a background thread (a model that fails to load leaves `state` "failed", logged)."""
        self._thread = threading.Thread(target=self._run_quietly, name=f"worker-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _run_quietly(self) -> None:
        try:
            self.run()
        except Exception:
            pass  # logged by run(); /healthz shows the state

    def wake(self) -> None:
        """A job was queued: look now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop after the current step; a job cut short goes back to the queue."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)


def _free_gpu_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
