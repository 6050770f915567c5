"""``cinder-cgroup-throttle``: the operator's command line.

It works from the registry and the kernel only, so it sees and acts on copies run by
cinder-volume (or by another ``copy``) in other processes.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO

from cinder_cgroup_throttle import backends, cleanup, demo, privileged, transfer
from cinder_cgroup_throttle.cgroups import detect, placement, validate_cgroup_path
from cinder_cgroup_throttle.exception import (CgroupUnavailable, CopyNotFound, InvalidRate,
                                              ThrottleError)
from cinder_cgroup_throttle.manager import DEFAULT_CGROUP, CopyManager
from cinder_cgroup_throttle.privileged import PIPE_COMMAND
from cinder_cgroup_throttle.progress import (Progress, copy_kind, dd_total, metrics_text,
                                             snapshot, volume_progress)
from cinder_cgroup_throttle.registry import DEFAULT_STATE_DIR, STATE_DIR_ENV, Registry
from cinder_cgroup_throttle.statefiles import new_copy_id
from cinder_cgroup_throttle.units import format_rate, format_size, parse_rate

PROG = 'cinder-cgroup-throttle'
LOG = logging.getLogger(PROG)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143

EPILOG = """\
RATE and SIZE: plain bytes (per second), or a number with K, M, G, T (x1000) or
Ki, Mi, Gi, Ti (x1024), optionally followed by B and /s: 8388608, 8Mi, 8MiB/s, 10M.

exit status:
  0    success
  1    the operation failed (copy failed or incomplete, throttling cannot work
       on this host, cleanup could not remove something), or the state
       directory holds foreign files (status, cleanup: listed, left alone)
  2    bad arguments
  3    no active copy has the given id (set-limit)
  130  interrupted (Ctrl-C); 143 terminated (SIGTERM)
"""


class _Terminated(Exception):
    """SIGTERM, turned into an exception so that every context manager cleans up."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


# -- argument types: a bad value becomes argparse's one-line error --------------------------
def _rate(text: str) -> int:
    try:
        bps = parse_rate(text, 'RATE')
    except InvalidRate as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if bps <= 0:
        raise argparse.ArgumentTypeError('RATE must be greater than 0, not %r' % text)
    return bps


def _size(text: str) -> int:
    try:
        size = parse_rate(text, 'SIZE')
    except InvalidRate as exc:
        raise argparse.ArgumentTypeError(str(exc).replace('is not a rate', 'is not a size')
                                         ) from None
    if size <= 0:
        raise argparse.ArgumentTypeError('SIZE must be greater than 0, not %r' % text)
    return size


def _block_size(text: str) -> str:
    if not dd_total(['dd', 'count=1', 'bs=' + text]):
        raise argparse.ArgumentTypeError(
            '%r is not a dd block size (e.g. 64K, 1M, 4M)' % text)
    return text


def _cgroup_name(text: str) -> str:
    try:
        return validate_cgroup_path(text)
    except ThrottleError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 60:
        raise argparse.ArgumentTypeError('%r is not a number of seconds from 0 to 60' % text)
    return value


# -- formatting -----------------------------------------------------------------------------
def format_bytes(n: Optional[float]) -> str:
    return '-' if n is None else format_size(n)


