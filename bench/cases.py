"""The benchmark's phases. Each takes fresh scratch devices and returns result rows.

Ratios are achieved / intended rate, where achieved = bytes / wall time of the dd process
and "intended" is what the throttle promises: ours gives every copy the limit; Cinder's
BlkioCgroup shares one limit among all concurrent copies, so N copies each intend limit/N.
Ours and Cinder's copies alternate on the same devices so that noise from other work on
the machine hits both alike.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List

import budget
import fallback
from copyrun import MiB, CopyResult, DeviceSampler, run_concurrently, run_copy

from tests.scratch import Scratch, fill_random, sha256_prefix

Row = Dict[str, Any]


@dataclasses.dataclass
class Config:
    quick: bool
    limit: int = 8 * MiB
    seconds: float = 4.0  # nominal duration of one copy at the limit
    reps: int = 3
    concurrency: tuple = (3, 16)
    scale: int = 64
    at_once: int = 64
    # Cinder's setup is quadratic in concurrent copies: every start and end re-writes
    # the limit of every active device with one cgset each, under one lock (64 at once
    # took 441 s at load 9 on 2 CPUs), so its at-once case is smaller unless asked.
    cinder_at_once: int = 16
    cpu_limit: int = 64 * MiB
    cpu_sizes_mib: tuple = (256, 1024)  # 1 GiB: the smallest Cinder volume
    plot_seconds: float = 10.0

    @classmethod
    def make(cls, quick: bool) -> 'Config':
        if quick:
            return cls(True, seconds=2.0, reps=1, concurrency=(3,), scale=64, at_once=16,
                       cpu_sizes_mib=(16, 64), plot_seconds=5.0)
        return cls(False)

    @property
    def size_mib(self) -> int:
        return int(self.limit * self.seconds // MiB)


def log(msg: str) -> None:
    print('bench: ' + msg, file=sys.stderr, flush=True)


def pct(values: List[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))]


def overhead_fields(results: List[CopyResult]) -> Row:
    ms = [r.overhead_s * 1000 for r in results]
    return {'setup_ms_median': statistics.median(r.setup_s * 1000 for r in results),
            'teardown_ms_median': statistics.median(r.teardown_s * 1000 for r in results),
            'overhead_ms_median': statistics.median(ms), 'overhead_ms_p95': pct(ms, 95)}


def ratio_row(case: str, throttle: str, results: List[CopyResult], intended: float,
              **extra: Any) -> Row:
    ratios = [r.bps / intended for r in results]
    row = {'case': case, 'throttle': throttle, 'ratio_target': True,
           'backend': '+'.join(sorted({r.backend for r in results})),
           'ratio': statistics.median(ratios), 'ratios': ratios,
           'achieved_bps': statistics.median(r.bps for r in results),
           'limit_bps': intended, 'bytes': results[0].nbytes, 'bs': results[0].bs,
           'dd_seconds': [r.dd_s for r in results],
           'cpu_seconds': [r.cpu_s for r in results]}
    row.update(overhead_fields(results))
    row.update(extra)
    return row


def error_row(case: str, throttle: str, exc: BaseException) -> Row:
    log('%s / %s FAILED: %s' % (case, throttle, exc))
    return {'case': case, 'throttle': throttle, 'ratio': None,
            'error': '%s: %s' % (type(exc).__name__, exc)}


class FreshFile:
    """A new, empty destination file per copy (Cinder stats the destination, so it must
    exist), removing the previous one so the filesystem does not fill up."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.n = 0

    def __call__(self) -> str:
        old = os.path.join(self.directory, 'dst-%d.raw' % self.n)
        if os.path.exists(old):
            os.unlink(old)
        self.n += 1
        path = os.path.join(self.directory, 'dst-%d.raw' % self.n)
        open(path, 'wb').close()
        return path


def _checked(name: str, throttle: Any, src: str, dst: str, size_mib: int, bs: str,
             digest: str) -> CopyResult:
    result = run_copy(name, throttle, src, dst, size_mib, bs)
    if sha256_prefix(dst, size_mib * MiB) != digest:
        raise RuntimeError('%s: %s -> %s copied wrong data' % (name, src, dst))
    return result


