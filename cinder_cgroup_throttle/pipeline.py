"""``cinder-cgroup-throttle-pipe``: the rate-limited copy used where cgroups cannot throttle.

Cinder appends its own argv to the throttle prefix, so this is an exec-style wrapper::

    cinder-cgroup-throttle-pipe --id ID --rate BPS --state-dir DIR -- \\
        [ionice -cN [-nN]] dd if=S of=D count=N bs=B iflag=count_bytes[,direct] \\
        [oflag=direct] [conv=fdatasync|sparse|fdatasync,sparse]
    cinder-cgroup-throttle-pipe ... -- qemu-img convert ...

A dd becomes ``reader dd | pv -q -L BPS | writer dd`` (the writer reads with
``iflag=fullblock`` so that ``count=`` and O_DIRECT survive short pipe reads); ionice is
applied to both dds. A shell pipeline would hide failures (a missing source "succeeds" with
nothing copied, ENOSPC leaves pv exiting 0), so every stage is a child of this process and
every exit status is checked: the copy fails with the stderr of the stage that failed first
in the data flow's terms (the most downstream one; upstream stages then only see a broken
pipe). ``qemu-img convert`` gets its own limiter, ``-r BPS``. Anything else is refused.

Runs as root under rootwrap while its caller (cinder-volume) may not be root, so it:

* dies with its parent (PR_SET_PDEATHSIG) and takes its stages with it. Its parent is the
  process that ran it: a root cinder-volume's copy stops when cinder-volume dies; under
  sudo + rootwrap the parent is cinder-rootwrap, which itself waits for the copy;
* publishes progress in ``DIR/<ID>.pipe.json`` and takes rate changes from ``DIR/<ID>.rate``
  (see :func:`request_rate`), writing as the sudo caller so that it can never create or
  replace files where its caller could not.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import pwd
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import IO, Dict, Iterator, List, Optional, Sequence

from cinder_cgroup_throttle.exception import ThrottleError
from cinder_cgroup_throttle.statefiles import COPY_ID, ForeignFile, StateDir

USAGE = ('usage: cinder-cgroup-throttle-pipe --id ID --rate BYTES_PER_SECOND '
         '--state-dir DIR -- [ionice -cN [-nN]] dd OPERAND... | qemu-img convert ARG...')
POLL = 0.2  # seconds between progress updates / rate-request checks
_PR_SET_PDEATHSIG = 1

_DD_FLAGS = {'iflag': {'count_bytes', 'direct'}, 'oflag': {'direct'},
             'conv': {'fdatasync', 'sparse'}}
_DD_KEYS = ('if', 'of', 'count', 'bs', 'iflag', 'oflag', 'conv')


class Refused(Exception):
    """The argv is not one this wrapper runs."""


@dataclasses.dataclass
class Stage:
    name: str
    argv: List[str]
    proc: Optional[subprocess.Popen] = None
    stderr: Optional[IO[bytes]] = None  # temporary file collecting the stage's stderr

    def error_text(self) -> str:
        assert self.stderr is not None
        self.stderr.seek(0)
        return self.stderr.read().decode(errors='replace').strip()


# -- argv parsing -----------------------------------------------------------------------
def parse_args(argv: Sequence[str]) -> tuple:
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


def split_ionice(command: List[str]) -> tuple:
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
    if 'count' in ops and not re.match(r'^[0-9]{1,20}\Z', ops['count']):
        raise Refused('dd count=%s must be a number' % ops['count'])
    return ops


def dd_stages(ionice: List[str], ops: Dict[str, str], rate: int) -> List[Stage]:
    """reader dd | pv | writer dd, preserving count/bs/direct/sparse/fdatasync."""
    iflags = [f for f in ops.get('iflag', '').split(',') if f]
    count = ['count=' + ops['count']] if 'count' in ops else []
    reader = ionice + ['dd', 'if=' + ops['if'], 'bs=' + ops['bs']] + count
    if iflags:
        reader.append('iflag=' + ','.join(iflags))
    # fullblock: a pipe returns short reads, which would make count= copy too little and
    # make dd drop O_DIRECT for the rest of the copy.
    writer = ionice + ['dd', 'of=' + ops['of'], 'bs=' + ops['bs']] + count
    writer.append('iflag=count_bytes,fullblock' if 'count_bytes' in iflags
                  else 'iflag=fullblock')
    for key in ('oflag', 'conv'):
        if key in ops:
            writer.append('%s=%s' % (key, ops[key]))
    return [Stage('reader dd', reader), Stage('pv', ['pv', '-q', '-L', str(rate)]),
            Stage('writer dd', writer)]


def plan(command: List[str], rate: int) -> List[Stage]:
    """The stages that run ``command`` at ``rate``; Refused for anything else."""
    ionice, rest = split_ionice(command)
    if rest[:1] == ['dd']:
        return dd_stages(ionice, parse_dd(rest), rate)
    if rest[:2] == ['qemu-img', 'convert'] and not ionice:
        if any(a.startswith('-r') for a in rest[2:]):
            raise Refused('qemu-img convert already has a rate limit (-r)')
        return [Stage('qemu-img', ['qemu-img', 'convert', '-r', str(rate)] + rest[2:])]
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
    the request itself with ``pv -R``. A pipeline that has not started yet applies the
    request as it starts (None is returned then). Raises RuntimeError when it did not.
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
        if state is None:
            raise RuntimeError('copy %s ended before applying the new rate' % copy_id)
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


# -- running ----------------------------------------------------------------------------
def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """prctl(PR_SET_PDEATHSIG): the kernel sends ``sig`` when our parent exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), 'prctl(PR_SET_PDEATHSIG) failed')