def format_eta(seconds: Optional[float]) -> str:
    if seconds is None:
        return '-'
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return ('%d:%02d:%02d' % (hours, rest // 60, rest % 60) if hours
            else '%d:%02d' % divmod(rest, 60))


def _opt_rate(bps: Optional[float]) -> str:
    return '-' if bps is None else format_rate(bps)


def progress_line(p: Progress, width: int = 24) -> str:
    percent = p.percent
    filled = int(width * (percent or 0) / 100)
    return '[%s%s] %5s  %s / %s  %s  ETA %s' % (
        '#' * filled, '-' * (width - filled),
        '-' if percent is None else '%.1f%%' % percent,
        format_bytes(p.bytes_done), format_bytes(p.total_bytes),
        _opt_rate(p.rate_bps), format_eta(p.eta_s))


class ProgressBar:
    """Redraws one line on a terminal; prints a line every few seconds into a log."""

    def __init__(self, stream: TextIO, every: float = 2.0) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.every = every
        self._last = 0.0

    def __call__(self, p: Progress) -> None:
        if self.tty:
            self.stream.write('\r' + progress_line(p) + '\x1b[K')
        elif time.monotonic() - self._last >= self.every:
            self._last = time.monotonic()
            self.stream.write(progress_line(p) + '\n')
        self.stream.flush()

    def done(self) -> None:
        if self.tty:
            self.stream.write('\n')


def table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return '\n'.join('  '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                     for r in rows)


def _say(text: str) -> None:
    print(text, flush=True)


def _registry(args: argparse.Namespace) -> Registry:
    return Registry(args.state_dir)


def _manager(args: argparse.Namespace, executor: privileged.Executor,
             backend: str = backends.AUTO) -> CopyManager:
    return CopyManager(args.cgroup_name, backend=backend, registry=_registry(args),
                       executor=executor)


def _summary(result: transfer.TransferResult) -> str:
    if result.final_bps_limit == result.bps_limit:
        versus = '%.3f of the %s limit' % (result.rate / result.bps_limit,
                                           format_rate(result.bps_limit))
    else:
        versus = 'limit changed from %s to %s during the copy' % (
            format_rate(result.bps_limit), format_rate(result.final_bps_limit))
    return ('copied %s in %.2f s (dd\'s clock): %s = %s (copy %s, backend %s: %s)'
            % (format_bytes(result.bytes), result.seconds, format_rate(result.rate),
               versus, result.copy_id, result.backend, result.reason))


# -- subcommands ----------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    ok = lambda text: _say('[ok]   ' + text)  # noqa: E731
    warn = lambda text: _say('[warn] ' + text)  # noqa: E731
    fail = lambda text: _say('[FAIL] ' + text)  # noqa: E731
    host = detect()
    ok('cgroup layout: %s (v1 blkio: %s; cgroup2: %s, controllers: %s)' % (
        host.layout, host.v1_blkio or 'not mounted', host.v2_root or 'not mounted',
        ' '.join(host.v2_controllers) or 'none'))
    for line in placement.describe(args.cgroup_name, host):
        ok('placement of per-copy cgroups, ' + line)
    cgroup_ok = False
    executor = privileged.executor()
    try:
        # As CopyManager does it: the same placement, backend and executor.
        driver = backends.host_cgroup(args.cgroup_name, executor,
                                      _registry(args).directory).driver
        probe = new_copy_id()
        driver.create_leaf(probe)
        driver.remove_leaf(probe, grace=0)  # and the parent, if the probe created it
        ok('controller %s at %s: usable, %s is writable %s (probe cgroup created and '
           'removed)' % (driver.controller, driver.mountpoint, driver.parent_path,
                         executor.how()))
        cgroup_ok = True
    except (ThrottleError, OSError) as exc:  # OSError: e.g. the root helper is missing
        fail('cgroup controller: %s' % exc)
    tools = {name: shutil.which(name) for name in
             ('cgexec', 'dd', 'pv', PIPE_COMMAND, 'qemu-img')}
    tools[PIPE_COMMAND] = shutil.which(executor.pipe_command() or PIPE_COMMAND)
    for name, path in tools.items():
        (ok if path else warn)('%s: %s' % (name, path or 'not found'))
    if cgroup_ok and not tools['cgexec']:
        fail('the cgroup backend needs cgexec (apt-get install cgroup-tools)')
        cgroup_ok = False
    pv_ok = bool(tools['pv'] and tools[PIPE_COMMAND])
    if not cgroup_ok and not pv_ok:
        fail('nothing can throttle copies here: no usable cgroup controller and no pv '
             'fallback (install pv)')
        return EXIT_FAILED
    if not _check_coordination(args, ok, fail):
        return EXIT_FAILED
    if args.src is None:
        _say('throttling works: %s' % ('cgroup backend' if cgroup_ok
                                       else 'pv fallback only'))
        return EXIT_OK
    try:
        # Set the copy up for real (leaf, limit, registry entry) and tear it down again.
        with _manager(args, executor, args.backend).copy(args.src, args.dst, 2**20) as copy:
            limits = ', '.join('%s %s' % (lim.device, 'write' if lim.wbps else 'read')
                               for lim in copy.limits) or 'none'
            ok('%s -> %s: backend %s (%s); limited: %s'
               % (args.src, args.dst, copy.backend, copy.reason, limits))
    except ThrottleError as exc:
        fail('%s -> %s: %s' % (args.src, args.dst, exc))
        return EXIT_FAILED
    _say('throttling works for %s -> %s: backend %s' % (args.src, args.dst, copy.backend))
    return EXIT_OK


def _check_coordination(args: argparse.Namespace, ok: Callable[[str], None],
                        fail: Callable[[str], None]) -> bool:
    """Whether every shared copy budget's coordination (of the processes using the state
    directory, or --coordination-url) answers."""
    from cinder_cgroup_throttle import budget
    targets = [(s['url'], s['group']) for s in budget.local_states(_registry(args).directory)]
    if args.coordination_url:
        targets.append((args.coordination_url, 'check'))
    reachable = True
    for url, group in targets:
        try:
            members = budget.probe(url, group)
            ok('copy budget %s: coordination at %s reachable (%d hosts)'
               % (group, budget.redact(url), len(members)))
        except ThrottleError as exc:
            fail('copy budget %s: %s; copies run at their local limits' % (group, exc))
            reachable = False
    return reachable


def _budget_lines(views: List[Dict[str, Any]]) -> List[str]:
    lines = []
    for v in views:
        lines.append('budget %s: %s shared through %s%s' % (
            v['group'], format_rate(v['budget_bps']), v['url'],
            '' if v['reachable'] else ' -- %s; copies here run at their local limits'
            % v['error']))
        rows = [['HOST', 'PID', 'COPY', 'LOCAL', 'SHARE']]
        for h in v['hosts']:
            rows += [[h['host'] or '-', str(h['pid']), c['id'],
                      format_rate(c['local_bps']) if c['local_bps'] else 'no limit',
                      _opt_rate(c['share_bps'])] for c in h['copies']]
            if not h['copies']:
                rows.append([h['host'] or '-', str(h['pid']), '-', '-', '-'])
        lines += [table(rows), ''] if v['reachable'] else ['']
    return lines


def cmd_copy(args: argparse.Namespace) -> int:
    bar = ProgressBar(sys.stderr)
    try:
        result = transfer.run(_manager(args, privileged.executor(), args.backend), args.src,
                              args.dst, args.limit,
                              bs=args.bs, size=args.size, volume_id=args.volume_id,
                              on_progress=bar)
    finally:
        bar.done()
    _say(_summary(result))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    bar = ProgressBar(sys.stderr)
    _say('demo: copying %s at %s' % (format_bytes(args.size), format_rate(args.limit)))
    try:
        result = demo.run(_manager(args, privileged.executor()), args.limit, args.size,
                          on_progress=bar, say=_say)
    finally:
        bar.done()
    _say(_summary(result))
    _say('demo: done, scratch devices removed')
    return EXIT_OK


def _copy_row(entry: Any, p: Progress) -> Dict[str, Any]:
    data = dataclasses.asdict(entry)
    data.update(owner_alive=entry.owner_alive(), progress=p.as_dict())
    return data


def cmd_volume_status(args: argparse.Namespace) -> int:
    """One volume: its migration/copy progress (NA, 0%, N%, 100%) and its copies."""
    vp = volume_progress(_registry(args), args.volume, interval=args.interval)
    if args.json:
        print(json.dumps(vp.as_dict(), indent=2))
        return EXIT_OK
    line = 'volume %s: %s (%s)' % (vp.volume_id, vp.text, vp.state)
    for e, p in vp.copies:
        line += '\n  %s %s: %s / %s at %s, limit %s, backend %s' % (
            copy_kind(e.src), e.id, format_bytes(p.bytes_done), format_bytes(p.total_bytes),
            _opt_rate(p.rate_bps), format_rate(e.bps_limit), e.backend)
    if vp.finished:
        f = vp.finished
        line += '\n  last %s copy %s %s: %s at %s average' % (
            f.get('kind'), f.get('copy_id'), 'finished' if f['ok'] else 'FAILED',
            format_bytes(f.get('bytes_done')), _opt_rate(f.get('average_bps')))
    _say(line)
    return EXIT_OK


def _write_textfile(path: str, text: str) -> None:
    """Atomic replace of a world-readable file at an operator-chosen path (not the state
    directory): a scraper sees the old or the new text, never a partial one."""
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path),
                               dir=os.path.dirname(path) or '.')
    try:
        with os.fdopen(fd, 'w') as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def cmd_metrics(args: argparse.Namespace) -> int:
    """Prometheus text format on stdout, or into a node_exporter textfile (atomically)."""
    registry = _registry(args)
    while True:
        entries = registry.entries()
        text = metrics_text(entries, snapshot(registry, entries, args.interval))
        if not args.textfile:
            sys.stdout.write(text)
            return EXIT_OK
        _write_textfile(args.textfile, text)
        if not args.every:
            return EXIT_OK
        time.sleep(args.every)