# -- phase: one copy at a time ---------------------------------------------------------
def accuracy(cfg: Config, scratch: Scratch, con: Any) -> List[Row]:
    size = cfg.size_mib
    src, dst = scratch.loop(size + 8), scratch.loop(size + 8)
    digest = fill_random(src, size * MiB)
    _disk, (p1, p2) = scratch.partitioned_loop(2 * size + 24, (size + 8, size + 8))
    pdigest = fill_random(p1, size * MiB)
    ext4 = scratch.mkfs_mount(scratch.loop(size + 64), 'ext4')
    tmp = scratch.tmpfs(2 * size + 16)
    tsrc = os.path.join(tmp, 'src.raw')
    tdigest = fill_random(tsrc, size * MiB)
    cases = [('block→block bs=%s' % bs, src, (lambda: dst), bs, digest)
             for bs in ('64K', '1M', '4M')]
    cases += [('partition→partition (same disk) bs=1M', p1, (lambda: p2), '1M', pdigest),
              ('block→ext4 file bs=1M', src, FreshFile(ext4), '1M', digest),
              ('tmpfs file→tmpfs file bs=1M', tsrc, FreshFile(tmp), '1M', tdigest)]
    throttles = {'ours': con.ours(), 'cinder': con.cinder()}
    rows = []
    for case, csrc, cdst, bs, cdigest in cases:
        results: Dict[str, List[CopyResult]] = {'ours': [], 'cinder': []}
        errors: Dict[str, BaseException] = {}
        for rep in range(cfg.reps):
            order = ['ours', 'cinder'] if rep % 2 == 0 else ['cinder', 'ours']
            for name in order:
                if name in errors:
                    continue
                try:
                    results[name].append(_checked(name, throttles[name], csrc, cdst(),
                                                  size, bs, cdigest))
                except Exception as exc:  # reported as a row; the other cases still run
                    errors[name] = exc
        for name in ('ours', 'cinder'):
            if name in errors:
                rows.append(error_row(case, name, errors[name]))
            else:
                rows.append(ratio_row(case, name, results[name], cfg.limit))
                log('%-40s %-6s %s ratio %.3f'
                    % (case, name, rows[-1]['backend'], rows[-1]['ratio']))
    rows += _left_rows('single copies', con, throttles)
    return rows


def _left_rows(case: str, con: Any, throttles: Dict[str, Any]) -> List[Row]:
    rows = []
    for name, throttle in throttles.items():
        left = con.left_behind(throttle)
        rows.append({'case': 'left behind after ' + case, 'throttle': name, 'ratio': None,
                     'left_behind': left})
        con.retire(throttle)
    return rows


