"""A standalone throttled copy, the way Cinder runs one: CopyManager's prefix + dd.

Used by the CLI's ``copy`` and ``demo``. dd gets the argv Cinder's ``copy_volume`` builds
(``count=<bytes> iflag=count_bytes[,direct] [oflag=direct | conv=fdatasync]``), so the
pv fallback's wrapper sees exactly what it sees under Cinder. O_DIRECT is used on each side
that accepts it: v1 blkio does not charge buffered writeback, so a buffered destination
gets ``conv=fdatasync`` instead. Success means dd exited 0 *and* reported every byte.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import stat
import subprocess
from typing import Callable, List, Optional

from cinder_cgroup_throttle import ddstats, pipeline
from cinder_cgroup_throttle.exception import DeviceResolutionError, ThrottleError
from cinder_cgroup_throttle.manager import CopyManager
from cinder_cgroup_throttle.progress import Progress, ProgressMonitor, dd_total, path_size

# O_DIRECT needs block-aligned sizes; 4096 covers 512e and 4Kn devices.
_ALIGN = 4096
_RATE_WINDOW = 3.0  # seconds of samples behind the progress bar's rate


@dataclasses.dataclass
class TransferResult:
    copy_id: str
    bytes: int
    seconds: float
    bps_limit: int
    backend: str
    reason: str
    final_bps_limit: int  # differs from bps_limit after a set-limit during the copy

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


def _direct_ok(path: str, write: bool) -> bool:
    """Does the filesystem or device under ``path`` accept O_DIRECT (tmpfs does not)?"""
    mode = os.O_WRONLY if write else os.O_RDONLY
    try:
        if os.path.exists(path):
            fd = os.open(path, mode | os.O_DIRECT)
        else:  # probe the directory without creating a visible file
            fd = os.open(os.path.dirname(os.path.abspath(path)),
                         os.O_TMPFILE | os.O_WRONLY | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    return True


def dd_argv(src: str, dst: str, size: int, bs: str) -> List[str]:
    """The dd command for copying ``size`` bytes, O_DIRECT on each side that allows it."""
    aligned = dd_total(['dd', 'count=1', 'bs=' + bs]) or 0
    aligned_bs = aligned > 0 and aligned % _ALIGN == 0
    iflag = 'count_bytes'
    if aligned_bs and size % _ALIGN == 0 and _direct_ok(src, write=False):
        iflag += ',direct'
    argv = ['dd', 'if=' + src, 'of=' + dst, 'count=%d' % size, 'bs=' + bs, 'iflag=' + iflag]
    # dd drops O_DIRECT by itself for a short final block.
    argv.append('oflag=direct' if aligned_bs and _direct_ok(dst, write=True)
                else 'conv=fdatasync')
    return argv


def copy_size(src: str, dst: str, size: Optional[int]) -> int:
    """Bytes to copy: ``size`` or all of SRC; refuses what cannot fit or be measured."""
    if not os.path.exists(src):
        raise DeviceResolutionError('%s does not exist' % src)
    if os.path.exists(dst) and os.path.exists(src) and os.path.samefile(src, dst):
        raise ThrottleError('%s and %s are the same file' % (src, dst))
    if size is None:
        size = path_size(src)
        if size is None:
            raise ThrottleError('cannot tell the size of %s (not a block device or regular '
                                'file): give the number of bytes with --size' % src)
    if os.path.exists(dst) and stat.S_ISBLK(os.stat(dst).st_mode):
        room = path_size(dst) or 0
        if room < size:
            raise ThrottleError('%s holds %d bytes, %s needs %d' % (dst, room, src, size))
    return size


def run(manager: CopyManager, src: str, dst: str, bps_limit: int, bs: str = '1M',
        size: Optional[int] = None, volume_id: Optional[str] = None,
        on_progress: Optional[Callable[[Progress], None]] = None,
        interval: float = 0.5) -> TransferResult:
    """Copy ``src`` to ``dst`` at ``bps_limit`` through ``manager``; raise on any failure."""
    size = copy_size(src, dst, size)
    with manager.copy(src, dst, bps_limit, volume_id=volume_id, total_bytes=size) as copy:
        argv = list(copy.prefix) + dd_argv(src, dst, size, bs)
        monitor = ProgressMonitor(manager.registry, window=_RATE_WINDOW)
        # dd must not outlive a killed CLI and keep copying.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=pipeline.die_with_parent)
        try:
            while True:
                try:
                    _, err = proc.communicate(timeout=interval)
                    break
                except subprocess.TimeoutExpired:
                    entry = manager.registry.load(copy.id)
                    if on_progress is not None and entry is not None:
                        on_progress(monitor.sample(entry))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        copied = _check_dd(argv, proc.returncode, err, size)
        final = manager.registry.load(copy.id)
        # dd's own clock: the throttle's doing, not cgexec's or the wrapper's start-up.
        return TransferResult(copy.id, size, copied.seconds, bps_limit, copy.backend,
                              copy.reason, final.bps_limit if final else bps_limit)


def _check_dd(argv: List[str], returncode: int, err: str, size: int) -> ddstats.DDReport:
    # All of it: the cause is often not on the last line (dd: fdatasync failed, then its
    # byte counts).
    text = err.strip()
    if returncode:
        raise ThrottleError('copy failed: %s exited with %s: %s'
                            % (argv[0], _status(returncode), text or 'no message'))
    copied = ddstats.report(err)
    if copied is None:
        raise ThrottleError('copy finished but dd did not report the bytes it copied: %s'
                            % (text or 'no output'))
    if copied.bytes != size:
        raise ThrottleError('copy incomplete: dd copied %d of %d bytes'
                            % (copied.bytes, size))
    return copied


def _status(returncode: int) -> str:
    if returncode < 0:
        return 'signal %s' % signal.Signals(-returncode).name
    return 'status %d' % returncode