def cmd_status(args: argparse.Namespace) -> int:
    if args.volume:
        return cmd_volume_status(args)
    from cinder_cgroup_throttle import budget
    registry = _registry(args)
    entries, foreign = registry.scan()
    for exc in foreign:  # after the copies, which are still shown: exit 1
        print('%s: error: %s' % (PROG, exc), file=sys.stderr)
    code = EXIT_FAILED if foreign else EXIT_OK
    progress = snapshot(registry, entries, args.interval)
    budgets = budget.views(registry.directory)
    if args.json:
        rows = [_copy_row(e, p) for e, p in zip(entries, progress)]
        found: Dict[str, Any] = {'copies': rows}
        if budgets:  # shared copy budgets of processes using this state directory
            found['budgets'] = budgets
        print(json.dumps(found, indent=2))
        return code
    for line in _budget_lines(budgets):
        _say(line)
    if not entries:
        _say('no active copies (registry %s)' % _registry(args).directory)
        return code
    rows = [['ID', 'VOLUME', 'BACKEND', 'LIMIT', 'DONE', 'TOTAL', '%', 'RATE', 'ETA',
             'OWNER', 'SRC -> DST']]
    for e, p in zip(entries, progress):
        rows.append([e.id, e.volume_id or '-', e.backend, format_rate(e.bps_limit),
                     format_bytes(p.bytes_done), format_bytes(p.total_bytes),
                     '-' if p.percent is None else '%.1f' % p.percent,
                     _opt_rate(p.rate_bps), format_eta(p.eta_s),
                     '%d%s' % (e.owner_pid, '' if e.owner_alive() else ' (dead)'),
                     '%s -> %s' % (e.src, e.dst)])
    _say(table(rows))
    return code


