#!/usr/bin/env python3
"""Benchmark: our per-copy cgroup throttle against Cinder's BlkioCgroup, side by side.

Run as root from a checkout: ``python bench/run.py [--quick] [--json FILE] [--out DIR]``.
See bench/README.md for what is measured and how to read the table.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import sys
import time
import warnings
from typing import Any, Dict, List

import environment


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true',
                        help='a subset with shorter copies (under 3 minutes)')
    parser.add_argument('--json', metavar='FILE', help='write the rows here as JSON '
                        '(default: OUT/results.json)')
    parser.add_argument('--out', metavar='DIR', default=os.path.join(environment.REPO,
                                                                     'bench', 'out'),
                        help='directory for results.json, table.md and throughput.png')
    parser.add_argument('--phase', action='append', dest='phases',
                        choices=['accuracy', 'concurrent', 'scale', 'cpu', 'timeline',
                                 'budget', 'fallback'],
                        help='run only this phase (repeatable)')
    parser.add_argument('--cinder-at-once', type=int, metavar='N',
                        help="copies at once for Cinder's throttle in the scale phase "
                        '(default 16: its cost grows with the square of N)')
    parser.add_argument('--no-install', action='store_true',
                        help='fail instead of creating bench/.venv when Cinder is missing')
    return parser.parse_args(argv)


def machine() -> Dict[str, Any]:
    model = ''
    with open('/proc/cpuinfo') as f:
        for line in f:
            if line.startswith('model name'):
                model = line.split(':', 1)[1].strip()
                break
    with open('/proc/meminfo') as f:
        mem_kib = int(f.readline().split()[1])
    from importlib.metadata import version
    from cinder_cgroup_throttle.cgroups import detect
    return {'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
            'kernel': platform.release(), 'cpu': model, 'cpus': os.cpu_count(),
            'memory_gib': round(mem_kib / 2**20, 1), 'cgroup_layout': detect().layout,
            'python': platform.python_version(), 'cinder': version('cinder'),
            'loadavg_start': os.getloadavg()}


def cpu_pressure() -> float:
    """Share of the last 60 s in which some runnable task waited for a CPU (PSI), in %."""
    try:
        with open('/proc/pressure/cpu') as f:
            return float(f.readline().split()[2].split('=')[1])
    except (OSError, IndexError, ValueError):
        return float('nan')


def attached_loops(prefix: str) -> List[str]:
    """Loop devices still backed by a file under ``prefix`` (this run's scratch dir)."""
    found = []
    for name in os.listdir('/sys/block'):
        try:
            with open('/sys/block/%s/loop/backing_file' % name) as f:
                if f.read().strip().startswith(prefix):
                    found.append('/dev/' + name)
        except OSError:
            pass
    return found


def _terminate(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: List[str]) -> int:
    args = parse_args(argv[1:])
    environment.ensure(argv, allow_install=not args.no_install)
    environment.activate()
    environment.compile_package()
    signal.signal(signal.SIGTERM, _terminate)
    warnings.filterwarnings('ignore', message='.*Eventlet is deprecated')  # cinder imports it

    import cases
    import copyrun
    import report
    from contenders import Contenders
    from tests.scratch import Scratch

    cfg = cases.Config.make(args.quick)
    if args.cinder_at_once:
        cfg.cinder_at_once = args.cinder_at_once
    phases = args.phases or list(cases.PHASES)
    meta = machine()
    meta.update(mode='quick' if args.quick else 'full', limit_bps=cfg.limit,
                copy_seconds=cfg.seconds, reps=cfg.reps)
    t0 = time.monotonic()
    rows: List[Dict[str, Any]] = []
    state = Scratch()  # holds the registry for the whole run
    con = Contenders(cfg.limit, os.path.join(state.dir, 'state'))
    leftovers: List[str] = []
    pressure: Dict[str, List[float]] = {}
    try:
        for phase in phases:
            cases.log('phase %s' % phase)
            scratch = Scratch()
            pressure[phase] = [cpu_pressure()]
            try:
                rows += cases.PHASES[phase](cfg, scratch, con)
            except Exception as exc:  # one broken phase must not hide the others' numbers
                rows.append(cases.error_row('phase ' + phase, 'ours', exc))
            finally:
                pressure[phase].append(cpu_pressure())
                copyrun.stop_all()
                scratch.close()
                leftovers += attached_loops(scratch.dir)
    except KeyboardInterrupt:
        cases.log('interrupted: cleaning up')
        copyrun.stop_all()
        raise
    finally:
        leftovers += con.close()
        state.close()
        leftovers += attached_loops(state.dir)
    meta.update(elapsed_seconds=round(time.monotonic() - t0, 1),
                loadavg_end=os.getloadavg(), left_behind_at_exit=leftovers,
                cpu_pressure_avg60_by_phase=pressure)

    text = report.table(rows)
    os.makedirs(args.out, exist_ok=True)
    json_path = args.json or os.path.join(args.out, 'results.json')
    report.write_json(json_path, meta, rows)
    png = os.path.join(args.out, 'throughput.png')
    why_not = report.plot(png, meta, rows, cfg.limit)
    header = ('%s run, %s; kernel %s; %s × %d, %.0f GiB; cgroup %s; cinder %s; '
              'limit %d MiB/s; load %.2f→%.2f; %.0f s; CPU pressure (PSI some avg60, '
              '%% at phase start→end): %s'
              % (meta['mode'], meta['date'], meta['kernel'], meta['cpu'], meta['cpus'],
                 meta['memory_gib'], meta['cgroup_layout'], meta['cinder'],
                 cfg.limit >> 20, meta['loadavg_start'][0], meta['loadavg_end'][0],
                 meta['elapsed_seconds'],
                 ', '.join('%s %.0f→%.0f' % (k, v[0], v[-1]) for k, v in pressure.items())))
    with open(os.path.join(args.out, 'table.md'), 'w') as f:
        f.write(header + '\n\n' + text + '\n')
    print(header + '\n\n' + text)
    print('\nrows: %s; plot: %s; left behind at exit: %s'
          % (json_path, why_not or png, ', '.join(leftovers) or 'nothing'))
    return 1 if leftovers else 0


if __name__ == '__main__':
    try:
        sys.exit(main(sys.argv))
    except KeyboardInterrupt:
        sys.exit('bench: interrupted; scratch devices, mounts and cgroups were removed')
