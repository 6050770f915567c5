"""Scratch kernel objects for tests: loop devices, partitions, filesystems, mounts.

Everything is registered for cleanup the moment it exists, and torn down in reverse order
even when the test failed; only objects created here are ever touched.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

MiB = 1 << 20


def fill_random(path: str, size: int) -> str:
    """Random bytes onto ``path`` (device, or file created if missing), past the page
    cache so the copy reads the device; returns their sha256."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | (0 if os.path.exists(path) else os.O_CREAT), 0o644)
    try:
        for offset in range(0, size, 4 * MiB):
            chunk = memoryview(os.urandom(min(4 * MiB, size - offset)))
            digest.update(chunk)
            while chunk:
                chunk = chunk[os.write(fd, chunk):]
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return digest.hexdigest()


def sha256_prefix(path: str, size: int) -> str:
    """sha256 of the first ``size`` bytes of ``path``."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        left = size
        while left:
            chunk = f.read(min(left, 4 * MiB))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def pipe_state(copy_id: str, wrapper_pid: int, started: float, done=None) -> dict:
    """A state file as the pv pipeline publishes it (``<id>.pipe.json``)."""
    return {'id': copy_id, 'tool': 'dd', 'wrapper_pid': wrapper_pid, 'pids': {},
            'pv_pid': None, 'rate': MiB, 'relimit': True, 'rate_error': None,
            'bytes': done, 'total_bytes': None, 'started': started, 'updated': started}


def run(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True, **kw)


class Scratch:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix='cct-', dir='/dev/shm')  # loop images in RAM
        # Mount points outside /dev: Cinder refuses to let qemu-img create files under /dev/.
        self.mnt_dir = tempfile.mkdtemp(prefix='cct-mnt-', dir='/var/tmp')
        self._cleanups: List[Tuple[str, Callable[[], None]]] = []

    def defer(self, what: str, fn: Callable[[], None]) -> None:
        self._cleanups.append((what, fn))

    def close(self) -> None:
        errors = []
        while self._cleanups:
            what, fn = self._cleanups.pop()
            for attempt in range(20):
                try:
                    fn()
                    break
                except Exception as exc:  # keep cleaning the rest
                    if attempt == 19:
                        errors.append('%s: %s' % (what, exc))
                    time.sleep(0.1)
        shutil.rmtree(self.dir, ignore_errors=True)
        if not errors:  # never rm -r through a mount that failed to unmount
            shutil.rmtree(self.mnt_dir, ignore_errors=True)
        if errors:
            raise RuntimeError('scratch cleanup failed: ' + '; '.join(errors))

    # -- devices --------------------------------------------------------------------
    def loop(self, size_mib: int = 64, partscan: bool = False) -> str:
        """A loop device over a sparse file in /dev/shm."""
        fd, backing = tempfile.mkstemp(prefix='loop-', suffix='.img', dir=self.dir)
        os.ftruncate(fd, size_mib * MiB)
        os.close(fd)
        argv = ['losetup', '-f', '--show'] + (['-P'] if partscan else []) + [backing]
        for attempt in range(10):  # another process may grab the same free device
            proc = subprocess.run(argv, capture_output=True, text=True)
            if proc.returncode == 0:
                break
            time.sleep(0.1 * (attempt + 1))
        else:
            raise RuntimeError('losetup failed: %s' % proc.stderr)
        dev = proc.stdout.strip()
        self.defer('losetup -d ' + dev, lambda: run('losetup', '-d', dev))
        return dev

    def partitioned_loop(self, size_mib: int = 96, sizes_mib: Tuple[int, ...] = (40, 40)
                         ) -> Tuple[str, List[str]]:
        """A loop device with a DOS partition table; partitions from the kernel's own
        parser when it has one (partscan), else added from userspace with partx."""
        dev = self.loop(size_mib, partscan=True)
        table = 'label: dos\n' + ''.join(',%dMiB\n' % s for s in sizes_mib)
        run('sfdisk', '-q', '--no-reread', dev, input=table)
        parts = ['%sp%d' % (dev, i + 1) for i in range(len(sizes_mib))]
        subprocess.run(['blockdev', '--rereadpt', dev], capture_output=True)
        if not os.path.exists(parts[0]) or not _sysfs_has_partitions(dev):
            run('partx', '-a', dev)
            self.defer('partx -d ' + dev,
                       lambda: subprocess.run(['partx', '-d', dev], capture_output=True))
        for part in parts:
            _wait_for(lambda p=part: os.path.exists(p), 'partition node %s' % part)
        return dev, parts

    def dm_linear(self, dev: str) -> str:
        """A device-mapper linear device over all of ``dev``; returns /dev/mapper/<name>.

        Without udevd nobody makes the /dev/mapper node: ``dmsetup mknodes`` does, and the
        node is unlinked after ``dmsetup remove`` (which leaves it behind then)."""
        name = 'cct-dm-%d-%s' % (os.getpid(), os.urandom(4).hex())
        sectors = run('blockdev', '--getsz', dev).stdout.strip()
        run('dmsetup', 'create', name, '--table', '0 %s linear %s 0' % (sectors, dev))
        node = '/dev/mapper/' + name

        def remove() -> None:
            run('dmsetup', 'remove', name)
            if os.path.exists(node):
                os.unlink(node)
        self.defer('dmsetup remove ' + name, remove)
        run('dmsetup', 'mknodes', name)
        return node

    def mkfs_mount(self, dev: str, fstype: str) -> str:
        if fstype == 'ext4':
            run('mkfs.ext4', '-q', '-F', dev)
        elif fstype == 'btrfs':
            run('mkfs.btrfs', '-q', '-f', dev)
        else:
            raise ValueError(fstype)
        return self.mount(dev, fstype)

    def mount(self, source: str, fstype: str, options: Optional[str] = None) -> str:
        point = tempfile.mkdtemp(prefix='mnt-', dir=self.mnt_dir)
        argv = ['mount', '-t', fstype] + (['-o', options] if options else []) + [source, point]
        run(*argv)
        self.defer('umount ' + point, lambda: run('umount', point))
        return point

    def tmpfs(self, size_mib: int = 128) -> str:
        return self.mount('tmpfs', 'tmpfs', 'size=%dm' % size_mib)


def _sysfs_has_partitions(dev: str) -> bool:
    name = os.path.basename(dev)
    return any(e.startswith(name + 'p') for e in os.listdir('/sys/block/' + name))


def _wait_for(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError('timed out waiting for ' + what)
        time.sleep(0.05)


_DD_SECONDS = re.compile(r' copied, ([0-9.]+) s, ')


def timed(argv: List[str]) -> float:
    """Run argv, fail loudly with its stderr, return the seconds it took: dd's own figure
    when argv runs dd (a dd that did not report it fails: no silent fall back to wall
    time), else wall time. Starting cgexec and dd is no part of the copy, and in the VM
    lane (TCG emulation) it costs 0.3-0.9 s of wall time."""
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True)
    elapsed = time.monotonic() - t0
    if proc.returncode:
        raise AssertionError('%s failed (%d): %s' % (argv, proc.returncode, proc.stderr))
    found = _DD_SECONDS.findall(proc.stderr)
    if found:
        return float(found[-1])
    if any(os.path.basename(arg) == 'dd' for arg in argv):
        raise AssertionError('%s: dd reported no time of its own: %s' % (argv, proc.stderr))
    return elapsed


def dd_seconds(stderr: str) -> float:
    """dd's own duration from its summary (the last one when several dds reported)."""
    found = _DD_SECONDS.findall(stderr)
    if not found:
        raise AssertionError('no dd summary in: %r' % stderr)
    return float(found[-1])