class Pipeline:
    """The running stages of one copy, their published state and rate changes."""

    def __init__(self, copy_id: str, rate: int, state_dir: str, stages: List[Stage],
                 total: Optional[int]) -> None:
        self.copy_id, self.rate, self.state_dir = copy_id, rate, state_dir
        self.files = StateDir(state_dir)
        self.stages, self.total = stages, total
        self.pv = next((s for s in stages if s.name == 'pv'), None)
        self.started = time.time()
        self.rate_error: Optional[str] = None
        self.bytes: Optional[int] = None  # last known progress (a finished stage has none)
        self._request_mtime: Optional[float] = None

    def start(self) -> None:
        env = dict(os.environ, LC_ALL='C')
        upstream = None
        for i, stage in enumerate(self.stages):
            stage.stderr = tempfile.TemporaryFile()
            last = i == len(self.stages) - 1
            stage.proc = subprocess.Popen(
                stage.argv, stdin=upstream, stderr=stage.stderr, env=env,
                stdout=None if last else subprocess.PIPE,
                preexec_fn=lambda: die_with_parent(signal.SIGKILL))
            if upstream is not None:
                upstream.close()  # only the two stages hold a pipe's ends
            upstream = stage.proc.stdout

    def state(self) -> dict:
        """What pipe.json holds; reads /proc/PID/io, so call it with our own rights."""
        progress = None
        if self.pv is not None and self.stages[-1].proc is not None:
            # The writer dd's write(2)s: pv moves data with splice(2), which wchar misses.
            progress = _proc_io(self.stages[-1].proc.pid, 'wchar')
        elif self.stages[0].proc is not None:
            progress = _proc_io(self.stages[0].proc.pid, 'rchar')
        if progress is not None:
            self.bytes = progress
        return {
            'id': self.copy_id,
            'tool': 'dd' if self.pv is not None else self.stages[0].argv[0],
            'wrapper_pid': os.getpid(),
            'pids': {s.name: s.proc.pid for s in self.stages if s.proc},
            'pv_pid': self.pv.proc.pid if self.pv and self.pv.proc else None,
            'rate': self.rate,
            'relimit': self.pv is not None,
            'rate_error': self.rate_error,
            'bytes': self.bytes,
            'total_bytes': self.total,
            'started': self.started,
            'updated': time.time(),
        }

    def publish(self) -> None:
        state = self.state()
        with as_caller():
            self.files.write_json(_pipe_name(self.copy_id), state)

    def apply_rate_request(self) -> None:
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
        if self.pv is None or self.pv.proc is None:
            self.rate_error = 'this copy cannot change its rate'
            return
        proc = subprocess.run(['pv', '-R', str(self.pv.proc.pid), '-L', str(wanted)],
                              capture_output=True, text=True)
        if proc.returncode:
            self.rate_error = 'pv -R failed: %s' % proc.stderr.strip()
        else:
            self.rate, self.rate_error = wanted, None

    def wait(self) -> None:
        while True:
            running = [s.proc for s in self.stages if s.proc and s.proc.poll() is None]
            if not running:
                return
            self.apply_rate_request()
            self.publish()
            # Wakes as soon as the most downstream running stage (the one ending last) ends.
            with contextlib.suppress(subprocess.TimeoutExpired):
                running[-1].wait(timeout=POLL)

    def kill(self) -> None:
        for stage in self.stages:
            if stage.proc is not None and stage.proc.poll() is None:
                stage.proc.kill()
        for stage in self.stages:
            if stage.proc is not None:
                stage.proc.wait()

    def failure(self) -> Optional[str]:
        """Why the copy failed, or None. Blames the most downstream failed stage: when a
        stage dies, those before it only see a broken pipe and those after it see EOF."""
        failed = [s for s in self.stages if s.proc and s.proc.returncode]
        if not failed:
            return None
        lines = []
        for stage in reversed(failed):
            code = stage.proc.returncode  # type: ignore[union-attr]
            how = ('killed by %s' % signal.Signals(-code).name if code < 0
                   else 'exited with status %d' % code)
            text = stage.error_text()
            lines.append('%s (%s) %s%s' % (stage.name, ' '.join(stage.argv), how,
                                           ': ' + text if text else ''))
        return ('copy %s failed: %s' % (self.copy_id, lines[0])
                + ''.join('\n  also: ' + line for line in lines[1:]))

    def cleanup(self) -> None:
        with as_caller():
            remove_state(self.state_dir, self.copy_id)


