"""The pv fallback: a copy paced by pv where cgroups cannot throttle (the library behind
``cinder-cgroup-throttle-pipe``, whose entry point is :mod:`cinder_cgroup_throttle.cmd.pipe`).

Cinder appends its own argv to the throttle prefix, so the wrapper is exec-style::

    cinder-cgroup-throttle-pipe --id ID --rate BPS --state-dir DIR -- \\
        [ionice -cN [-nN]] dd if=S of=D count=N bs=B iflag=count_bytes[,direct] \\
        [oflag=direct] [conv=fdatasync|sparse|fdatasync,sparse]
    cinder-cgroup-throttle-pipe ... -- qemu-img convert ...

A dd becomes pv pacing tokens and our copier doing the dd (:mod:`copier`, a thread of this
process): ``pv -q -L BPS/512 -s T -S < /dev/zero`` writes one byte per 512 bytes the copy
may move into a pipe, and the copier copies a block (dd's ``bs=``) from the source to the
destination whenever the tokens allow one, with Cinder's ``iflag=direct``, ``oflag=direct``
and ``conv=``. No byte of the copy passes through a pipe, so the fallback costs about what
the dd it replaces costs (a data pipe costs a copy of every byte: doc/benchmark.md).
``qemu-img convert`` gets its own limiter, ``-r BPS``. Anything else is refused. A
command's ``ionice`` is applied to this process, so to pv and the copier.

Pacing is exact from the wrapper's own start, not from pv's: the bytes due for the time
before pv runs (the wrapper's start-up) are the copier's without tokens (the head start);
pv then gets the rest, sized to its 0.1 s credit grid, and is started so that its last
credit falls on the copy's deadline. pv 1.6 takes a credit only when its loop wakes (every
90 ms when idle), so the wrapper wakes it with SIGWINCH right after each grid point.

Nothing is hidden as a shell pipeline would: pv is a child of this process, waited for
through a pidfd; the copy fails with the copier's error first (pv then only sees a broken
pipe), then pv's (the copier then sees its tokens end), and succeeds only if the copier
wrote min(count, source size) bytes.

Runs as root under rootwrap while its caller (cinder-volume) may not be root, so it:

* dies with its parent (PR_SET_PDEATHSIG) and takes its stages with it. Its parent is the
  process that ran it: a root cinder-volume's copy stops when cinder-volume dies; under
  sudo + rootwrap the parent is cinder-rootwrap, which itself waits for the copy;
* publishes progress in ``DIR/<ID>.pipe.json`` and takes rate changes from ``DIR/<ID>.rate``
  (see :func:`request_rate`), writing as the sudo caller so that it can never create or
  replace files where its caller could not.

Stdlib only, and no subprocess or dataclasses on the copy's path: the wrapper's start-up
is part of every copy's CPU and time.
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import select
import signal
import stat
import sys
import threading
import time
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from cinder_cgroup_throttle.statefiles import COPY_ID, ForeignFile, StateDir
from cinder_cgroup_throttle.copier import UNIT, Copier, tokens

USAGE = ('usage: cinder-cgroup-throttle-pipe --id ID --rate BYTES_PER_SECOND '
         '--state-dir DIR -- [ionice -cN [-nN]] dd OPERAND... | qemu-img convert ARG...')
POLL = 0.5  # seconds between progress updates / rate-request checks
#: pv 1.6 adds rate/10 to its budget every 0.1 s of its clock (RATE_GRANULARITY), the
#: first at its start; it takes a credit only when its loop wakes (every 90 ms when idle).
GRID = 0.1
#: SIGWINCH to pv this many seconds after its last grid point, until it ended: its clock
#: starts 1-6 ms after its exec returned here (more on a busy host), and each signal
#: wakes its loop; without them its last credit waits for its next 90 ms wake-up.
FINAL_KICKS = tuple(0.001 + 0.002 * n for n in range(50))
#: From our start of pv to its last credit beyond the grid, and from that credit to the
#: wrapper's exit (the copier's last block, our exit): measured, see doc/benchmark.md.
PV_LAG = 0.002
TAIL = 0.003
#: Head start beyond the time already spent: sending it and starting pv take this long.
HEAD_MARGIN = 0.003
_PR_SET_PDEATHSIG = 1

_DD_FLAGS = {'iflag': {'count_bytes', 'direct'}, 'oflag': {'direct'},
             'conv': {'fdatasync', 'sparse'}}
_DD_KEYS = ('if', 'of', 'count', 'bs', 'iflag', 'oflag', 'conv')


class Refused(Exception):
    """The argv is not one this wrapper runs."""


# -- argv parsing -----------------------------------------------------------------------
def parse_args(argv: Sequence[str]) -> Tuple[str, int, str, List[str]]:
    """(copy_id, rate, state_dir, command) from our argv; Refused says what is wrong."""
    argv = list(argv)
    if len(argv) < 8 or argv[0::2][:3] != ['--id', '--rate', '--state-dir'] \
            or argv[6] != '--':
        raise Refused(USAGE)
    copy_id, rate, state_dir, command = argv[1], argv[3], argv[5], argv[7:]
    if not COPY_ID.match(copy_id):
        raise Refused('invalid --id %r: expected copy-<pid>-<8 hex digits>' % copy_id)
    if not re.match(r'^[1-9][0-9]{0,19}\Z', rate) or int(rate) >= 2**64:
        raise Refused('invalid --rate %.40r: expected bytes/s from 1 to 2**64-1' % rate)
    if not os.path.isabs(state_dir) or '..' in state_dir.split('/'):
        raise Refused('invalid --state-dir %r: expected an absolute path without ".."'
                      % state_dir)
    return copy_id, int(rate), state_dir, command


def split_ionice(command: List[str]) -> Tuple[List[str], List[str]]:
    """(ionice argv or [], rest); only the class/level forms Cinder passes are accepted."""
    if not command or command[0] != 'ionice':
        return [], command
    n = 1
    if len(command) > n and re.match(r'^-c[0-3]\Z', command[n]):
        n += 1
        if len(command) > n and re.match(r'^-n[0-7]\Z', command[n]):
            n += 1
    else:
        raise Refused('ionice must be followed by -c0..-c3 (optionally -n0..-n7), got %r'
                      % command[1:3])
    return command[:n], command[n:]


def parse_dd(argv: List[str]) -> Dict[str, str]:
    """dd operands as a dict; only the operands and flags Cinder's copy_volume uses."""
    ops: Dict[str, str] = {}
    for arg in argv[1:]:
        key, sep, value = arg.partition('=')
        if not sep or key not in _DD_KEYS:
            raise Refused('dd operand %r is not one of %s=' % (arg, '=, '.join(_DD_KEYS)))
        if key in ops:
            raise Refused('dd operand %s= given twice' % key)
        if key in _DD_FLAGS and not set(value.split(',')) <= _DD_FLAGS[key]:
            raise Refused('dd %s=%s: only %s supported' % (
                key, value, ','.join(sorted(_DD_FLAGS[key]))))
        if not value:
            raise Refused('dd operand %s= is empty' % key)
        ops[key] = value
    for key in ('if', 'of', 'bs'):
        if key not in ops:
            raise Refused('dd needs %s=' % key)
    if 'count' in ops:
        if not re.match(r'^[0-9]{1,20}\Z', ops['count']):
            raise Refused('dd count=%s must be a number' % ops['count'])
        if 'count_bytes' not in ops.get('iflag', '').split(','):
            # pv counts bytes; Cinder's copy_volume always passes count_bytes.
            raise Refused('dd count= without iflag=count_bytes is not supported')
    return ops


