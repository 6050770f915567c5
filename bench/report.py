"""Turn result rows into the markdown table, the JSON file and the throughput plot."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

MiB = 1 << 20
RATIO_TARGET = (0.97, 1.02)
OVERHEAD_TARGET_MS = 5.0
CPU_TARGET = 1.5
FALLBACK_CPU_TARGET = 3.0  # issue 12: the pv fallback, CPU per GiB vs bare dd

Row = Dict[str, Any]


def _find(rows: List[Row], case: str, throttle: str) -> Optional[Row]:
    for row in rows:
        if row['case'] == case and row['throttle'] == throttle:
            return row
    return None


def _ratio_cell(row: Optional[Row]) -> str:
    if row is None:
        return ''
    if row.get('error'):
        return 'failed: ' + row['error'][:60]
    text = '%.3f' % row['ratio']
    ratios = row.get('ratios') or []
    if 'ratio_min' in row:
        text += ' (min %.3f)' % row['ratio_min']
    elif len(ratios) > 1:
        text += ' (%.3f–%.3f)' % (min(ratios), max(ratios))
    if row.get('start_skew_seconds'):
        text += '; starts spread over %.2f s; sum of per-copy rates %.3f' % (
            max(row['start_skew_seconds']), row['sum_of_copy_rates_ratio'])
    if row.get('backend') and row['backend'] != 'cgroup':
        text += ' [%s]' % row['backend']
    return text


def _mark(ok: bool) -> str:
    return 'met' if ok else '**missed**'


def _left(row: Optional[Row]) -> str:
    if row is None or not row.get('left_behind'):
        return ''
    left = {k: v for k, v in row['left_behind'].items() if v}
    return 'nothing' if not left else '; '.join(
        '%d %s' % (len(v), k) for k, v in sorted(left.items()))


def _overhead_cell(row: Optional[Row]) -> str:
    if row is None or 'overhead_ms_median' not in row:
        return ''
    text = '%.2f / %.2f ms' % (row['overhead_ms_median'], row['overhead_ms_p95'])
    if 'first8_overhead_ms' in row:
        text += ' (first 8: %.2f, last 8: %.2f)' % (row['first8_overhead_ms'],
                                                    row['last8_overhead_ms'])
    if 'wall_seconds' in row:
        text += ', all done in %.1f s' % row['wall_seconds']
    return text + '; left: ' + _left(row)


def table(rows: List[Row]) -> str:
    out = ['| case | ours | Cinder BlkioCgroup | target (ours) |', '|---|---|---|---|']
    seen: List[str] = []
    for row in rows:
        if row['case'] not in seen and not row['case'].startswith(('left behind', 'CPU')) \
                and 'summary' not in row and 'fallback' not in row:
            seen.append(row['case'])
    for case in seen:
        ours, cinder = _find(rows, case, 'ours'), _find(rows, case, 'cinder')
        target = ''
        if ours is not None and ours.get('ratio') is not None:
            lo, hi = RATIO_TARGET
            target = ('%.2f–%.2f: %s' % (lo, hi, _mark(lo <= ours['ratio'] <= hi))
                      if ours.get('ratio_target', True) else
                      'n/a: 1 MiB copies, process start-up and the first throttle slice '
                      'dominate')
        out.append('| %s | %s | %s | %s |' % (case, _ratio_cell(ours), _ratio_cell(cinder),
                                              target))
        if ours is not None and 'left_behind' in ours:
            cells = [_overhead_cell(row) for row in (ours, cinder)]
            target = ('median ≤ %.0f ms: %s' % (
                OVERHEAD_TARGET_MS, _mark(ours['overhead_ms_median'] <= OVERHEAD_TARGET_MS))
                if ours.get('overhead_target') else 'informative: includes waiting for '
                'CPU and the GIL among all copies')
            out.append('| ↳ setup+teardown median / p95 | %s | %s | %s |'
                       % (cells[0], cells[1], target))
        nonroot = _find(rows, case, 'ours-privsep')
        if nonroot is not None and 'overhead_ms_median' in nonroot:
            out.append('| ↳ non-root path: every cgroup step in the privsep daemon (started '
                       'once, in %.0f ms) | %s | | median ≤ %.0f ms: %s |' % (
                           nonroot.get('privsep_start_ms', float('nan')),
                           _overhead_cell(nonroot), OVERHEAD_TARGET_MS,
                           _mark(nonroot['overhead_ms_median'] <= OVERHEAD_TARGET_MS)))
    bare = _find(rows, 'CPU per GiB: bare dd (no throttle)', 'none')
    for case in ('CPU per GiB: cgroup backend', 'CPU per GiB: pv fallback',
                 'CPU per GiB: bare dd (no throttle)'):
        row = _find(rows, case, 'none' if 'bare' in case else 'ours')
        if row is None:
            continue
        if row.get('error'):
            out.append('| %s | failed: %s | | |' % (case, row['error'][:60]))
            continue
        cell = '%.3f s/GiB (per byte %.3f, fixed %.3f s/copy)' % (
            row['cpu_s_per_gib'], row['cpu_s_per_gib_marginal'], row['cpu_s_fixed'])
        target = ''
        if bare is not None and row is not bare and not bare.get('error'):
            factor = row['cpu_s_per_gib'] / bare['cpu_s_per_gib']
            target = '%.1f× bare dd' % factor
            if 'pv' in case:
                target += ' (≤ %.1f×: %s)' % (CPU_TARGET, _mark(factor <= CPU_TARGET))
        out.append('| %s | %s | | %s |' % (case, cell, target))
    for row in rows:  # the shared copy budget (bench/budget.py)
        if 'summary' in row:
            out.append('| %s | %s | | re-balance within 2 s: %s |' % (
                row['case'], row['summary'], _mark(row['rebalance_start_p99_s'] <= 2
                                                   and row['rebalance_end_p99_s'] <= 2)))
    left_cases: List[str] = []
    for row in rows:
        if row['case'].startswith('left behind') and row['case'] not in left_cases:
            left_cases.append(row['case'])
    for case in left_cases:
        ours, cinder = _find(rows, case, 'ours'), _find(rows, case, 'cinder')
        out.append('| %s | %s | %s | nothing: %s |' % (
            case, _left(ours), _left(cinder),
            _mark(ours is not None and _left(ours) == 'nothing')))
    text = '\n'.join(out)
    return text + ('\n\n' + fallback_table(rows) if any('fallback' in r for r in rows)
                   else '')


def fallback_table(rows: List[Row]) -> str:
    """The fallback phase: this wrapper, the previous one, bare dd unpaced and paced to the
    same rate (bench/fallback.py)."""
    names = ('ours', 'previous', 'none', 'paced')
    out = ['| pv fallback | this wrapper | previous wrapper | bare dd | dd paced by a cgroup '
           '| target (this) |', '|---|---|---|---|---|---|']
    cases: List[str] = []
    for row in rows:
        if 'fallback' in row and row['case'] not in cases:
            cases.append(row['case'])
    for case in cases:
        cells, target = [], ''
        for name in names:
            row = _find(rows, case, name)
            if row is None:
                cells.append('')
            elif row.get('error'):
                cells.append('failed: ' + row['error'][:60])
            elif 'cpu_s_fixed' in row:
                cells.append('%.3f s/GiB + %.3f s' % (row['cpu_s_per_gib'], row['cpu_s_fixed']))
            elif 'cpu_s_per_gib' in row:
                cells.append('%.3f s/GiB' % row['cpu_s_per_gib'])
            else:
                cells.append(_ratio_cell(row))
        ours, bare = _find(rows, case, 'ours'), _find(rows, case, 'none')
        if ours is not None and ours.get('ratio') is not None:
            lo, hi = 0.98, 1.02
            target = '%.2f–%.2f: %s' % (lo, hi, _mark(lo <= ours['ratio'] <= hi))
        elif ours is not None and bare is not None and 'cpu_s_per_gib' in ours \
                and 'cpu_s_per_gib' in bare:
            factors = ['%s %.1f×' % (label, _find(rows, case, name)['cpu_s_per_gib']
                                     / bare['cpu_s_per_gib'])
                       for label, name in (('this', 'ours'), ('previous', 'previous'))
                       if 'cpu_s_per_gib' in (_find(rows, case, name) or {})]
            target = '%s bare dd' % ', '.join(factors)
            paced = _find(rows, case, 'paced') or {}
            if 'cpu_s_per_gib' in paced:
                target += '; this %.1f× dd paced to the rate' % (
                    ours['cpu_s_per_gib'] / paced['cpu_s_per_gib'])
            target += ' (this ≤ %.0f× bare dd: %s)' % (FALLBACK_CPU_TARGET, _mark(
                ours['cpu_s_per_gib'] <= FALLBACK_CPU_TARGET * bare['cpu_s_per_gib']))
        out.append('| %s | %s | %s |' % (case, ' | '.join(cells), target))
    return '\n'.join(out)


def write_json(path: str, meta: Dict[str, Any], rows: List[Row]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
        json.dump({'meta': meta, 'rows': rows}, f, indent=1, ensure_ascii=False)
        f.write('\n')


def plot(path: str, meta: Dict[str, Any], rows: List[Row], limit: int) -> Optional[str]:
    """Per-second throughput of one copy per throttle; returns why not when impossible."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return 'matplotlib is not installed (pip install matplotlib)'
    series = [r for r in rows if r['case'].startswith('timeline: ') and r.get('per_second_bps')]
    if not series:
        return 'no timeline rows'
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    for row in series:
        ax.stairs([b / MiB for b in row['per_second_bps']], row['per_second_edges'],
                  baseline=None, linewidth=2,
                  label='%s (%.3f of limit)' % (row['case'][len('timeline: '):], row['ratio']))
    ax.axhline(limit / MiB, color='grey', linestyle='--', linewidth=1,
               label='limit %.0f MiB/s' % (limit / MiB))
    ax.set_xlabel('seconds since dd started (1 s bins, the last up to 1.5 s)')
    ax.set_ylabel('MiB/s written to the destination')
    ax.set_ylim(bottom=0)
    ax.set_title('One %d MiB block→block copy, dd bs=1M (as Cinder runs it)\n%s, kernel %s'
                 % (series[0]['bytes'] // MiB, meta['date'], meta['kernel']), fontsize=9)
    ax.legend(fontsize=8, loc='lower right')
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return None
