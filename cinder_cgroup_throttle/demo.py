"""``cinder-cgroup-throttle demo``: a throttled copy between two scratch loop devices.

Everything it creates (backing files in /dev/shm, loop devices) is registered for removal
the moment it exists and removed on success, failure, Ctrl-C or SIGTERM; nothing it did not
create is touched (``losetup -f`` races with other processes are retried).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from typing import Callable, Optional

from cinder_cgroup_throttle import transfer
from cinder_cgroup_throttle.exception import ThrottleError
from cinder_cgroup_throttle.manager import CopyManager
from cinder_cgroup_throttle.progress import Progress

MiB = 1 << 20
DEFAULT_LIMIT = 8 * MiB
DEFAULT_SIZE = 64 * MiB


def _loop(stack: contextlib.ExitStack, directory: str, size: int) -> str:
    fd, backing = tempfile.mkstemp(prefix='loop-', suffix='.img', dir=directory)
    os.ftruncate(fd, size)
    os.close(fd)
    for attempt in range(10):  # another process may take the same free device
        proc = subprocess.run(['losetup', '-f', '--show', backing],
                              capture_output=True, text=True)
        if proc.returncode == 0:
            break
        time.sleep(0.1 * (attempt + 1))
    else:
        raise ThrottleError('losetup -f --show %s failed: %s' % (backing, proc.stderr.strip()))
    dev = proc.stdout.strip()
    stack.callback(subprocess.run, ['losetup', '-d', dev], capture_output=True)
    return dev


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


def run(manager: CopyManager, limit: int = DEFAULT_LIMIT, size: int = DEFAULT_SIZE,
        on_progress: Optional[Callable[[Progress], None]] = None,
        say: Callable[[str], None] = print) -> transfer.TransferResult:
    """Create, copy, verify, clean up; raise ThrottleError when any step fails."""
    if os.geteuid() != 0:
        raise ThrottleError('demo needs root (it creates loop devices and cgroups)')
    if not shutil.which('losetup'):
        raise ThrottleError('demo needs losetup (apt-get install mount)')
    if size % MiB:
        raise ThrottleError('demo size must be a whole number of MiB, not %d bytes' % size)
    with contextlib.ExitStack() as stack:
        directory = tempfile.mkdtemp(prefix='cct-demo-', dir='/dev/shm')
        stack.callback(shutil.rmtree, directory, ignore_errors=True)
        src, dst = _loop(stack, directory, size), _loop(stack, directory, size)
        say('demo: source %s and destination %s (%d MiB loop devices in %s)'
            % (src, dst, size // MiB, directory))
        digest = fill_random(src, size)
        result = transfer.run(manager, src, dst, limit, bs='1M', size=size,
                              on_progress=on_progress)
        if sha256_prefix(dst, size) != digest:
            raise ThrottleError('demo: %s does not hold the bytes of %s' % (dst, src))
        say('demo: verified: %s holds the same %d bytes as %s (sha256 %s...)'
            % (dst, size, src, digest[:16]))
        return result