class Plan(NamedTuple):
    """What runs for one command: pv pacing our copier (a dd's operands), or ``argv``
    alone (qemu-img, which limits itself)."""
    tool: str  # 'dd' or 'qemu-img'
    argv: List[str]  # qemu-img convert -r RATE ...; the dd as Cinder gave it
    ionice: List[str]
    source: Optional[str] = None
    byte_count: Optional[int] = None  # dd's count= (always with iflag=count_bytes)
    dest: Optional[str] = None
    block: int = 0  # dd's bs=: the unit conv=sparse skips
    direct_in: bool = False  # iflag=direct
    direct: bool = False  # oflag=direct
    sparse: bool = False
    fdatasync: bool = False


#: dd's size suffixes (GNU coreutils: c, w, b, kB/KB=1000, K/KiB=1024, ...).
_DD_UNITS = dict({'': 1, 'c': 1, 'w': 2, 'b': 512, 'kB': 1000, 'KB': 1000, 'k': 1024},
                 **{p + s: (1000 if s == 'B' else 1024) ** (n + 1)
                    for n, p in enumerate('KMGTPE') for s in ('', 'iB', 'B')})


def dd_size(text: str) -> int:
    """A dd size operand (``1M``, ``4096``, ``64KiB``) in bytes; Refused otherwise."""
    found = re.match(r'^([0-9]{1,12})([A-Za-z]{0,3})\Z', text)
    if not found or found.group(2) not in _DD_UNITS or not int(found.group(1)):
        raise Refused('dd bs=%s is not a size dd accepts (e.g. 1M, 4096)' % text)
    return int(found.group(1)) * _DD_UNITS[found.group(2)]