# -- phase: N copies at once -----------------------------------------------------------
def concurrent(cfg: Config, scratch: Scratch, con: Any) -> List[Row]:
    rows = []
    for n in cfg.concurrency:
        size = cfg.size_mib
        # Cinder's copies each intend limit/N: size them for the same nominal duration.
        sizes = {'ours': size, 'cinder': max(1, int(cfg.limit / n * cfg.seconds // MiB))}
        pairs = [(scratch.loop(size + 4), scratch.loop(size + 4)) for _ in range(n)]
        for s, _ in pairs:
            fill_random(s, size * MiB)
        digests = {name: [sha256_prefix(s, sz * MiB) for s, _ in pairs]
                   for name, sz in sizes.items()}
        throttles = {'ours': con.ours(), 'cinder': con.cinder()}
        per: Dict[str, List[CopyResult]] = {'ours': [], 'cinder': []}
        spans: Dict[str, List[float]] = {'ours': [], 'cinder': []}
        skews: Dict[str, List[float]] = {'ours': [], 'cinder': []}
        for rep in range(max(1, cfg.reps - 1)):
            for name in (['ours', 'cinder'] if rep % 2 == 0 else ['cinder', 'ours']):
                jobs = [_job(name, throttles[name], s, d, sizes[name], digests[name][i])
                        for i, (s, d) in enumerate(pairs)]
                results = run_concurrently(jobs)
                per[name] += results
                span = max(r.end for r in results) - min(r.start for r in results)
                spans[name].append(sum(r.nbytes for r in results) / span)
                skews[name].append(max(r.start for r in results)
                                   - min(r.start for r in results))
        for name in ('ours', 'cinder'):
            intended = cfg.limit if name == 'ours' else cfg.limit / n
            rows.append(ratio_row('%d concurrent block→block, per copy' % n, name, per[name],
                                  intended, ratio_min=min(r.bps / intended for r in per[name]),
                                  ratio_max=max(r.bps / intended for r in per[name])))
            agg_intended = cfg.limit * n if name == 'ours' else cfg.limit
            ratios = [b / agg_intended for b in spans[name]]
            rows.append({'case': '%d concurrent block→block, aggregate' % n, 'throttle': name,
                         'backend': rows[-1]['backend'], 'ratio': statistics.median(ratios),
                         'ratios': ratios, 'achieved_bps': statistics.median(spans[name]),
                         'limit_bps': agg_intended, 'bytes': sizes[name] * MiB * n,
                         'sum_of_copy_rates_ratio': (sum(r.bps for r in per[name])
                                                     / len(per[name]) * n / agg_intended),
                         'start_skew_seconds': skews[name]})
            log('%d concurrent %-6s per copy %.3f (min %.3f) aggregate %.3f'
                % (n, name, rows[-2]['ratio'], rows[-2]['ratio_min'], rows[-1]['ratio']))
        rows += _left_rows('%d concurrent' % n, con, throttles)
    return rows


def _job(name: str, throttle: Any, src: str, dst: str, size_mib: int,
         digest: str) -> Callable[[], CopyResult]:
    return lambda: _checked(name, throttle, src, dst, size_mib, '1M', digest)


# -- phase: 64 small copies in a row and at once ---------------------------------------
def scale(cfg: Config, scratch: Scratch, con: Any) -> List[Row]:
    n = cfg.scale
    src, dst = scratch.loop(8), scratch.loop(8)
    digest = fill_random(src, MiB)
    rows = []
    throttles = {'ours': con.ours(), 'ours-privsep': con.ours_privsep(),
                 'cinder': con.cinder()}
    for name, throttle in throttles.items():
        results = [_checked(name, throttle, src, dst, 1, '1M', digest) for _ in range(n)]
        first = statistics.median(r.overhead_s * 1000 for r in results[:8])
        last = statistics.median(r.overhead_s * 1000 for r in results[-8:])
        left = con.left_behind(throttle)
        extra = ({'privsep_start_ms': con.privsep_start_s * 1000}
                 if name == 'ours-privsep' else {})
        rows.append(ratio_row('%d copies of 1 MiB in a row' % n, name, results, cfg.limit,
                              first8_overhead_ms=first, last8_overhead_ms=last,
                              left_behind=left, ratio_target=False, overhead_target=True,
                              **extra))
        log('%d in a row %-6s overhead median %.2f ms p95 %.2f ms first8 %.2f last8 %.2f '
            'left %s' % (n, name, rows[-1]['overhead_ms_median'], rows[-1]['overhead_ms_p95'],
                         first, last, left))
        con.retire(throttle)
    srcs = [scratch.loop(4) for _ in range(8)]
    digests = [fill_random(s, MiB) for s in srcs]
    dsts = [scratch.loop(4) for _ in range(max(cfg.at_once, cfg.cinder_at_once))]
    throttles = {'ours': con.ours(), 'cinder': con.cinder()}
    for name, throttle in throttles.items():
        n = cfg.at_once if name == 'ours' else cfg.cinder_at_once
        t0 = time.monotonic()
        results = run_concurrently([_job(name, throttle, srcs[i % 8], d, 1, digests[i % 8])
                                    for i, d in enumerate(dsts[:n])])
        wall = time.monotonic() - t0
        left = con.left_behind(throttle)
        intended = cfg.limit if name == 'ours' else cfg.limit / n
        case = ('copies of 1 MiB at once (ours %d, Cinder %d), per copy'
                % (cfg.at_once, cfg.cinder_at_once))
        rows.append(ratio_row(case, name, results, intended, copies=n, wall_seconds=wall,
                              left_behind=left, ratio_target=False, overhead_target=False))
        log('%d at once %-6s ratio %.3f overhead median %.2f ms p95 %.2f ms wall %.1f s '
            'left %s' % (n, name, rows[-1]['ratio'], rows[-1]['overhead_ms_median'],
                         rows[-1]['overhead_ms_p95'], wall, left))
        con.retire(throttle)
    return rows


# -- phase: CPU per GiB ----------------------------------------------------------------
def cpu(cfg: Config, scratch: Scratch, con: Any) -> List[Row]:
    """CPU of the copy's processes (user + system, children included) per GiB copied.

    Two sizes give the per-byte cost (slope) and the fixed cost per copy (intercept,
    e.g. the fallback's Python start-up); the headline is the large copy's CPU / GiB.
    """
    small, big = cfg.cpu_sizes_mib
    src, dst = scratch.loop(big + 8), scratch.loop(big + 8)
    digest = fill_random(src, big * MiB)
    sdigest = sha256_prefix(src, small * MiB)
    contenders = [('CPU per GiB: cgroup backend', 'ours', con.ours('cgroup', cfg.cpu_limit)),
                  ('CPU per GiB: pv fallback', 'ours', con.ours('pv', cfg.cpu_limit)),
                  ('CPU per GiB: bare dd (no throttle)', 'none', con.none())]
    rows = []
    for case, name, throttle in contenders:
        try:
            smalls, bigs = [], []
            for _ in range(cfg.reps):
                smalls.append(_checked(name, throttle, src, dst, small, '1M', sdigest))
                bigs.append(_checked(name, throttle, src, dst, big, '1M', digest))
        except Exception as exc:
            rows.append(error_row(case, name, exc))
            continue
        cpu_small = statistics.median(r.cpu_s for r in smalls)
        cpu_big = statistics.median(r.cpu_s for r in bigs)
        per_gib_marginal = (cpu_big - cpu_small) / ((big - small) / 1024)
        fixed = cpu_small - per_gib_marginal * small / 1024
        intended = cfg.cpu_limit if name == 'ours' else None
        rows.append({'case': case, 'throttle': name, 'backend': bigs[0].backend,
                     'ratio': (statistics.median(r.bps for r in bigs) / intended
                               if intended else None),
                     'limit_bps': intended, 'bytes': big * MiB,
                     'cpu_s_per_gib': cpu_big / (big / 1024),
                     'cpu_s_per_gib_marginal': per_gib_marginal, 'cpu_s_fixed': fixed,
                     'cpu_seconds_big': [r.cpu_s for r in bigs],
                     'cpu_seconds_small': [r.cpu_s for r in smalls],
                     'small_bytes': small * MiB})
        log('%-36s %.3f s/GiB (marginal %.3f, fixed %.3f s)'
            % (case, rows[-1]['cpu_s_per_gib'], per_gib_marginal, fixed))
    return rows


# -- phase: throughput over time ---------------------------------------------------------
def timeline(cfg: Config, scratch: Scratch, con: Any) -> List[Row]:
    size = int(cfg.limit * cfg.plot_seconds // MiB)
    src, dst = scratch.loop(size + 8), scratch.loop(size + 8)
    digest = fill_random(src, size * MiB)
    rows = []
    for label, name, make in (('ours, cgroup backend', 'ours', lambda: con.ours('cgroup')),
                              ('ours, pv fallback', 'ours', lambda: con.ours('pv')),
                              ('Cinder BlkioCgroup', 'cinder', con.cinder)):
        throttle = make()
        try:
            with DeviceSampler(dst) as sampler:
                result = _checked(name, throttle, src, dst, size, '1M', digest)
        except Exception as exc:
            rows.append(error_row('timeline: ' + label, name, exc))
            continue
        finally:
            con.retire(throttle)
        rates, edges = sampler.per_second(result.start, result.end)
        rows.append(ratio_row('timeline: ' + label, name, [result], cfg.limit,
                              per_second_bps=rates, per_second_edges=edges))
    return rows


PHASES: Dict[str, Callable[[Config, Scratch, Any], List[Row]]] = {
    'accuracy': accuracy, 'concurrent': concurrent, 'scale': scale, 'cpu': cpu,
    'timeline': timeline, 'budget': budget.phase, 'fallback': fallback.phase}