def run(argv: Sequence[str]) -> int:
    copy_id, rate, state_dir, command = parse_args(argv)
    stages = plan(command, rate)
    total = None
    if stages[-1].name == 'writer dd':
        ops = parse_dd(split_ionice(command)[1])
        if 'count' in ops and 'count_bytes' in ops.get('iflag', ''):
            total = int(ops['count'])
    if not os.path.isdir(state_dir):
        raise Refused('--state-dir %s is not a directory' % state_dir)
    with as_caller(), StateDir(state_dir).fd():
        pass  # StateDirError unless it is a directory the ownership model allows
    pipeline = Pipeline(copy_id, rate, state_dir, stages, total)

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
        pipeline.start()
        pipeline.publish()
        pipeline.wait()
    except BaseException:
        pipeline.kill()
        raise
    finally:
        pipeline.cleanup()
    error = pipeline.failure()
    if error:
        sys.stderr.write(error + '\n')
        return 1
    sys.stderr.write(pipeline.stages[-1].error_text() + '\n')
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except (Refused, ThrottleError) as exc:  # ThrottleError: an unsafe state directory
        sys.stderr.write('cinder-cgroup-throttle-pipe: %s\n' % exc)
        return 2
    except OSError as exc:  # a stage could not be started (pv not installed, ...)
        sys.stderr.write('cinder-cgroup-throttle-pipe: copy failed: %s\n' % exc)
        return 1


if __name__ == '__main__':
    sys.exit(main())