# -- rate oracles: the kernel's byte counters, sampled here (never through the code under
# test), the rate being the slope of the counter over the middle of a copy -----------------

CGROUP_ROOT = '/sys/fs/cgroup'


def cgroup_dirs(name: str) -> List[str]:
    """Where a cgroup called ``name`` lives in cgroupfs: v1 blkio and/or v2."""
    return [os.path.join(CGROUP_ROOT, sub, name.strip('/')) for sub in ('blkio', '', 'unified')]


def leaf_device_bytes(path: str) -> Optional[Dict[str, Tuple[int, int]]]:
    """{MAJ:MIN: (bytes read, bytes written)} a cgroup counted: v2 ``io.stat``, v1
    ``blkio.throttle.io_service_bytes``; None once it is gone."""
    found: Dict[str, Tuple[int, int]] = {}
    try:
        if os.path.exists(os.path.join(path, 'io.stat')):
            with open(os.path.join(path, 'io.stat')) as f:
                for line in f:
                    dev, *fields = line.split()
                    kv = dict(p.split('=', 1) for p in fields if '=' in p)
                    found[dev] = (int(kv.get('rbytes', 0)), int(kv.get('wbytes', 0)))
        else:
            with open(os.path.join(path, 'blkio.throttle.io_service_bytes')) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 3 and parts[1] in ('Read', 'Write'):
                        r, w = found.get(parts[0], (0, 0))
                        n = int(parts[2])
                        found[parts[0]] = (r + n, w) if parts[1] == 'Read' else (r, w + n)
    except OSError as e:  # ENODEV: the leaf was removed between open and read
        if e.errno in (errno.ENOENT, errno.ENODEV, errno.ESRCH, errno.ENOTDIR):
            return None
        raise
    return found


