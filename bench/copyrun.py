"""One copy exactly as Cinder makes it, timed from the outside.

Every copy goes through ``cinder.volume.volume_utils.copy_volume`` (so the dd argv, the
O_DIRECT probing and the ``subcommand`` protocol are Cinder's own) with two hooks:

* a probe around the throttle's ``subcommand`` that times what the throttle costs before
  the dd starts (setup) and after it exits (teardown);
* an ``execute`` that runs the dd and reaps it with ``wait4`` for its wall time and the CPU
  of it and every process it waited for (cgexec exec()s dd; the pv fallback's wrapper waits
  for its pv | dd), without mixing up concurrent copies.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import tempfile
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

MiB = 1 << 20

_live: Set[subprocess.Popen] = set()
_live_lock = threading.Lock()


class CopyFailed(RuntimeError):
    pass


@dataclasses.dataclass
class CopyResult:
    throttle: str
    src: str
    dst: str
    nbytes: int
    bs: str
    prefix: List[str] = dataclasses.field(default_factory=list)
    setup_s: float = 0.0
    teardown_s: float = 0.0
    dd_s: float = 0.0
    cpu_s: float = 0.0
    start: float = 0.0  # time.monotonic() when the dd was spawned
    end: float = 0.0

    @property
    def bps(self) -> float:
        return self.nbytes / self.dd_s

    @property
    def overhead_s(self) -> float:
        return self.setup_s + self.teardown_s

    @property
    def backend(self) -> str:
        """What actually throttled the copy, read off the prefix Cinder was given."""
        if not self.prefix:
            return 'none'
        if self.prefix[0] == 'cgexec':
            return 'cgroup'
        return 'pv' if 'pipe' in os.path.basename(self.prefix[0]) else self.prefix[0]


class _Probe:
    """A throttle wrapper timing the inner throttle's work outside the copy command."""

    def __init__(self, inner: Any, result: CopyResult) -> None:
        self.inner = inner
        self.result = result

    @contextlib.contextmanager
    def subcommand(self, srcpath: str, dstpath: str) -> Iterator[Dict[str, Any]]:
        t0 = time.perf_counter()
        with self.inner.subcommand(srcpath, dstpath) as cmd:
            self.result.setup_s = time.perf_counter() - t0
            self.result.prefix = list(cmd['prefix'])
            try:
                yield cmd
            finally:
                t2 = time.perf_counter()
        self.result.teardown_s = time.perf_counter() - t2


def _stop(proc: subprocess.Popen) -> None:
    """Interrupted: end our own child (SIGTERM, then SIGKILL) and reap it."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except (ProcessLookupError, ChildProcessError):
        pass


def _executor(result: CopyResult):
    def execute(*cmd: str, **_kwargs: Any):
        with tempfile.TemporaryFile() as err:
            result.start = time.monotonic()
            proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err)
            with _live_lock:
                _live.add(proc)
            try:
                _pid, status, usage = os.wait4(proc.pid, 0)
            except BaseException:
                _stop(proc)
                raise
            finally:
                with _live_lock:
                    _live.discard(proc)
            result.end = time.monotonic()
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode:
                err.seek(0)
                raise CopyFailed('%s exited %d: %s' % (' '.join(cmd), proc.returncode,
                                                       err.read().decode(errors='replace')))
        result.dd_s = result.end - result.start
        result.cpu_s = usage.ru_utime + usage.ru_stime
        return '', ''
    return execute


def stop_all() -> None:
    """Ctrl-C: end every copy command still running so their threads can clean up."""
    with _live_lock:
        procs = list(_live)
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)


def run_copy(name: str, throttle: Any, src: str, dst: str, size_mib: int,
             bs: str = '1M') -> CopyResult:
    """Copy ``size_mib`` MiB from src to dst with Cinder's copy_volume under ``throttle``."""
    from cinder.volume import volume_utils
    result = CopyResult(name, src, dst, size_mib * MiB, bs)
    volume_utils.copy_volume(src, dst, size_mib, bs, throttle=_Probe(throttle, result),
                             execute=_executor(result))
    return result


def run_concurrently(jobs: List[Any]) -> List[CopyResult]:
    """Run ``jobs`` (callables returning CopyResult) all at once; re-raise the first error."""
    results: List[Optional[CopyResult]] = [None] * len(jobs)
    errors: List[BaseException] = []
    barrier = threading.Barrier(len(jobs))

    def one(i: int) -> None:
        try:
            barrier.wait()
            results[i] = jobs[i]()
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(jobs))]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except BaseException:
        stop_all()
        for t in threads:
            t.join(30)
        raise
    if errors:
        raise errors[0]
    return [r for r in results if r is not None]


class DeviceSampler:
    """Bytes written to a block device over time, from /sys/class/block/<dev>/stat."""

    def __init__(self, dev: str, interval: float = 0.05) -> None:
        self.stat = '/sys/class/block/%s/stat' % os.path.basename(os.path.realpath(dev))
        self.interval = interval
        self.samples: List[tuple] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _written(self) -> int:
        with open(self.stat) as f:
            return int(f.read().split()[6]) * 512  # field 7: sectors written

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self._written()))
            self._stop.wait(self.interval)

    def __enter__(self) -> 'DeviceSampler':
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.monotonic(), self._written()))

    def per_second(self, start: float, end: float) -> Tuple[List[float], List[float]]:
        """(bytes/s, bin edges in seconds since start): one-second bins from ``start``,
        the last one 1-1.5 s long to reach ``end``."""
        def at(t: float) -> float:
            # Linear interpolation between samples.
            prev = self.samples[0]
            for cur in self.samples:
                if cur[0] >= t:
                    if cur[0] == prev[0]:
                        return cur[1]
                    return prev[1] + (cur[1] - prev[1]) * (t - prev[0]) / (cur[0] - prev[0])
                prev = cur
            return self.samples[-1][1]
        rates, edges = [], [0.0]
        t = start
        while t < end - 1e-3:
            # A short remainder joins the last bin: a 20 ms bin holding one 1 MiB write
            # would plot as a spike that no one sees on the device.
            t1 = end if end - t < 1.5 else t + 1.0
            rates.append((at(t1) - at(t)) / (t1 - t))
            edges.append(t1 - start)
            t = t1
        return rates, edges
