"""Phase ``fallback``: the pv fallback's wrapper against the one it replaced, and bare dd.

* accuracy: tmpfs file -> tmpfs file (no block device: the fallback's real case) for
  copies of 2, 4 and 10 s at the limit (``--quick``: 2 s); ratio = bytes / wall time from
  the copy command's spawn to its exit, so the wrapper's start-up counts against it;
* CPU: loop -> loop at 64 MiB/s, 256 MiB and 1 GiB (the smallest Cinder volume;
  ``--quick``: 16 and 64 MiB), bare dd unpaced and paced to the rate by a cgroup, this
  wrapper and the previous one interleaved, so that load from other work hits all alike;
  per size, and per byte and per copy from the two sizes.

The previous wrapper is ``cinder_cgroup_throttle/pipeline.py`` at :data:`PREVIOUS` (reader
dd | pv | writer dd, paced from pv's start), taken from git and run as a script with the
same arguments; without git history that contender is reported as failed, the rest runs.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import statistics
import subprocess
import sys
from typing import Any, Dict, Iterator, List, Tuple

from copyrun import MiB, CopyResult, run_copy

from tests.scratch import Scratch, fill_random, sha256_prefix

PREVIOUS = '5d23d3d'  # the last commit with the reader-dd pipeline
ACCURACY_SECONDS = (2.0, 4.0, 10.0)
Row = Dict[str, Any]


class PreviousWrapper:
    """A Cinder throttle whose prefix is the previous wrapper, run from a copy of its
    source; no registry entry (the wrapper needs none), a fresh copy id per copy."""

    _ids = itertools.count()

    def __init__(self, script: str, rate: int, state_dir: str) -> None:
        self.script, self.rate, self.state_dir = script, rate, state_dir

    @contextlib.contextmanager
    def subcommand(self, srcpath: str, dstpath: str) -> Iterator[Dict[str, Any]]:
        copy_id = 'copy-%d-%08x' % (os.getpid(), next(self._ids))
        yield {'prefix': [sys.executable, self.script, '--id', copy_id, '--rate',
                          str(self.rate), '--state-dir', self.state_dir, '--']}


def _previous_script(directory: str) -> str:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = subprocess.run(['git', '-C', repo, 'show',
                             PREVIOUS + ':cinder_cgroup_throttle/pipeline.py'],
                            check=True, capture_output=True, text=True).stdout
    path = os.path.join(directory, 'previous_pipeline.py')
    with open(path, 'w') as f:
        f.write(source)
    return path


def _copy(name: str, throttle: Any, src: str, dst: str, size_mib: int,
          digest: str) -> CopyResult:
    result = run_copy(name, throttle, src, dst, size_mib, '1M')
    if sha256_prefix(dst, size_mib * MiB) != digest:
        raise RuntimeError('%s: %s -> %s copied wrong data' % (name, src, dst))
    return result


def _contenders(cfg: Any, con: Any, scratch: Scratch, rate: int) -> List[Tuple[str, Any]]:
    out: List[Tuple[str, Any]] = [('ours', con.ours('pv', rate))]
    try:
        script = _previous_script(scratch.dir)
    except (OSError, subprocess.CalledProcessError) as exc:
        out.append(('previous', exc))
    else:
        os.makedirs(con.state_dir, exist_ok=True)
        out.append(('previous', PreviousWrapper(script, rate, con.state_dir)))
    return out


def _run_all(contenders: List[Tuple[str, Any]], reps: int, copy: Any
             ) -> Tuple[Dict[str, List[CopyResult]], Dict[str, BaseException]]:
    """``reps`` rounds of every contender, the order alternating each round."""
    results: Dict[str, List[CopyResult]] = {name: [] for name, _ in contenders}
    errors: Dict[str, BaseException] = {name: t for name, t in contenders
                                        if isinstance(t, BaseException)}
    for rep in range(reps):
        for name, throttle in (contenders if rep % 2 == 0 else contenders[::-1]):
            if name in errors:
                continue
            try:
                results[name].append(copy(name, throttle))
            except Exception as exc:  # reported as a row; the others still run
                errors[name] = exc
    return results, errors


def phase(cfg: Any, scratch: Scratch, con: Any) -> List[Row]:
    from cases import error_row, log
    rows: List[Row] = []
    seconds = ACCURACY_SECONDS[:1] if cfg.quick else ACCURACY_SECONDS
    biggest = int(cfg.limit * max(seconds)) // MiB
    tmp = scratch.tmpfs(2 * biggest + 16)
    src, dst = os.path.join(tmp, 'src.raw'), os.path.join(tmp, 'dst.raw')
    digest_of = {}
    fill_random(src, biggest * MiB)
    contenders = _contenders(cfg, con, scratch, cfg.limit)
    for secs in seconds:
        size = int(cfg.limit * secs) // MiB
        digest_of[size] = sha256_prefix(src, size * MiB)
        case = 'fallback: tmpfs file→tmpfs file, %g s copies' % secs
        results, errors = _run_all(contenders, cfg.reps, lambda name, t: _copy(
            name, t, src, _fresh(dst), size, digest_of[size]))
        for name, _ in contenders:
            if name in errors:
                rows.append(dict(error_row(case, name, errors[name]), fallback=True))
                continue
            ratios = [r.bps / cfg.limit for r in results[name]]
            rows.append({'case': case, 'throttle': name, 'fallback': True,
                         'backend': results[name][0].backend,
                         'ratio': statistics.median(ratios), 'ratios': ratios,
                         'limit_bps': cfg.limit, 'bytes': size * MiB,
                         'dd_seconds': [r.dd_s for r in results[name]]})
            log('%-44s %-8s ratio %.4f (%s)' % (case, name, rows[-1]['ratio'], ' '.join(
                '%.4f' % r for r in ratios)))
    rows += _cpu(cfg, scratch, con)
    return rows


def _fresh(path: str) -> str:
    """Cinder stats the destination: an empty file, the previous copy's removed."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    open(path, 'wb').close()
    return path