def plan(command: List[str], rate: int) -> Plan:
    """How ``command`` runs at ``rate``; Refused for anything else."""
    ionice, rest = split_ionice(command)
    if rest[:1] == ['dd']:
        ops = parse_dd(rest)
        conv = ops.get('conv', '').split(',')
        return Plan('dd', rest, ionice, ops['if'],
                    int(ops['count']) if 'count' in ops else None, ops['of'],
                    dd_size(ops['bs']), 'direct' in ops.get('iflag', '').split(','),
                    ops.get('oflag') == 'direct', 'sparse' in conv,
                    'fdatasync' in conv)
    if rest[:2] == ['qemu-img', 'convert'] and not ionice:
        if any(a.startswith('-r') for a in rest[2:]):
            raise Refused('qemu-img convert already has a rate limit (-r)')
        return Plan('qemu-img', ['qemu-img', 'convert', '-r', str(rate)] + rest[2:], [])
    raise Refused('refusing to run %r: only [ionice -cN [-nN]] dd ... and qemu-img '
                  'convert ... can be throttled by this wrapper'
                  % ' '.join(command[:4]))


# -- state files ------------------------------------------------------------------------
def _pipe_name(copy_id: str) -> str:
    return copy_id + '.pipe.json'


def _rate_name(copy_id: str) -> str:
    return copy_id + '.rate'


def _is_int(v: object) -> bool:
    return type(v) is int and 0 <= v < 2**64


def _is_number(v: object) -> bool:
    return type(v) in (int, float) and 0 <= v < 2**63  # type: ignore[operator]


#: Type checks of pipe.json (written by :meth:`Pipeline.state`); other fields are refused.
PIPE_STATE_CHECKS = {
    'id': lambda v: isinstance(v, str) and bool(COPY_ID.match(v)),
    'tool': lambda v: v in ('dd', 'qemu-img'),
    'wrapper_pid': lambda v: _is_int(v) and 0 < v,
    'pids': lambda v: type(v) is dict and all(isinstance(k, str) and _is_int(p)
                                              for k, p in v.items()),
    'pv_pid': lambda v: v is None or _is_int(v),
    'rate': lambda v: _is_int(v) and 0 < v,
    'relimit': lambda v: type(v) is bool,
    'rate_error': lambda v: v is None or isinstance(v, str),
    'bytes': lambda v: v is None or _is_int(v),
    'total_bytes': lambda v: v is None or _is_int(v),
    'started': _is_number,
    'updated': _is_number,
}


