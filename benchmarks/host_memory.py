"""Host memory of this process, for the benchmarks: the kernel's counters and a sampled peak.

`status()` reads VmRSS, VmHWM, RssAnon and RssFile from /proc/self/status (Linux). `HostPeak` samples
them in a background thread while a block runs and keeps the highest of each: RSS (what `memory.py`
reports), anonymous memory (what cannot go back to the page cache) and mapped file pages.
"""

from __future__ import annotations

import resource
import threading

FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssFile of this process in bytes; where /proc is missing, VmRSS and VmHWM
    are the peak that getrusage reports and the others 0."""
    try:
        fields = {}
        with open("/proc/self/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in FIELDS:
                    fields[name] = int(value.split()[0]) * 1024
        return fields
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"VmRSS": peak, "VmHWM": peak, "RssAnon": 0, "RssFile": 0}


class HostPeak:
    """`with HostPeak() as peak:` ... then `peak.rss`, `peak.anon`, `peak.file`: the highest values seen,
    sampled every `interval` seconds, at the start and at the end included."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.rss = self.anon = self.file = 0

    def _take(self) -> None:
        s = status()
        self.rss = max(self.rss, s["VmRSS"])
        self.anon = max(self.anon, s["RssAnon"])
        self.file = max(self.file, s["RssFile"])

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

    def __enter__(self) -> HostPeak:
        self._take()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._take()
