"""What both cgroup drivers share: per-copy leaf lifecycle under one parent cgroup.

Layout: ``<mount>/<parent>/<leaf>``. The leaf carries the limits (v1 blkio is not
hierarchical, so a parent's limit would not apply to the copy) and the copy's processes;
the parent only groups leaves and stays process-free (a v2 requirement for delegating
``io`` to children).
"""
from __future__ import annotations

import abc
import dataclasses
import errno
import os
import re
import signal
import time
from typing import Dict, Iterable, List, Optional, Tuple

from cinder_cgroup_throttle.devices import BlockDevice
from cinder_cgroup_throttle.exception import CgroupOperationError, ThrottleError

_SEGMENT = re.compile(r'^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z')


def validate_cgroup_path(name: str) -> str:
    """Check an operator-supplied parent cgroup name ('a' or 'a/b'); return it normalised.

    Names end up in rootwrap-checked ``cgexec -g`` arguments and in cgroupfs paths, so only
    plain segments are allowed: no '..', no leading '/' or '.', no spaces or ':'.
    """
    segments = name.strip('/').split('/') if name else []
    if not segments or not all(_SEGMENT.match(s) for s in segments):
        raise ThrottleError(
            'invalid cgroup name %r: use segments of letters, digits, "_", "-" and "." '
            '(not starting with "." or "-"), separated by "/"' % name)
    return '/'.join(segments)


@dataclasses.dataclass(frozen=True)
class DeviceLimit:
    """Limits for one device in one cgroup; 0 means "no limit" for that key."""

    device: BlockDevice
    rbps: int = 0
    wbps: int = 0
    riops: int = 0
    wiops: int = 0

    def __post_init__(self) -> None:
        for key in ('rbps', 'wbps', 'riops', 'wiops'):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ThrottleError('%s for %s must be a non-negative integer, not %r'
                                    % (key, self.device, value))


class CgroupDriver(abc.ABC):
    """One cgroup hierarchy (v1 blkio or v2 io) and the parent our leaves live in."""

    controller: str  # the name cgexec -g takes

    def __init__(self, mountpoint: str, parent: str) -> None:
        self.mountpoint = mountpoint
        self.parent = validate_cgroup_path(parent)
        self.parent_path = os.path.join(mountpoint, self.parent)
        # Set when this driver created the parent: it then removes it once the last leaf
        # is gone (a parent found in place, e.g. Cinder's own cgroup, is left alone).
        self.owns_parent = False

    # -- per-driver pieces -------------------------------------------------------------
    @abc.abstractmethod
    def ensure_parent(self) -> bool:
        """Create the parent cgroup (idempotent) so leaves can be made under it; True when
        this call created it."""

    @abc.abstractmethod
    def write_limits(self, leaf: str, limits: Iterable[DeviceLimit],
                     previous: Iterable[DeviceLimit] = ()) -> None:
        """Make ``limits`` the leaf's limits; devices only in ``previous`` are unlimited."""

    @abc.abstractmethod
    def io_bytes(self, leaf: str) -> Dict[str, Tuple[int, int]]:
        """Bytes read and written so far per device ('MAJ:MIN' -> (read, written))."""

    # -- shared ------------------------------------------------------------------------
    def leaf_path(self, leaf: str) -> str:
        return os.path.join(self.parent_path, leaf)

    def prefix(self, leaf: str) -> List[str]:
        """argv prefix that runs a command inside the leaf (cgexec exec()s it in place)."""
        return ['cgexec', '-g', '%s:%s/%s' % (self.controller, self.parent, leaf)]

    def create_leaf(self, leaf: str, limits: Iterable[DeviceLimit] = ()) -> str:
        """Create the leaf (and the parent, if missing) and give it ``limits``; a leaf whose
        limits cannot be written is removed again. One step, so that a non-root service
        pays one call into root for it (privileged.PrivilegedDriver)."""
        path = self.leaf_path(leaf)
        for _attempt in range(5):
            try:
                if self.ensure_parent():
                    self.owns_parent = True
                os.mkdir(path)
                break
            except (FileNotFoundError, CgroupOperationError) as exc:
                # The empty parent was removed by the end of another copy: make it again.
                cause = exc if isinstance(exc, OSError) else exc.__cause__
                if not isinstance(cause, FileNotFoundError):
                    raise
            except OSError as exc:
                raise CgroupOperationError(
                    'cannot create cgroup %s: %s' % (path, exc)) from exc
        else:
            raise CgroupOperationError('cannot create cgroup %s: its parent keeps vanishing'
                                       % path)
        try:
            self.write_limits(leaf, limits)
        except BaseException:
            self.try_remove_leaf(leaf)
            raise
        return path

    def leaves(self) -> List[str]:
        try:
            return sorted(e.name for e in os.scandir(self.parent_path) if e.is_dir())
        except FileNotFoundError:
            return []

    def pids(self, leaf: str) -> List[int]:
        try:
            with open(os.path.join(self.leaf_path(leaf), 'cgroup.procs')) as f:
                return [int(p) for p in f.read().split()]
        except FileNotFoundError:
            return []

    def remove_leaf(self, leaf: str, grace: float = 10.0) -> List[int]:
        """Remove the leaf once its processes are gone; return the pids that had to be killed.

        A process still in the leaf after ``grace`` seconds is an orphan of an aborted copy
        (for example dd left behind by a killed rootwrap): it is ours by construction, and
        leaving it would either keep the cgroup forever or let it run unthrottled, so it is
        killed. The waiting happens here, between single attempts (``try_remove_leaf``), so
        that through the privsep daemon no call into root blocks.
        """
        deadline = time.monotonic() + grace
        killed: List[int] = []
        delay = 0.002
        while True:
            now = time.monotonic()
            if now >= deadline + 10 * max(grace, 1.0):
                raise CgroupOperationError('cgroup %s still busy; processes %s did not exit'
                                           % (self.leaf_path(leaf), self.pids(leaf)))
            gone, pids = self.try_remove_leaf(leaf, kill=now >= deadline)
            killed += [pid for pid in pids if pid not in killed]
            if gone:
                return killed
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def try_remove_leaf(self, leaf: str, kill: bool = False) -> Tuple[bool, List[int]]:
        """One attempt: ``rmdir`` the leaf (and then the parent, if this driver created it
        and it is empty); when the leaf is busy and ``kill`` is set, SIGKILL what is in it.

        Returns (leaf gone, pids killed). ``rmdir`` is used rather than ``cgdelete``, which
        would silently move busy tasks to the parent and drop their limit.
        """
        path = self.leaf_path(leaf)
        try:
            os.rmdir(path)
        except FileNotFoundError:
            return True, []
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise CgroupOperationError(
                    'cannot remove cgroup %s: %s' % (path, exc)) from exc
            killed: List[int] = []
            for pid in self.pids(leaf) if kill else []:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            return False, killed
        self._remove_own_parent()
        return True, []

    def _remove_own_parent(self) -> None:
        if self.owns_parent:
            try:
                os.rmdir(self.parent_path)  # fails while other copies' leaves are in it
                self.owns_parent = False
            except OSError:
                pass

    @staticmethod
    def _write(path: str, value: str) -> None:
        """One value per write(2): the kernel ignores a second line in the same write."""
        try:
            with open(path, 'w') as f:
                f.write(value)
        except OSError as exc:
            raise CgroupOperationError(
                'writing %r to %s failed: %s' % (value, path, exc)) from exc


def read_file(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None