@contextlib.contextmanager
def as_caller() -> Iterator[None]:
    """Run file operations as the user who ran us through sudo (rootwrap), if any.

    The state dir comes from our argv; writing there with the caller's rights means root
    can never be talked into creating or replacing a file the caller could not.
    """
    uid, gid = os.environ.get('SUDO_UID', ''), os.environ.get('SUDO_GID', '')
    if os.geteuid() != 0 or not uid.isdigit() or int(uid) == 0:
        yield
        return
    import pwd
    groups = os.getgroups()
    os.setgroups([])  # root's supplementary groups must not open doors either
    os.setegid(int(gid) if gid.isdigit() else pwd.getpwuid(int(uid)).pw_gid)
    os.seteuid(int(uid))
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)


def read_pipe_state(state_dir: str, copy_id: str) -> Optional[dict]:
    """The pipeline's published state (:data:`PIPE_STATE_CHECKS`), None when there is
    none; ForeignFile when the file is not one a pipeline wrote."""
    name = _pipe_name(copy_id)
    try:
        state = StateDir(state_dir).read_json(name)
    except FileNotFoundError:
        return None
    if set(state) != set(PIPE_STATE_CHECKS) or state['id'] != copy_id:
        raise ForeignFile(state_dir, name, 'not a pipeline state')
    for key, check in PIPE_STATE_CHECKS.items():
        if not check(state[key]):
            raise ForeignFile(state_dir, name, 'field %r: invalid value %.60r'
                              % (key, state[key]))
    return state


def request_rate(state_dir: str, copy_id: str, bps: int,
                 timeout: float = 5.0) -> Optional[dict]:
    """Ask a copy's pipeline to change its rate; return its state once it applied it.

    Works whether or not the caller is root: the pipeline (root under rootwrap) applies
    the request itself with ``pv -R``. None when there is no running pipeline to show it:
    one not started yet applies the request as it starts, one that ended meanwhile has no
    rate left to change. Raises RuntimeError when a running one did not apply it.
    """
    if bps <= 0:
        raise ValueError('rate must be a positive number of bytes/s, not %r' % bps)
    files = StateDir(state_dir)
    state = read_pipe_state(state_dir, copy_id)
    if state is None:
        files.write_json(_rate_name(copy_id), {'rate': bps})
        return None
    if not state['relimit']:
        raise RuntimeError('copy %s (%s) cannot change its rate while running'
                           % (copy_id, state['tool']))
    files.write_json(_rate_name(copy_id), {'rate': bps})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = read_pipe_state(state_dir, copy_id)
        if state is None:  # it ended meanwhile: no rate left to apply
            return None
        if state.get('rate') == bps:
            return state
        if state.get('rate_error'):
            raise RuntimeError('copy %s: %s' % (copy_id, state['rate_error']))
        time.sleep(POLL / 2)
    raise RuntimeError('copy %s did not apply rate %d within %.0f s'
                       % (copy_id, bps, timeout))


def remove_state(state_dir: str, copy_id: str) -> None:
    """Remove a copy's pipe state and rate request (the pipeline does it when it ends;
    its owner too, in case the pipeline was killed)."""
    files = StateDir(state_dir)
    for name in (_pipe_name(copy_id), _rate_name(copy_id)):
        files.remove(name)


def _proc_io(pid: int, key: str) -> Optional[int]:
    try:
        with open('/proc/%d/io' % pid) as f:
            for line in f:
                name, _, value = line.partition(':')
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return None


# -- processes --------------------------------------------------------------------------
_LIBC = None


def _libc():  # type: ignore[no-untyped-def]
    """libc through ctypes, loaded once (before any fork: a child must only call it)."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """prctl(PR_SET_PDEATHSIG): the kernel sends ``sig`` when our parent exits."""
    if _libc().prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        import ctypes
        raise OSError(ctypes.get_errno(), 'prctl(PR_SET_PDEATHSIG) failed')


def process_started() -> float:
    """When this process was created, on the monotonic clock (to half a clock tick):
    its caller's clock started then, so ours does too."""
    with open('/proc/self/stat', 'rb') as f:
        fields = f.read().rsplit(b')', 1)[1].split()
    tick = 1.0 / os.sysconf('SC_CLK_TCK')
    started = int(fields[19]) * tick + tick / 2  # field 22: starttime, truncated to ticks
    return time.monotonic() - (time.clock_gettime(time.CLOCK_BOOTTIME) - started)


