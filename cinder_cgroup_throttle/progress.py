"""Progress of active copies (bytes done, total, percent, rate, ETA), from any process.

Everything is derived from the registry entry and the kernel, so the CLI or a monitoring
agent sees the same numbers as the process that runs the copy. Bytes done come from:

* the pv fallback: the pipeline's state next to the registry entry (``<id>.pipe.json``),
  where the pipeline publishes its writer dd's ``wchar`` (it can read its own children's
  /proc entries, a non-root reader could not);
* the cgroup backend: the leaf's own counters (v1 ``blkio.throttle.io_service_bytes``, v2
  ``io.stat``) in the direction the limit is on (limits.py: writes to the destination
  device, else reads from the source device). They count what the throttle charged and
  outlive the copy's processes;
* the copy processes' I/O counters (psutil ``write_chars``/``read_chars`` of the leaf's
  processes), which also see buffered writes that v1 does not charge.

The larger of the last two wins: each can only lag behind the copy, never run ahead of it
(apart from readahead, which is why percent is capped at 100).
"""
from __future__ import annotations

import collections
import dataclasses
import os
import stat
import time
from typing import Any, Deque, Dict, List, Optional, Tuple

import psutil

from cinder_cgroup_throttle import pipeline
from cinder_cgroup_throttle.limits import plan_limits
from cinder_cgroup_throttle.cleanup import entry_leaf
from cinder_cgroup_throttle.exception import ThrottleError
from cinder_cgroup_throttle.registry import Entry, Registry

_DD_SUFFIXES = {'': 1, 'c': 1, 'w': 2, 'b': 512, 'kB': 10**3, 'K': 2**10, 'KiB': 2**10,
                'MB': 10**6, 'M': 2**20, 'MiB': 2**20, 'GB': 10**9, 'G': 2**30,
                'GiB': 2**30, 'TB': 10**12, 'T': 2**40, 'TiB': 2**40}


@dataclasses.dataclass
class Progress:
    """One copy's progress at one moment; None where it cannot be known."""

    bytes_done: Optional[int]
    total_bytes: Optional[int]
    rate_bps: Optional[float]  # over the last sampling interval
    average_bps: Optional[float]  # since the copy started
    source: str  # where bytes_done came from: 'cgroup', 'psutil', 'pv' or 'none'

    @property
    def percent(self) -> Optional[float]:
        if self.bytes_done is None or not self.total_bytes:
            return None
        return min(100.0, 100.0 * self.bytes_done / self.total_bytes)

    @property
    def eta_s(self) -> Optional[float]:
        if self.bytes_done is None or not self.total_bytes:
            return None
        left = max(0, self.total_bytes - self.bytes_done)
        if not left:
            return 0.0
        # Only a measured current rate: the average is skewed by the start (and by a
        # set-limit), and 0 means stalled (owner dead), not "later".
        return left / self.rate_bps if self.rate_bps else None

    def as_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(percent=self.percent, eta_s=self.eta_s)
        return out


def _dd_size(value: str) -> int:
    """dd's number syntax for count=/bs=: digits with an optional suffix, 'x' products."""
    total = 1
    for factor in value.split('x'):
        digits = factor.rstrip('cwbkKMGTBi')
        total *= int(digits) * _DD_SUFFIXES[factor[len(digits):]]
    return total


def dd_total(argv: List[str]) -> Optional[int]:
    """Bytes a dd argv will copy (Cinder always passes count=, usually count_bytes)."""
    ops = dict(a.split('=', 1) for a in argv[1:] if '=' in a)
    try:
        if 'count' not in ops:
            return None
        count = _dd_size(ops['count'])
        if 'count_bytes' in ops.get('iflag', '').split(','):
            return count
        return count * _dd_size(ops.get('ibs') or ops.get('bs') or '512')
    except (KeyError, ValueError):
        return None


def path_size(path: str) -> Optional[int]:
    """Size of a block device or regular file, None for anything else (/dev/zero)."""
    try:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode):
            return st.st_size
        if stat.S_ISBLK(st.st_mode):
            fd = os.open(path, os.O_RDONLY)
            try:
                return os.lseek(fd, 0, os.SEEK_END)
            finally:
                os.close(fd)
    except OSError:
        pass
    return None


class ProgressMonitor:
    """Samples the copies of one registry; the current rate is the change over the last
    ``window`` seconds of samples (at least the last two samples).

    Counters move in whole I/O requests (1 MiB for Cinder's dd), so a rate over a short
    window jitters by one request; a window of a few seconds smooths that out.
    """

    def __init__(self, registry: Registry, window: float = 0.0) -> None:
        self.registry = registry
        self.window = window
        self._samples: Dict[str, Deque[Tuple[float, int]]] = {}

    def sample(self, entry: Entry) -> Progress:
        done, source, argvs = _bytes_done(entry, self.registry.directory)
        now = time.monotonic()
        rate = None
        if done is not None:
            samples = self._samples.setdefault(entry.id, collections.deque())
            while len(samples) > 1 and now - samples[1][0] >= self.window:
                samples.popleft()
            if samples and now > samples[0][0]:
                rate = max(0.0, (done - samples[0][1]) / (now - samples[0][0]))
            samples.append((now, done))
        elapsed = time.time() - entry.started
        average = done / elapsed if done is not None and elapsed > 0 else None
        return Progress(done, _total(entry, argvs), rate, average, source)


def snapshot(registry: Registry, entries: List[Entry],
             interval: float = 0.5) -> List[Progress]:
    """Progress of every entry, with rates measured over ``interval`` seconds."""
    monitor = ProgressMonitor(registry)
    for entry in entries:
        monitor.sample(entry)
    if entries and interval > 0:
        time.sleep(interval)
    return [monitor.sample(entry) for entry in entries]


def _total(entry: Entry, argvs: List[List[str]]) -> Optional[int]:
    if entry.total_bytes:
        return entry.total_bytes
    for argv in argvs:
        if os.path.basename(argv[0]) == 'dd':
            total = dd_total(argv)
            if total is not None:
                return total
    return path_size(entry.src)


def _pipeline_bytes(state: Dict[str, Any]) -> Tuple[Optional[int], str, List[List[str]]]:
    """The pipeline publishes its writer dd's byte count (it can read its own /proc)."""
    done = state.get('bytes')
    return (None, 'none', []) if done is None else (int(done), 'pv', [])


def _bytes_done(entry: Entry, state_dir: str) -> Tuple[Optional[int], str, List[List[str]]]:
    """(bytes done, source, argv of the copy's processes)."""
    if entry.backend == 'pv':
        try:
            return _pipeline_bytes(pipeline.read_pipe_state(state_dir, entry.id) or {})
        except ThrottleError:  # a foreign pipe.json: no progress known
            return None, 'none', []
    try:
        located = entry_leaf(entry)
    except ThrottleError:
        located = None
    if located is None:
        return None, 'none', []
    driver, leaf = located
    planned = plan_limits(*entry.devices(), 1)  # the direction the copy's limit is on
    writes = bool(planned and planned[0].wbps)
    device = planned[0].device.majmin if planned else None
    counters = driver.io_bytes(leaf)
    best, source = None, 'none'
    if device in counters:
        best, source = counters[device][1 if writes else 0], 'cgroup'
    chars, argvs = 0, []
    for pid in driver.pids(leaf):
        try:
            proc = psutil.Process(pid)
            io = proc.io_counters()
            argvs.append(proc.cmdline())
        except psutil.Error:
            continue
        chars += io.write_chars if writes else io.read_chars
    if argvs and (best is None or chars > best):
        best, source = chars, 'psutil'
    return best, source, argvs
