"""The re-balance lock under eventlet, as cinder-volume runs (cinder.monkey_patch first).

The defect it guards against: a greenthread holding the lock waits on a green subprocess
(the root helper); a second greenthread asking for the lock must yield, not block the OS
thread (a blocking flock froze the whole service for good). Runs in a fresh interpreter,
since monkey-patching cannot be undone in this one.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import json, sys, time
    from cinder import monkey_patch
    monkey_patch.patch()
    import subprocess
    import eventlet
    from cinder_cgroup_throttle import relimit
    from cinder_cgroup_throttle.registry import Registry
    registry = Registry(sys.argv[1])
    order, ticks, done = [], [time.monotonic()], []

    def holder(name, seconds):
        with relimit.locked(registry):
            order.append(name + ' in')
            subprocess.run(['sleep', str(seconds)], check=True)  # green: yields
            order.append(name + ' out')

    def ticker():
        while not done:
            eventlet.sleep(0.05)
            ticks.append(time.monotonic())

    t = eventlet.spawn(ticker)
    first = eventlet.spawn(holder, 'first', 1.0)
    eventlet.sleep(0.2)
    others = [eventlet.spawn(holder, name, 0.1) for name in ('second', 'third')]
    for g in [first] + others:
        g.wait()
    done.append(1)
    t.wait()
    print(json.dumps({'order': order,
                      'max_gap': max(b - a for a, b in zip(ticks, ticks[1:]))}))
''')


def test_lock_yields_and_is_fair_under_eventlet(tmp_path):
    proc = subprocess.run([sys.executable, '-c', SCRIPT, str(tmp_path / 'state')],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result['order'] == ['first in', 'first out', 'second in', 'second out',
                               'third in', 'third out'], result
    assert result['max_gap'] <= 0.5, result