class Stage:
    """One child process of a copy: its pid, pidfd, exit status and stderr (a memfd)."""

    def __init__(self, name: str, argv: List[str]) -> None:
        self.name, self.argv = name, argv
        self.pid: Optional[int] = None
        self.pidfd: Optional[int] = None
        self.returncode: Optional[int] = None
        self.stderr = os.memfd_create(name.replace(' ', '-'), os.MFD_CLOEXEC)

    def spawn(self, stdin: int, stdout: int) -> None:
        """fork + exec with PR_SET_PDEATHSIG; OSError if the program cannot be run."""
        _libc()
        parent = os.getpid()
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # the child: no Python beyond this block
            try:
                os.close(err_r)
                die_with_parent(signal.SIGKILL)
                if os.getppid() != parent:
                    os._exit(1)
                for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # ignored by Python
                    signal.signal(sig, signal.SIG_DFL)
                os.dup2(stdin, 0)
                os.dup2(stdout, 1)
                os.dup2(self.stderr, 2)
                os.execvpe(self.argv[0], self.argv, dict(os.environ, LC_ALL='C'))
            except OSError as exc:
                os.write(err_w, str(exc.errno).encode())
            finally:
                os._exit(127)
        os.close(err_w)
        with open(err_r, 'rb') as f:
            failed = f.read()  # empty: exec succeeded and closed the pipe
        self.pid = pid
        if failed:
            os.waitpid(pid, 0)
            self.returncode = 127
            code = int(failed)
            raise OSError(code, '%s: %s' % (os.strerror(code), self.argv[0]))
        self.pidfd = os.pidfd_open(pid)

    @property
    def running(self) -> bool:
        return self.pid is not None and self.returncode is None

    def reap(self) -> None:
        """Collect the exit status once the pidfd said the process ended."""
        pid, status = os.waitpid(self.pid, os.WNOHANG)  # type: ignore[arg-type]
        if pid:
            self.returncode = os.waitstatus_to_exitcode(status)
            os.close(self.pidfd)  # type: ignore[arg-type]

    def kill(self) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)  # type: ignore[arg-type]
            _, status = os.waitpid(self.pid, 0)  # type: ignore[arg-type]
            self.returncode = os.waitstatus_to_exitcode(status)
            os.close(self.pidfd)  # type: ignore[arg-type]

    def error_text(self) -> str:
        size = os.fstat(self.stderr).st_size
        return os.pread(self.stderr, size, 0).decode(errors='replace').strip()

    def describe_failure(self) -> str:
        code = self.returncode or 0
        how = ('killed by %s' % signal.Signals(-code).name if code < 0
               else 'exited with status %d' % code)
        text = self.error_text()
        return '%s (%s) %s%s' % (self.name, ' '.join(self.argv), how,
                                 ': ' + text if text else '')