def cmd_set_limit(args: argparse.Namespace) -> int:
    from cinder_cgroup_throttle import relimit
    entry = relimit.set_limit(args.id, args.rate, _registry(args))
    note = ('' if entry.bps_limit == args.rate else
            ' (asked %s; the host-wide cap allows this share)' % format_rate(args.rate))
    _say('copy %s: limit now %s%s' % (entry.id, format_rate(entry.bps_limit), note))
    return EXIT_OK


def cmd_cleanup(args: argparse.Namespace) -> int:
    executor, registry = privileged.executor(), _registry(args)
    try:  # where the service puts its leaves (cgroups.placement), as CopyManager does
        host = backends.host_cgroup(args.cgroup_name, executor, registry.directory)
    except CgroupUnavailable as exc:
        LOG.warning('no cgroup controller (%s): cleaning the registry only', exc)
        host = None
    actions = cleanup.clean(registry, host, dry_run=args.dry_run, executor=executor)
    for action in actions:
        _say(str(action))
    if not actions:
        _say('nothing to clean up (registry %s%s)' % (
            registry.directory, ', cgroup %s' % host.driver.parent_path if host else ''))
    return EXIT_FAILED if any(a.action == 'failed' or a.kind == 'foreign'
                              for a in actions) else EXIT_OK