def leaf_write_limits(path: str) -> Optional[Dict[str, int]]:
    """{MAJ:MIN: write bytes/s} in force on a cgroup (v1 ``write_bps_device``, v2
    ``io.max`` wbps); None once it is gone."""
    try:
        if os.path.exists(os.path.join(path, 'io.max')):
            with open(os.path.join(path, 'io.max')) as f:
                pairs = [(dev, dict(p.split('=', 1) for p in kv).get('wbps'))
                         for dev, *kv in (line.split() for line in f if line.strip())]
        else:
            with open(os.path.join(path, 'blkio.throttle.write_bps_device')) as f:
                pairs = [tuple(line.split()) for line in f if line.strip()]
    except (FileNotFoundError, NotADirectoryError):
        return None
    return {dev: int(v) for dev, v in pairs if v and v != 'max'}


def leaf_bytes(path: str) -> Optional[Tuple[int, int]]:
    """(bytes read, bytes written) a cgroup counted, summed over devices; None once gone."""
    found = leaf_device_bytes(path)
    if found is None:
        return None
    return sum(r for r, _ in found.values()), sum(w for _, w in found.values())


def slope(points: List[Tuple[float, int]]) -> float:
    """Least-squares bytes/s through (time, bytes) points."""
    n = len(points)
    if n < 3:
        raise AssertionError('too few counter steps to measure a rate: %s' % points)
    mt = sum(t for t, _ in points) / n
    mb = sum(b for _, b in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (b - mb) for t, b in points) / den


@contextlib.contextmanager
def sampling_on_time() -> Iterator[None]:
    """Run the calling sampler thread at real-time priority meanwhile: on a busy machine a
    normal thread reads a counter tens of ms after it moved, a timing error the copy never
    made (measured, a 3 s window at 2 MiB/s read 0.937 of its rate; the same copy sampled
    at real-time priority alongside read 0.983). Start no process inside: it would inherit
    the priority."""
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(50))
    try:
        yield
    finally:
        os.sched_setscheduler(0, policy, param)