def _source_size(fd: int) -> Optional[int]:
    """Bytes in a regular file or block device; None for what has no size (a FIFO...)."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        return os.fstat(fd).st_size
    if stat.S_ISBLK(mode):
        size = os.lseek(fd, 0, os.SEEK_END)
        os.lseek(fd, 0, os.SEEK_SET)
        return size
    return None


def pv_share(total: int, rate: int, seconds: float) -> Tuple[int, int]:
    """(bytes for pv, its credits) for a pv that has ``seconds`` until the deadline: as
    many bytes as its credits in that time allow (the first credit comes at its start),
    less one so that its last credit ends its copy at once, not at its next wake-up."""
    per_credit = rate * GRID
    credits = max(0, math.floor(seconds / GRID)) + 1
    share = math.floor(credits * per_credit) - 1
    if share <= 0:  # a credit under two bytes: no grid to speak of
        return total, 0
    if share >= total:  # all of it through pv, on the credits it needs
        return total, math.floor(total / per_credit) + 1
    return share, credits


class Pipeline:
    """The running stages of one copy, their published state and rate changes."""

    def __init__(self, copy_id: str, rate: int, state_dir: str, plan: Plan) -> None:
        self.copy_id, self.rate, self.state_dir, self.plan = copy_id, rate, state_dir, plan
        self.files = StateDir(state_dir)
        self.started = time.time()
        self.rate_error: Optional[str] = None
        self.bytes: Optional[int] = None  # last known progress (a finished stage has none)
        self.expected: Optional[int] = None  # bytes the copier must write
        self.source_size: Optional[int] = None
        self._request_mtime: Optional[float] = None
        self._source: Optional[int] = None
        self._last_credit: Optional[float] = None  # when pv's last credit is due
        self.pv: Optional[Stage] = None
        self.stages: List[Stage] = []  # child processes: pv, or qemu-img
        self.copier: Optional[Copier] = None  # a dd's copy, and its thread
        self._copying: Optional[threading.Thread] = None

    # -- starting ---------------------------------------------------------------------
    def start(self, t0: float) -> None:
        """Start the stages of a copy whose caller's clock started at ``t0``."""
        self.apply_rate_request(running=False)
        if self.plan.tool == 'qemu-img':
            self.stages = [Stage('qemu-img', self.plan.argv)]
            self.stages[0].spawn(0, 1)
            return
        if self.plan.ionice:  # ours, so the copier's (a thread) and pv's: they inherit it
            self._run_to_end(Stage('ionice', self.plan.ionice + ['-p', str(os.getpid())]))
        try:
            flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY
            self._source = src = os.open(self.plan.source,  # type: ignore[arg-type]
                                         flags | (os.O_DIRECT if self.plan.direct_in else 0))
        except OSError as exc:
            raise OSError(exc.errno, 'cannot open %s for reading: %s'
                          % (self.plan.source, os.strerror(exc.errno))) from None
        self.source_size = _source_size(src)
        sizes = [s for s in (self.plan.byte_count, self.source_size) if s is not None]
        self.expected = min(sizes) if sizes else None
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            self.copier = Copier(read_end, src, self.plan.dest,  # type: ignore[arg-type]
                                 self.expected, self.plan.block, self.plan.direct,
                                 self.plan.sparse, self.plan.fdatasync, self.rate,
                                 self.plan.source)
            read_end = -1  # the copier's: it closes it when it ends
            self.copier.open()
            pv_tokens, credits = self._head_start(t0)
            self._copying = threading.Thread(target=self.copier.run, name='copier',
                                             daemon=True)
            self._copying.start()
            if pv_tokens:
                self.pv = Stage('pv', ['pv', '-q', '-L', str(self._pv_rate(self.rate))] + (
                    ['-s', str(pv_tokens), '-S'] if pv_tokens > 0 else []))
                self.stages.append(self.pv)
                if credits:  # start pv so that its last credit falls on the deadline
                    last_credit = self._deadline(t0) - PV_LAG
                    self._copying.join(last_credit - (credits - 1) * GRID - time.monotonic())
                if self._copying.is_alive():  # else it failed (a full disk): nothing to do
                    with open('/dev/zero', 'rb') as zero:
                        self.pv.spawn(zero.fileno(), write_end)
                    if credits:
                        self._last_credit = time.monotonic() + (credits - 1) * GRID
        finally:
            for fd in (read_end, write_end):
                if fd >= 0:
                    os.close(fd)

    @staticmethod
    def _pv_rate(rate: int) -> int:
        """pv's rate in tokens/s for ``rate`` bytes/s."""
        return max(1, round(rate / UNIT))

    @staticmethod
    def _run_to_end(stage: Stage) -> None:
        stage.spawn(0, 1)
        _, status = os.waitpid(stage.pid, 0)  # type: ignore[arg-type]
        os.close(stage.pidfd)  # type: ignore[arg-type]
        stage.returncode = os.waitstatus_to_exitcode(status)
        if stage.returncode:
            raise OSError(errno.EINVAL, stage.describe_failure())

    def _head_start(self, t0: float) -> Tuple[int, int]:
        """Grant the copier the bytes due since ``t0``; return (tokens left for pv, -1
        for "up to the end of the source"; its credits, 0 when unplanned)."""
        if self.expected is None:  # no size known: pv paces from its own start
            return -1, 0
        left = self._deadline(t0) - PV_LAG - HEAD_MARGIN - time.monotonic()
        total = tokens(self.expected)
        pv_tokens, credits = pv_share(total, self._pv_rate(self.rate), left)
        self.copier.granted = (total - pv_tokens) * UNIT  # type: ignore[union-attr]
        return pv_tokens, credits

    def _deadline(self, t0: float) -> float:
        """When pv must have sent its last byte for the copy to take size/rate from t0."""
        return t0 + self.expected / self.rate - TAIL  # type: ignore[operator]

    # -- running ----------------------------------------------------------------------
    def state(self) -> dict:
        """What pipe.json holds; reads /proc/PID/io, so call it with our own rights."""
        if self.copier is not None:
            self.bytes = self.copier.done
        elif self.stages and self.stages[0].running:  # qemu-img: what it read
            progress = _proc_io(self.stages[0].pid, 'rchar')  # type: ignore[arg-type]
            if progress is not None:
                self.bytes = progress
        return {
            'id': self.copy_id,
            'tool': self.plan.tool,
            'wrapper_pid': os.getpid(),
            'pids': {s.name: s.pid for s in self.stages if s.pid},
            'pv_pid': self.pv.pid if self.pv else None,
            'rate': self.rate,
            'relimit': self.pv is not None,
            'rate_error': self.rate_error,
            'bytes': self.bytes,
            'total_bytes': self.expected if self.plan.tool == 'dd' else None,
            'started': self.started,
            'updated': time.time(),
        }

    def publish(self) -> None:
        state = self.state()
        with as_caller():
            self.files.write_json(_pipe_name(self.copy_id), state)

    def apply_rate_request(self, running: bool = True) -> None:
        """Take a new rate from ``<id>.rate``: at start as our rate, later through pv -R."""
        name = _rate_name(self.copy_id)
        with as_caller():
            try:
                mtime = self.files.lstat(name).st_mtime
                if mtime == self._request_mtime:
                    return
                self._request_mtime = mtime
                wanted = self.files.read_json(name).get('rate')
            except FileNotFoundError:
                return
            except (OSError, ForeignFile) as exc:  # ForeignFile: a ThrottleError
                self.rate_error = 'ignored rate request: %s' % exc
                return
        if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted <= 0:
            self.rate_error = 'ignored rate request %r: not a positive integer' % (wanted,)
            return
        if not running:
            self.rate = wanted
            return
        if self.pv is None or not self.pv.running:
            self.rate_error = 'this copy cannot change its rate'
            return
        import subprocess  # only here: a re-limit is rare, every copy starts
        proc = subprocess.run(['pv', '-R', str(self.pv.pid), '-L', str(self._pv_rate(wanted))],
                              capture_output=True, text=True)
        if proc.returncode:
            self.rate_error = 'pv -R failed: %s' % proc.stderr.strip()
        else:
            self.rate, self.rate_error = wanted, None
            if self.copier is not None:  # its catch-up bound follows pv's rate
                self.copier.rate = wanted

    def wait(self) -> None:
        """Until the copy ended (the copier, or qemu-img): publish, apply rate requests,
        wake pv for its last credit (:data:`FINAL_KICKS`). pv, once the copier no longer
        needs it (it ended, or failed), is stopped."""
        poller = select.poll()
        by_fd: Dict[int, Optional[Stage]] = {}
        for stage in self.stages:
            if stage.running:
                poller.register(stage.pidfd, select.POLLIN)  # type: ignore[arg-type]
                by_fd[stage.pidfd] = stage  # type: ignore[index]
        if self.copier is not None:
            poller.register(self.copier.ended, select.POLLIN)
            by_fd[self.copier.ended] = None
        kicks = [self._last_credit + k for k in FINAL_KICKS] if self._last_credit else []
        planned_rate = self.rate
        next_publish = time.monotonic()
        while by_fd and (self.copier is None or self.copier.ended in by_fd):
            now = time.monotonic()
            if now >= next_publish:
                self.apply_rate_request()
                self.publish()
                next_publish = now + POLL
            if self.rate != planned_rate or self.pv is None or not self.pv.running:
                kicks = []  # a new rate has a deadline of its own: pv paces alone
            if kicks and now >= kicks[0]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pv.pid, signal.SIGWINCH)  # type: ignore[union-attr,arg-type]
                kicks = [k for k in kicks if k > now]
            wake = min([next_publish] + kicks[:1])
            timeout = max(0.0, wake - time.monotonic())
            for fd, _ in poller.poll(math.ceil(timeout * 1000)):
                stage = by_fd[fd]
                if stage is not None:
                    stage.reap()
                    if stage.running:
                        continue
                poller.unregister(fd)
                del by_fd[fd]
        if self._copying is not None:
            self._copying.join()
            if self.pv is not None and (self.pv.running  # no token left to wait for
                                        or self.pv.returncode == -signal.SIGPIPE):
                self.pv.kill()  # ended by us, or by the copier closing its end: not a failure
                self.pv.returncode = 0

    def kill(self) -> None:
        for stage in self.stages:
            stage.kill()

    def failure(self) -> Optional[str]:
        """Why the copy failed, or None. Blames the copier first (pv then only sees a
        broken pipe), then pv (the copier then sees the end of its tokens); then checks
        that every byte was copied."""
        lines = [s.describe_failure() for s in reversed(self.stages) if s.returncode]
        if self.copier is not None and self.copier.error is not None:
            lines.insert(0, self.copier.error.strerror)
        if lines:
            return ('copy %s failed: %s' % (self.copy_id, lines[0])
                    + ''.join('\n  also: ' + line for line in lines[1:]))
        if self.copier is not None and self.expected is not None \
                and self.copier.done != self.expected:
            return ('copy %s incomplete: wrote %d of %d bytes to %s (count %s, source '
                    '%s bytes)' % (self.copy_id, self.copier.done, self.expected,
                                   self.plan.dest, self.plan.byte_count, self.source_size))
        return None

    def close(self) -> None:
        """Close the source and remove our state."""
        if self._source is not None:
            os.close(self._source)
            self._source = None
        if self.copier is not None and not (self._copying and self._copying.is_alive()):
            os.close(self.copier.ended)
        with as_caller():
            remove_state(self.state_dir, self.copy_id)


