"""Scratch kernel objects for tests: loop devices, partitions, filesystems, mounts.

Everything is registered for cleanup the moment it exists, and torn down in reverse order
even when the test failed; only objects created here are ever touched.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from typing import Callable, List, Optional, Tuple

from cinder_cgroup_throttle.demo import fill_random, sha256_prefix  # noqa: F401 (for tests)

MiB = 1 << 20


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
    when argv runs dd, else wall time. Starting cgexec and dd is no part of the copy, and in
    the VM lane (TCG emulation) it costs 0.3-0.9 s of wall time."""
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True)
    elapsed = time.monotonic() - t0
    if proc.returncode:
        raise AssertionError('%s failed (%d): %s' % (argv, proc.returncode, proc.stderr))
    found = _DD_SECONDS.findall(proc.stderr)
    return float(found[-1]) if found else elapsed


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
    """Bytes the v2 cgroup (a directory) wrote to ``dev`` (MAJ:MIN) so far, from io.stat."""
    match = re.search(r'^%s .*\bwbytes=(\d+)' % dev,
                      read_text(os.path.join(cgroup, 'io.stat')), re.M)
    return int(match.group(1)) if match else 0  # no line before the first I/O