class RateProbe:
    """Samples byte counters in a background thread during a copy.

    ``series[key]`` are the (time first seen, bytes) steps of each counter: a counter moves
    a block at a time, so the time it is first seen at a value is when that block was done.
    Rates are least-squares slopes through the steps of the middle of a copy (by default
    from 10 % to 90 % of its bytes), so neither process start-up nor the end of a copy nor
    how busy the machine is counts: only how fast the kernel let the bytes through. The
    sampler runs at real-time priority, so a busy machine does not delay what it sees.
    """

    from_zero = True  # the counter starts at 0 with the copy (a leaf's, a process's)

    def __init__(self, interval: float = 0.005, write: bool = True) -> None:
        self.interval = interval
        self.index = 1 if write else 0
        self.series: Dict[str, List[Tuple[float, int]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def counters(self) -> Dict[str, Optional[Tuple[int, int]]]:
        raise NotImplementedError

    def _run(self) -> None:
        with sampling_on_time():
            while not self._stop.is_set():
                for key, value in self.counters().items():
                    now = time.monotonic()
                    if value is None:
                        continue
                    steps = self.series.setdefault(key, [])
                    if not steps or steps[-1][1] != value[self.index]:
                        steps.append((now, value[self.index]))
                time.sleep(self.interval)

    def __enter__(self) -> 'RateProbe':
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def base(self, key: str) -> int:
        return 0 if self.from_zero else self.series[key][0][1]

    def total(self, key: str) -> int:
        """Bytes the counter moved (a leaf's starts at 0, a device's where first seen)."""
        return self.series[key][-1][1] - self.base(key)

    def rate(self, key: Optional[str] = None, lo: float = 0.1, hi: float = 0.9,
             total: Optional[int] = None) -> float:
        """Bytes/s of ``key`` (the only counter when None) between ``lo`` and ``hi`` of
        ``total`` bytes (default: all it moved) from where it was first seen."""
        if key is None:
            (key,) = self.series
        base = self.base(key)
        total = self.total(key) if total is None else total
        return slope([(t, b) for t, b in self.series[key]
                      if lo * total <= b - base <= hi * total])

    def rates(self, **kw) -> Dict[str, float]:
        return {key: self.rate(key, **kw) for key in self.series}

    def window(self, key: str, t0: float, t1: float) -> float:
        """Bytes/s of ``key`` from the steps seen between monotonic times t0 and t1."""
        return slope([(t, b) for t, b in self.series.get(key, []) if t0 <= t <= t1])


class LeafRateProbe(RateProbe):
    """Every copy leaf under the cgroup parent ``parent`` (its name), v1 or v2, keyed by
    the leaf's name; bytes written (``write=False``: read)."""

    def __init__(self, parent: str, **kw) -> None:
        super().__init__(**kw)
        self.parents = cgroup_dirs(parent)

    def counters(self) -> Dict[str, Optional[Tuple[int, int]]]:
        found = {}
        for parent in self.parents:
            try:
                leaves = [e.name for e in os.scandir(parent) if e.is_dir()]
            except FileNotFoundError:
                continue
            for leaf in leaves:
                found[leaf] = leaf_bytes(os.path.join(parent, leaf))
        return found


class FileSizeProbe(RateProbe):
    """The bytes allocated to files being written (st_blocks: a copy of non-zero data
    allocates it block by block, even where the file's size was set first, as qemu-img
    sets a raw image's); a file not there yet is not sampled."""

    def __init__(self, *paths: str, **kw) -> None:
        super().__init__(**kw)
        self.paths = paths

    def counters(self) -> Dict[str, Optional[Tuple[int, int]]]:
        found: Dict[str, Optional[Tuple[int, int]]] = {}
        for path in self.paths:
            try:
                size = os.stat(path).st_blocks * 512
            except FileNotFoundError:
                size = None
            found[path] = None if size is None else (size, size)
        return found


class DeviceRateProbe(RateProbe):
    """Bytes written (``write=False``: read) to block devices, from /sys/block/*/stat:
    counted when a request completes, that is once the throttle let it through."""

    from_zero = False

    def __init__(self, *devs: str, **kw) -> None:
        super().__init__(**kw)
        self.devs = devs

    def counters(self) -> Dict[str, Optional[Tuple[int, int]]]:
        found = {}
        for dev in self.devs:
            with open('/sys/block/%s/stat' % os.path.basename(os.path.realpath(dev))) as f:
                fields = f.read().split()
            found[dev] = (int(fields[2]) * 512, int(fields[6]) * 512)
        return found


# -- oracles on cgroupfs and sysfs, read here, not through the code under test -----------
def read_text(path: str) -> str:
    """A file's text, '' when it is gone (a cgroup removed meanwhile)."""
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ''


def majmin(dev: str) -> str:
    rdev = os.stat(dev).st_rdev
    return '%d:%d' % (os.major(rdev), os.minor(rdev))


def io_wbytes(cgroup: str, dev: str) -> int:
    """Bytes the cgroup (a directory) wrote to ``dev`` (MAJ:MIN) so far; 0 before its
    first I/O or once it is gone."""
    return (leaf_device_bytes(cgroup) or {}).get(dev, (0, 0))[1]