# -- parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Per-copy cgroup I/O throttling for Cinder volume copies: check a '
                    'host, run a throttled copy, watch and re-limit active copies, clean '
                    'up after crashes.')
    parser.add_argument('--state-dir', default=None,
                        help='registry of active copies (default: $%s or %s)'
                        % (STATE_DIR_ENV, DEFAULT_STATE_DIR))
    parser.add_argument('--cgroup-name', type=_cgroup_name, default=DEFAULT_CGROUP,
                        help='parent cgroup of the per-copy cgroups (default: %(default)s, '
                        "Cinder's volume_copy_blkio_cgroup_name)")
    parser.add_argument('--debug', action='store_true', help='log details and tracebacks')
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

    def command(name: str, func: Callable[[argparse.Namespace], int], help_: str
                ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func, parser=p)
        return p

    p = command('check', cmd_check, 'diagnose the host: cgroup layout, controller, tools; '
                'with SRC DST, which backend that copy would get and why')
    p.add_argument('src', nargs='?', metavar='SRC')
    p.add_argument('dst', nargs='?', metavar='DST')
    p.add_argument('--backend', choices=backends.CHOICES, default=backends.AUTO)
    p.add_argument('--coordination-url', metavar='URL',
                   help='also check that this etcd3+http(s):// copy budget URL answers')

    p = command('copy', cmd_copy, 'copy SRC (block device or file) to DST at RATE, with a '
                'progress bar on stderr and a summary')
    p.add_argument('src', metavar='SRC')
    p.add_argument('dst', metavar='DST')
    p.add_argument('--limit', type=_rate, required=True, metavar='RATE')
    p.add_argument('--backend', choices=backends.CHOICES, default=backends.AUTO)
    p.add_argument('--bs', type=_block_size, default='1M', help='dd block size (default 1M)')
    p.add_argument('--size', type=_size, default=None,
                   help='bytes to copy (default: all of SRC)')
    p.add_argument('--volume-id', default=None, help='shown by status, usable by set-limit')

    p = command('status', cmd_status, 'active copies with progress')
    p.add_argument('--json', action='store_true',
                   help='print {"copies": [{"id": ..., "progress": {...}, ...}]}')
    p.add_argument('--interval', type=_interval, default=1.0, metavar='SECONDS',
                   help='rate sampling interval (default %(default)s)')
    p.add_argument('--volume', metavar='ID', default=None,
                   help="one volume's progress: NA (no copy known), 0%% (starting), the "
                   "copied percent, 100%% (done), and its copies")

    p = command('metrics', cmd_metrics, 'progress of active copies in the Prometheus text '
                'format (bytes done, total, rate, limit per copy and volume)')
    p.add_argument('--textfile', metavar='PATH', default=None,
                   help='write to PATH atomically (node_exporter textfile collector) '
                   'instead of stdout')
    p.add_argument('--every', type=_interval, default=0, metavar='SECONDS',
                   help='with --textfile: rewrite it every SECONDS until terminated')
    p.add_argument('--interval', type=_interval, default=1.0, metavar='SECONDS',
                   help='rate sampling interval (default %(default)s)')

    p = command('set-limit', cmd_set_limit, 'change the rate of a running copy')
    p.add_argument('id', metavar='ID', help='copy id (as status shows it) or volume id')
    p.add_argument('rate', type=_rate, metavar='RATE')

    p = command('cleanup', cmd_cleanup, 'remove cgroups and registry entries left by '
                'copies whose process died; never touches a cgroup with live processes')
    p.add_argument('--dry-run', action='store_true', help='only list what would be removed')

    p = command('demo', cmd_demo, 'throttled copy between two scratch loop devices it '
                'creates, verified and removed afterwards (needs root)')
    p.add_argument('--limit', type=_rate, default=demo.DEFAULT_LIMIT, metavar='RATE',
                   help='default 8Mi')
    p.add_argument('--size', type=_size, default=demo.DEFAULT_SIZE,
                   help='default 64Mi (whole MiB)')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, value in vars(args).items():
        if isinstance(value, list):  # argparse turns "--opt=--" into []; no option is a list
            args.parser.error('argument --%s: expected one value' % name.replace('_', '-'))
    if args.command == 'check' and args.dst is None and args.src is not None:
        args.parser.error('check takes SRC and DST together, or neither')
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format=PROG + ': %(levelname)s: %(message)s')
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print('%s: interrupted' % PROG, file=sys.stderr)
        return EXIT_INTERRUPTED
    except _Terminated:
        print('%s: terminated' % PROG, file=sys.stderr)
        return EXIT_TERMINATED
    except CopyNotFound as exc:
        print('%s: error: %s' % (PROG, exc), file=sys.stderr)
        return EXIT_NOT_FOUND
    except (ThrottleError, OSError) as exc:
        if args.debug:
            raise
        print('%s: error: %s' % (PROG, exc), file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # a bug: one line naming it; --debug shows the traceback
        if args.debug:
            raise
        print('%s: internal error: %s: %s (run with --debug for details)'
              % (PROG, type(exc).__name__, exc), file=sys.stderr)
        return EXIT_FAILED


if __name__ == '__main__':
    sys.exit(main())