def run(argv: Sequence[str], t0: Optional[float] = None) -> int:
    """Run the copy our argv asks for; its exit status. ``t0``: when our caller started us
    (default: this process's creation)."""
    copy_id, rate, state_dir, command = parse_args(argv)
    what = plan(command, rate)
    if not os.path.isdir(state_dir):
        raise Refused('--state-dir %s is not a directory' % state_dir)
    with as_caller(), StateDir(state_dir).fd():
        pass  # StateDirError unless it is a directory the ownership model allows
    pipeline = Pipeline(copy_id, rate, state_dir, what)

    def terminate(signum, frame):
        sys.stderr.write('copy %s: terminated by %s\n' % (copy_id, signal.Signals(signum).name))
        raise SystemExit(128 + signum)

    # Our caller (rootwrap, or cinder-volume itself when root) dying ends the copy.
    parent = os.getppid()
    die_with_parent(signal.SIGTERM)
    if os.getppid() != parent:
        raise Refused('caller exited before the copy started')
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, terminate)
    try:
        try:
            pipeline.start(process_started() if t0 is None else t0)
        except OSError as exc:
            pipeline.kill()
            sys.stderr.write('copy %s failed: %s\n' % (copy_id, exc))
            return 1
        pipeline.publish()
        pipeline.wait()
    except BaseException:
        pipeline.kill()
        raise
    finally:
        pipeline.close()
    error = pipeline.failure()
    if error:
        sys.stderr.write(error + '\n')
        return 1
    sys.stderr.write((pipeline.copier.report() if pipeline.copier
                      else pipeline.stages[-1].error_text()) + '\n')
    return 0
