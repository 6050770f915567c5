"""Copy ids and the files of the state directory, read and written safely by root.

The state directory belongs to the service account (cinder-volume's user), which writes
entries there; root (the CLI, a root cinder-volume, the pv pipeline under rootwrap) reads
and replaces them. So root treats every file there as data from an untrusted writer
(ownership model and threat model: doc/operations.md):

* the directory is opened once per operation (``O_DIRECTORY|O_NOFOLLOW``) and every access
  is relative to that descriptor, so swapping the directory or a parent for a link mid-way
  redirects nothing; it must not be writable by group or others, and for root every
  ancestor must be root-owned and not writable by others (sticky excepted), so the path
  itself cannot be redirected either;
* only names this package generates are used (:data:`STATE_NAME`, :data:`BUDGET_NAME`,
  :data:`FINISHED_NAME`, :data:`TEMP_NAME`, :data:`LOCK_NAME`), each checked before use;
* files are opened ``O_NOFOLLOW|O_NONBLOCK`` (a link, a FIFO or a device never blocks or
  redirects), must be regular with one link, and at most :data:`MAX_BYTES` are read;
* writes go to a new temporary file (``O_CREAT|O_EXCL|O_NOFOLLOW``), whose mode is set
  with ``fchmod`` on the descriptor, then renamed over the name inside the directory;
* anything that fails these checks is a :class:`ForeignFile`: reported, left alone.

Stdlib only (plus the package's exceptions), so that the pipeline's wrapper starts fast.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
from typing import Any, Dict, Iterator, List

from cinder_cgroup_throttle.exception import ThrottleError

#: A copy id: also the name of its leaf cgroup; the pid is the owner's, so a cleanup can
#: tell a dead owner's leftovers. The rootwrap filters pin the same pattern. ``\Z``, not
#: ``$``: ``$`` also matches before a trailing newline.
COPY_ID = re.compile(r'^copy-([0-9]+)-[0-9a-f]{8}\Z')
#: Files of one copy: the registry entry, the pv pipeline's state and its rate requests.
STATE_NAME = re.compile(r'^(copy-[0-9]+-[0-9a-f]{8})\.(json|pipe\.json|rate)\Z')
#: A shared copy budget's state (budget.py), of the process with this pid.
BUDGET_NAME = re.compile(r'^budget-([0-9]+)\.json\Z')
#: The last finished copy of a volume (progress.py), per kind of copy; no pid in the name.
FINISHED_NAME = re.compile(r'^finished-([0-9A-Za-z][0-9A-Za-z_-]{0,63})\.(data|wipe)\.json\Z')
#: Temporary files of :meth:`StateDir.write_json` (a writer killed before its rename);
#: the writer's pid is group 2 (a copy's file) or group 3 (a budget's); a finished
#: record's temporary file has none (group 4 is set instead).
TEMP_NAME = re.compile(r'^\.(copy-([0-9]+)-[0-9a-f]{8}\.(?:json|pipe\.json|rate)'
                       r'|budget-([0-9]+)\.json'
                       r'|(finished-[0-9A-Za-z][0-9A-Za-z_-]{0,63}\.(?:data|wipe)\.json))'
                       r'\.[0-9a-f]{16}\.tmp\Z')
LOCK_NAME = '.relimit.lock'
MAX_BYTES = 64 * 1024  # an entry is < 2 KiB; paths are at most 4 KiB each


class StateDirError(ThrottleError):
    """The state directory cannot be trusted (a link, writable by others, ...)."""


class ForeignFile(ThrottleError):
    """A file in the state directory that is not one this package wrote; left alone."""

    def __init__(self, directory: str, name: str, reason: str) -> None:
        super().__init__('foreign file %r in state directory %s: %s (left alone)'
                         % (name, directory, reason))
        self.name, self.reason = name, reason


def new_copy_id() -> str:
    return 'copy-%d-%s' % (os.getpid(), os.urandom(4).hex())


def _unsafe_mode(st: os.stat_result) -> bool:
    """Writable by group or others, without the sticky bit."""
    return bool(st.st_mode & 0o022) and not st.st_mode & stat.S_ISVTX


class StateDir:
    """One state directory; every method opens it afresh and works relative to its fd."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _check_ancestors(self) -> None:
        """For root: no link and nothing another user may replace on the way there."""
        path = os.path.abspath(self.path)
        parts = path.strip('/').split('/')[:-1]
        current = '/'
        for part in [''] + parts:
            current = os.path.join(current, part)
            st = os.lstat(current)
            if stat.S_ISLNK(st.st_mode):
                raise StateDirError('state directory %s: %s is a symbolic link; give the '
                                    'real path' % (self.path, current))
            if st.st_uid != 0 or _unsafe_mode(st):
                raise StateDirError('state directory %s: its parent %s may be replaced by '
                                    'another user (owner uid %d, mode %o)'
                                    % (self.path, current, st.st_uid,
                                       stat.S_IMODE(st.st_mode)))

    @contextlib.contextmanager
    def fd(self) -> Iterator[int]:
        """The directory's descriptor, after the checks of the ownership model."""
        try:
            if os.geteuid() == 0:
                self._check_ancestors()
            dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                          | os.O_CLOEXEC)
        except FileNotFoundError:
            raise
        except OSError as exc:
            # O_DIRECTORY|O_NOFOLLOW fails with ENOTDIR (not ELOOP) on a link.
            link = exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(self.path)
            raise StateDirError('state directory %s: %s' % (
                self.path, 'is a symbolic link' if link else exc.strerror)) from None
        try:
            st = os.fstat(dfd)
            if _unsafe_mode(st):
                raise StateDirError('state directory %s is writable by group or others '
                                    '(mode %o): chmod 755 it'
                                    % (self.path, stat.S_IMODE(st.st_mode)))
            yield dfd
        finally:
            os.close(dfd)

    def makedirs(self) -> None:
        """Create the directory (mode 0755) if it is missing."""
        if not os.path.isdir(self.path):
            os.makedirs(self.path, mode=0o755, exist_ok=True)

    def names(self) -> List[str]:
        """The directory's entries, sorted; [] when it does not exist."""
        try:
            with self.fd() as dfd:
                return sorted(os.listdir(dfd))
        except FileNotFoundError:
            return []

    def _checked_name(self, name: str) -> str:
        if not (STATE_NAME.match(name) or name == LOCK_NAME or BUDGET_NAME.match(name)
                or FINISHED_NAME.match(name)):
            raise ForeignFile(self.path, name, 'not a state file name')
        return name

    def read_json(self, name: str) -> Dict[str, Any]:
        """The JSON object in ``name``; FileNotFoundError when absent, ForeignFile when it
        is anything but a small regular file holding a JSON object."""
        self._checked_name(name)
        with self.fd() as dfd:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                             | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=dfd)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    raise
                raise ForeignFile(self.path, name, 'a symbolic link' if exc.errno in (
                    errno.ELOOP, errno.EMLINK) else 'cannot open: %s' % exc.strerror
                ) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ForeignFile(self.path, name, 'not a regular file')
            # 0 links: a writer renamed a newer version over it after we opened it; what
            # we hold is the previous complete version, with no other name anywhere.
            if st.st_nlink > 1:
                raise ForeignFile(self.path, name, 'has %d hard links' % st.st_nlink)
            chunks, size = [], 0
            while size <= MAX_BYTES:
                chunk = os.read(fd, MAX_BYTES + 1 - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
        if size > MAX_BYTES:
            raise ForeignFile(self.path, name, 'larger than %d bytes' % MAX_BYTES)
        try:
            data = json.loads(b''.join(chunks).decode())
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ForeignFile(self.path, name, 'not JSON') from None
        if not isinstance(data, dict):
            raise ForeignFile(self.path, name, 'not a JSON object')
        return data

    def write_json(self, name: str, data: Dict[str, Any]) -> None:
        """Atomic replace, world-readable: readers (a non-root status, cinder-volume
        reading what root re-saved) see the old or the new file, never a partial one."""
        self._checked_name(name)
        payload = json.dumps(data).encode()
        tmp = '.%s.%s.tmp' % (name, os.urandom(8).hex())
        with self.fd() as dfd:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=dfd)
            try:
                try:
                    os.fchmod(fd, 0o644)  # the descriptor: a swapped name changes nothing
                    while payload:
                        payload = payload[os.write(fd, payload):]
                finally:
                    os.close(fd)
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=dfd)
                raise

    def remove(self, name: str) -> bool:
        """Unlink ``name`` (a state or temporary file name; unlink never follows a link);
        False when it was already gone."""
        if not TEMP_NAME.match(name):
            self._checked_name(name)
        try:
            with self.fd() as dfd:
                os.unlink(name, dir_fd=dfd)
        except FileNotFoundError:
            return False
        return True

    def lstat(self, name: str) -> os.stat_result:
        with self.fd() as dfd:
            return os.stat(name, dir_fd=dfd, follow_symlinks=False)

    def open_lock(self) -> int:
        """A read-only descriptor of the lock file (flock needs no write access, so a
        lock file root created stays usable by a non-root cinder-volume)."""
        self.makedirs()
        with self.fd() as dfd:
            try:
                fd = os.open(LOCK_NAME, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW
                             | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, 0o644,
                             dir_fd=dfd)
            except OSError as exc:
                raise ForeignFile(self.path, LOCK_NAME, exc.strerror) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ForeignFile(self.path, LOCK_NAME, 'not a regular file')
        return fd
