"""The e2e suite's table of flows, printed whether the tests pass or fail."""
from __future__ import annotations

from typing import Any

MiB = 1 << 20


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from tests.e2e.test_flows import NOTES, RESULTS
    if not RESULTS and not NOTES:
        return
    rows = [('flow', 'copy', 'MiB', 'device', 'MiB/s (slope)', 'limit', 'ratio', 'dd clock',
             'stalled s (gaps)', 'sampler late s', 'steady')]
    rows += [(r['flow'], r['kind'], '%d' % (r['bytes'] // MiB), r['device'],
              '%.3f' % (r['rate'] / MiB), '%.0f' % (r['limit'] / MiB), '%.3f' % r['ratio'],
              '%.3f' % r['dd'] if r['dd'] else '-', '%.2f (%d)' % (r['stalled'], r['gaps']),
              '%.2f' % r['late'], '%.3f' % r['steady'])
             for r in RESULTS]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    terminalreporter.section("flows through Cinder's API (VM lane)")
    for row in rows:
        terminalreporter.line(' | '.join(c.ljust(w) for c, w in zip(row, widths)))
    for note in NOTES:
        terminalreporter.line(note)