def _cpu(cfg: Any, scratch: Scratch, con: Any) -> List[Row]:
    """CPU (user + system of the copy command and all it waited for) per GiB, two sizes:
    the slope is the per-byte cost, the intercept the fixed cost per copy. Beside bare
    dd, unpaced (``none``) and paced to the same rate by the kernel (``paced``: our cgroup
    backend, which adds nothing to dd but its leaf), since pacing alone costs CPU."""
    from cases import error_row, log
    small, big = cfg.cpu_sizes_mib
    src, dst = scratch.loop(big + 8), scratch.loop(big + 8)
    digest = fill_random(src, big * MiB)
    digests = {big: digest, small: sha256_prefix(src, small * MiB)}
    contenders = [('none', con.none()), ('paced', con.ours('cgroup', cfg.cpu_limit))] \
        + _contenders(cfg, con, scratch, cfg.cpu_limit)
    rows, medians = [], {}
    for size in (small, big):
        results, errors = _run_all(contenders, cfg.reps, lambda name, t: _copy(
            name, t, src, dst, size, digests[size]))
        for name, _ in contenders:
            case = 'fallback CPU, %d MiB at %d MiB/s' % (size, cfg.cpu_limit // MiB)
            if name in errors:
                rows.append(dict(error_row(case, name, errors[name]), fallback=True))
                continue
            cpu = [r.cpu_s for r in results[name]]
            medians[name, size] = statistics.median(cpu)
            rows.append({'case': case, 'throttle': name, 'fallback': True, 'ratio': None,
                         'bytes': size * MiB, 'cpu_seconds': cpu,
                         'cpu_s_per_gib': medians[name, size] / (size / 1024),
                         'rate_ratio': (statistics.median(r.bps for r in results[name])
                                        / cfg.cpu_limit if name != 'none' else None)})
            log('%-36s %-8s %.3f s/GiB' % (case, name, rows[-1]['cpu_s_per_gib']))
    case = 'fallback CPU per byte (%d→%d MiB), fixed per copy' % (small, big)
    for name, _ in contenders:
        if (name, small) in medians and (name, big) in medians:
            slope = (medians[name, big] - medians[name, small]) / ((big - small) / 1024)
            rows.append({'case': case, 'throttle': name, 'fallback': True, 'ratio': None,
                         'cpu_s_per_gib': slope,
                         'cpu_s_fixed': medians[name, small] - slope * small / 1024})
            log('%-36s %-8s %.3f s/GiB + %.3f s' % (case, name, slope,
                                                    rows[-1]['cpu_s_fixed']))
    return rows
