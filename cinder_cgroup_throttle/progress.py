"""Progress of active copies (bytes done, total, percent, rate, ETA), from any process.

Everything is derived from the registry entry and the kernel, so the CLI or a monitoring
agent sees the same numbers as the process that runs the copy. Bytes done come from the
copy's backend (``CopyBackend.bytes_done``, rebuilt from the entry):

* the pv fallback: the pipeline's state next to the registry entry (``<id>.pipe.json``),
  where the pipeline publishes the bytes its copier wrote (or qemu-img's ``rchar``,
  from a /proc entry a non-root reader could not read);
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
import contextlib
import dataclasses
import os
import stat
import time
from typing import Any, Deque, Dict, List, Optional, Tuple

from cinder_cgroup_throttle import backends, privileged
from cinder_cgroup_throttle.exception import ThrottleError
from cinder_cgroup_throttle.registry import Entry, Registry
from cinder_cgroup_throttle.statefiles import FINISHED_NAME, StateDirError

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

    def __init__(self, registry: Registry, window: float = 0.0,
                 executor: Optional[privileged.Executor] = None) -> None:
        self.registry = registry
        self.window = window
        self.executor = executor or privileged.executor()
        self._samples: Dict[str, Deque[Tuple[float, int]]] = {}

    def sample(self, entry: Entry) -> Progress:
        try:  # the copy's backend counts, from the entry alone
            done, source, argvs = backends.for_entry(
                entry, self.executor, self.registry.directory).bytes_done(entry)
        except ThrottleError:  # an entry naming a cgroup that is not ours: unknown
            done, source, argvs = None, 'none', []
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


# -- per volume: migration progress and the last finished copy --------------------------------
#: Finished copies: one flat state file per volume and kind (statefiles.FINISHED_NAME).
FINISHED_KEEP_S = 86400.0  # records older than this are pruned when a copy ends
WIPE_SOURCE = '/dev/zero'
_KINDS = ('data', 'wipe')


def copy_kind(src: str) -> str:
    """'wipe' for a copy from /dev/zero (a deleted volume's clear), else 'data'."""
    return 'wipe' if src == WIPE_SOURCE else 'data'


def _record_name(volume_id: Optional[str], kind: str) -> Optional[str]:
    name = 'finished-%s.%s.json' % (volume_id, kind)
    return name if kind in _KINDS and FINISHED_NAME.match(name) else None


def record_finished(registry: Registry, entry: Entry, ok: bool,
                    executor: Optional[privileged.Executor] = None) -> None:
    """Remember the end of a volume's copy, so that a volume's progress reads 100% (or
    failed) after its copy's registry entry is gone, in this process and in the CLI."""
    name = _record_name(entry.volume_id, copy_kind(entry.src))
    if not name:
        return
    sampled = ProgressMonitor(registry, executor=executor).sample(entry)
    done = sampled.bytes_done
    if ok and sampled.total_bytes and (done is None or done < sampled.total_bytes):
        done = sampled.total_bytes  # counters lag (v1 charges some writes late)
    now = time.time()
    files = registry.files
    files.makedirs()
    files.write_json(name, {'volume_id': entry.volume_id, 'copy_id': entry.id,
                            'kind': copy_kind(entry.src), 'ok': ok, 'bytes_done': done,
                            'total_bytes': sampled.total_bytes, 'bps_limit': entry.bps_limit,
                            'backend': entry.backend, 'started': entry.started,
                            'ended': now,
                            'average_bps': (done / (now - entry.started)
                                            if done and now > entry.started else None)})
    for other in files.names():
        if FINISHED_NAME.match(other):
            with contextlib.suppress(OSError, ThrottleError):
                st = files.lstat(other)
                if stat.S_ISREG(st.st_mode) and now - st.st_mtime > FINISHED_KEEP_S:
                    files.remove(other)


def forget_finished(registry: Registry, volume_id: str) -> None:
    """A new migration of the volume starts: its earlier copies say nothing about it."""
    for kind in _KINDS:
        name = _record_name(volume_id, kind)
        if name:
            with contextlib.suppress(FileNotFoundError, StateDirError):
                registry.files.remove(name)


def last_finished(registry: Registry, volume_id: str,
                  kind: str = 'data') -> Optional[Dict[str, Any]]:
    """The volume's last finished copy of ``kind``; None when unknown or unreadable (the
    file may come from a less privileged writer: StateDir's checks, checked types)."""
    name = _record_name(volume_id, kind)
    if not name:
        return None
    try:
        record = registry.files.read_json(name)
    except (OSError, ThrottleError):
        return None
    if (record.get('volume_id') != volume_id or not isinstance(record.get('ok'), bool)
            or not _is_number(record.get('ended'))
            or not all(record.get(k) is None or _is_number(record[k])
                       for k in ('bytes_done', 'total_bytes', 'average_bps', 'bps_limit',
                                 'started'))
            or not all(record.get(k) is None or isinstance(record[k], str)
                       for k in ('copy_id', 'kind', 'backend'))):
        return None
    return record


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass
class VolumeProgress:
    """A volume's copy progress with the semantics of Cinder's migration progress API:
    'NA' before a copy is known, '0%' while starting, the copied percent while copying,
    '100%' once done."""

    volume_id: str
    state: str  # 'unknown', 'starting', 'copying', 'done' or 'failed'
    percent: Optional[int]
    copies: List[Tuple[Entry, Progress]]
    finished: Optional[Dict[str, Any]]

    @property
    def text(self) -> str:
        return 'NA' if self.percent is None else '%d%%' % self.percent

    def as_dict(self) -> Dict[str, Any]:
        return {'volume_id': self.volume_id, 'progress': self.text, 'state': self.state,
                'percent': self.percent, 'finished': self.finished,
                'copies': [dict(dataclasses.asdict(e), kind=copy_kind(e.src),
                                progress=p.as_dict()) for e, p in self.copies]}


def volume_progress(registry: Registry, volume_id: str,
                    migration_status: Optional[str] = None,
                    samples: Optional[Dict[str, Progress]] = None,
                    interval: float = 0.0) -> VolumeProgress:
    """Progress of the volume's data copy (a migration's, a clone's, an image's; a wipe of
    the volume is shown with its copies but is not its progress).

    ``migration_status`` is Cinder's (None where the database is not at hand, e.g. the
    CLI): 'starting'/'migrating' without a copy yet reads 0%, 'success' 100%.
    ``samples``: progress already measured for some copy ids (rates need two samples).
    """
    entries = [e for e in registry.entries() if e.volume_id == volume_id]
    samples = dict(samples or {})
    missing = [e for e in entries if e.id not in samples]
    for entry, p in zip(missing, snapshot(registry, missing, interval)):
        samples[entry.id] = p
    copies = [(e, samples[e.id]) for e in entries]
    finished = last_finished(registry, volume_id)
    data = [p for e, p in copies if copy_kind(e.src) == 'data']
    if data:
        percent = min(int(p.percent or 0) for p in data)  # never 100 before it ends
        return VolumeProgress(volume_id, 'starting' if not any(p.bytes_done for p in data)
                              else 'copying', min(percent, 99), copies, finished)
    if migration_status == 'success' or (finished and finished['ok']):
        return VolumeProgress(volume_id, 'done', 100, copies, finished)
    if migration_status in ('starting', 'migrating'):
        return VolumeProgress(volume_id, 'starting', 0, copies, finished)
    return VolumeProgress(volume_id, 'failed' if finished else 'unknown', None, copies,
                          finished)


# -- metrics: Prometheus text exposition format (node_exporter's textfile collector) -----------
_METRICS = (
    ('bytes_done', 'Bytes the copy has written (or read, for a file destination)'),
    ('bytes_total', 'Bytes the copy will copy'),
    ('rate_bytes_per_second', 'Current rate of the copy'),
    ('limit_bytes_per_second', 'Rate limit in force for the copy'),
    ('progress_ratio', 'Done / total, 0 to 1'),
)
METRIC_PREFIX = 'cinder_volume_copy_'


def _label(value: Optional[str]) -> str:
    return (value or '').replace('\\', '\\\\').replace('"', '\\"').replace('\n', '\\n')


def metrics_text(entries: List[Entry], samples: List[Progress]) -> str:
    """Gauges per active copy, labelled with copy, volume, kind and backend, and the
    number of active copies; a gauge without a known value is left out."""
    out = []
    for name, help_ in _METRICS:
        out += ['# HELP %s%s %s.' % (METRIC_PREFIX, name, help_),
                '# TYPE %s%s gauge' % (METRIC_PREFIX, name)]
        for entry, p in zip(entries, samples):
            value = {'bytes_done': p.bytes_done, 'bytes_total': p.total_bytes,
                     'rate_bytes_per_second': p.rate_bps, 'limit_bytes_per_second':
                     entry.bps_limit or None,
                     'progress_ratio': None if p.percent is None else p.percent / 100}[name]
            if value is not None:
                out.append('%s%s{copy="%s",volume="%s",kind="%s",backend="%s"} %s' % (
                    METRIC_PREFIX, name, _label(entry.id), _label(entry.volume_id),
                    copy_kind(entry.src), _label(entry.backend),
                    value if isinstance(value, int) else '%.6g' % value))
    out += ['# HELP %sactive Active throttled copies.' % METRIC_PREFIX,
            '# TYPE %sactive gauge' % METRIC_PREFIX,
            '%sactive %d' % (METRIC_PREFIX, len(entries))]
    return '\n'.join(out) + '\n'
