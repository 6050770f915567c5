"""The oslo.privsep daemon of a non-root cinder-volume: context and entrypoints.

Imported only when a privileged step is first needed (``privileged.PrivilegedDriver``):
oslo.privsep imports eventlet, which costs the CLI a second of start-up. Each entrypoint
validates its arguments again and runs the root side in ``privileged`` (the same driver
code a root cinder-volume runs); the client side turns privsep's failures into our named
errors. How the daemon is started and why it holds CAP_DAC_OVERRIDE only: see
``privileged``.
"""
from __future__ import annotations

import copy
import functools
import logging
import os
import shlex
import socket
import subprocess
import tempfile
import time
import warnings
from typing import Any, Callable, List, Sequence, Tuple

with warnings.catch_warnings():  # eventlet's deprecation notice, on import by privsep
    warnings.simplefilter('ignore')
    from oslo_privsep import capabilities, comm, daemon, priv_context

from cinder_cgroup_throttle import privileged
from cinder_cgroup_throttle.exception import PrivilegedHelperError, PrivilegedTimeout

LOG = logging.getLogger(__name__)

SECTION = 'privsep_cinder_cgroup_throttle'
CAPABILITIES = [capabilities.CAP_DAC_OVERRIDE]  # see privileged's doc
CALL_TIMEOUT = 30.0  # one cgroup step; none blocks (waiting is the caller's)
START_TIMEOUT = 60.0  # sudo + rootwrap + the daemon's Python start-up


class _TimedRootwrapChannel(daemon._ClientChannel):
    """oslo.privsep's RootwrapClientChannel with a deadline: its start waits without one
    for the helper command and for the daemon to connect."""

    def __init__(self, context: priv_context.PrivContext, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        tmpdir = tempfile.mkdtemp()  # 0700: only we (and root) reach the socket
        sockpath = os.path.join(tmpdir, 'privsep.sock')
        listen_sock = socket.socket(socket.AF_UNIX)
        try:
            listen_sock.bind(sockpath)
            listen_sock.listen(1)
            cmd = context.helper_command(sockpath)
            LOG.info('starting the privsep daemon: %s', shlex.join(cmd))
            stderr = daemon._fd_logger()  # the daemon logs through it, as privsep's own
            try:
                status = subprocess.run(cmd, stdin=subprocess.DEVNULL, stderr=stderr,
                                        timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                raise PrivilegedTimeout('starting the privsep daemon took more than %g s: %s'
                                        % (timeout, shlex.join(cmd))) from None
            except OSError as exc:
                raise PrivilegedHelperError('cannot run %s: %s'
                                            % (shlex.join(cmd), exc)) from exc
            finally:
                stderr.close()
            if status != 0:
                raise PrivilegedHelperError(
                    'the privsep daemon did not start: %s exited %d (cinder-rootwrap: 99 '
                    'no filter admits it, 96 privsep-helper is not in exec_dirs; sudo: 1; '
                    'see doc/deployment.md)' % (shlex.join(cmd), status))
            listen_sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                sock, _addr = listen_sock.accept()
            except socket.timeout:
                raise PrivilegedTimeout('the privsep daemon did not connect within %g s'
                                        % timeout) from None
            sock.settimeout(None)
        finally:
            listen_sock.close()
            if os.path.exists(sockpath):
                os.unlink(sockpath)
            os.rmdir(tmpdir)
        super().__init__(sock, context)


class _Context(priv_context.PrivContext):
    """A PrivContext whose daemon starts through our root helper, with a deadline."""

    def helper_command(self, sockpath: str) -> List[str]:
        cmd = super().helper_command(sockpath)
        if not self.conf.helper_command and cmd[:2] == ['sudo', 'privsep-helper']:
            # priv_context.init() was not called (cinder-volume calls it with Cinder's
            # root helper; the CLI does not): sudo alone would not be allowed.
            cmd = privileged.default_root_helper() + cmd[1:]
        return cmd

    def start(self, method: priv_context.Method = priv_context.Method.ROOTWRAP) -> None:
        if method is not priv_context.Method.ROOTWRAP:
            return super().start(method)
        with self.start_lock:
            if self.channel is None:
                self.channel = _TimedRootwrapChannel(self, START_TIMEOUT)


default = _Context(__name__, cfg_section=SECTION, pypath=__name__ + '.default',
                   capabilities=CAPABILITIES, logger_name=__name__, timeout=CALL_TIMEOUT)


def list_opts() -> List[Any]:
    """The daemon's options ([privsep_cinder_cgroup_throttle] in cinder.conf, read by the
    daemon from root-owned files) with this context's defaults, for the sample config."""
    out = copy.deepcopy(priv_context.OPTS)
    for opt in out:
        if opt.name == 'capabilities':
            opt.default = list(CAPABILITIES)
            opt.sample_default = ','.join(capabilities.CAPS_BYVALUE[c] for c in CAPABILITIES)
        elif opt.name == 'logger_name':
            opt.default = __name__
    return out


def _drop_dead_channel() -> bool:
    """Forget the channel when its daemon is gone, so that the next call starts a new one;
    True if it was. privsep's reader thread ends on EOF, but dies on a reset connection
    (a daemon killed with a request unread) without failing the calls in flight or marking
    the channel dead: those calls then only end at their deadline, and every later call
    would fail on the broken socket."""
    channel = default.channel
    if channel is None or channel.reader_thread.is_alive():
        return False
    with default.start_lock:
        if default.channel is channel:
            try:
                channel.writer.writesock.close()
            except OSError:
                pass
            default.channel = None
    return True


def _client(func: Callable[..., Any]) -> Callable[..., Any]:
    """Make ``func`` an entrypoint of :data:`default` whose failures to cross into root
    are our named errors."""
    entrypoint = default.entrypoint(func)

    @functools.wraps(func)
    def call(*args: Any) -> Any:
        try:
            return entrypoint(*args)
        except comm.PrivsepTimeout:
            if _drop_dead_channel():
                raise PrivilegedHelperError('privileged %s%r: privsep daemon gone'
                                            % (func.__name__, args)) from None
            raise PrivilegedTimeout('privileged %s%r did not finish within %g s'
                                    % (func.__name__, args, default.timeout)) from None
        except (daemon.FailedToDropPrivileges, daemon.ProtocolError) as exc:
            raise PrivilegedHelperError('privsep daemon: %s' % exc) from exc
        except OSError as exc:
            if not _drop_dead_channel():
                raise  # the operation's own error, raised again from the daemon
            raise PrivilegedHelperError('privileged %s%r: privsep daemon gone: %s'
                                        % (func.__name__, args, exc)) from exc
    # The daemon looks the name up and runs only what carries its context's mark.
    setattr(call, priv_context._ENTRYPOINT_ATTR, default)
    return call


@_client
def create_leaf(controller: str, parent: str, leaf: str,
                limits: Sequence[Sequence[str]]) -> str:
    return privileged.create_leaf(controller, parent, leaf, limits)


@_client
def write_limits(controller: str, parent: str, leaf: str, limits: Sequence[Sequence[str]],
                 previous: Sequence[Sequence[str]]) -> None:
    privileged.write_limits(controller, parent, leaf, limits, previous)


@_client
def try_remove_leaf(controller: str, parent: str, leaf: str,
                    kill: bool) -> Tuple[bool, List[int]]:
    return privileged.try_remove_leaf(controller, parent, leaf, kill)
