"""The fallback's plan for a command, its share of pv's credits, and dd's report parsing.

Oracles are written out by hand (argv, arithmetic) or produced by a real dd.
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import pytest

from cinder_cgroup_throttle import ddstats, pipeline
from tests.scratch import pipe_state

MiB = 1 << 20


def test_dd_becomes_the_copier_with_cinders_flags():
    plan = pipeline.plan(['ionice', '-c2', '-n7', 'dd', 'if=/dev/a', 'of=/dev/b',
                          'count=4096', 'bs=1M', 'iflag=count_bytes,direct',
                          'oflag=direct', 'conv=fdatasync'], 8 * MiB)
    assert plan.tool == 'dd' and plan.source == '/dev/a' and plan.byte_count == 4096
    assert plan.ionice == ['ionice', '-c2', '-n7']  # the wrapper's class: pv and copier
    assert (plan.dest, plan.block, plan.direct_in, plan.direct) == ('/dev/b', MiB, True, True)
    assert (plan.sparse, plan.fdatasync) == (False, True)
    plan = pipeline.plan(['dd', 'if=/a', 'of=/b', 'bs=64K', 'conv=sparse'], MiB)
    assert (plan.byte_count, plan.block, plan.direct_in, plan.direct, plan.sparse,
            plan.fdatasync) == (None, 65536, False, False, True, False)


@pytest.mark.parametrize('text, size', [('1M', MiB), ('4096', 4096), ('64KiB', 65536),
                                        ('1MB', 10**6), ('2b', 1024), ('4k', 4096)])
def test_dd_sizes_as_dd_reads_them(text, size):
    # The oracle: GNU dd itself, copying ``text`` bytes with bs=text count=1.
    out = subprocess.run(['dd', 'if=/dev/zero', 'of=/dev/null', 'bs=' + text, 'count=1'],
                         capture_output=True, text=True, env={'LC_ALL': 'C'}).stderr
    assert ddstats.report(out).bytes == size == pipeline.dd_size(text)


@pytest.mark.parametrize('text', ['', '0', '1X', '-1', '1.5M', '9' * 13])
def test_bad_dd_sizes_are_refused(text):
    with pytest.raises(pipeline.Refused, match='bs='):
        pipeline.dd_size(text)


def test_qemu_img_limits_itself():
    plan = pipeline.plan(['qemu-img', 'convert', '-O', 'raw', 'a', 'b'], 1000)
    assert plan.argv == ['qemu-img', 'convert', '-r', '1000', '-O', 'raw', 'a', 'b']


@pytest.mark.parametrize('command, why', [
    (['dd', 'if=/a', 'of=/b', 'count=4', 'bs=1M'], 'count_bytes'),
    (['dd', 'if=/a', 'of=/b', 'bs=1M', 'skip=1'], 'skip=1'),
    (['qemu-img', 'convert', '-r', '5', 'a', 'b'], 'rate limit'),
    (['cat', '/etc/shadow'], 'refusing'),
])
def test_other_shapes_are_refused(command, why):
    with pytest.raises(pipeline.Refused, match=why):
        pipeline.plan(command, 1000)


@pytest.mark.parametrize('total, rate, seconds, expected', [
    # 2 s left at 8 MiB/s: credits at 0, 0.1, ..., 2.0 s: 21 of 838860.8 bytes, less one.
    (64 * MiB, 8 * MiB, 2.0, (17616075, 21)),
    (64 * MiB, 8 * MiB, 2.05, (17616075, 21)),  # the grid: whole credits only
    (64 * MiB, 8 * MiB, -0.5, (838859, 1)),  # late: pv's first credit, at once
    (MiB, 8 * MiB, 2.0, (MiB, 2)),  # all through pv: the credits it needs
    (100, 5, 0.0, (100, 0)),  # one credit under a byte: no grid to plan on
])
def test_pv_share_fills_whole_credits(total, rate, seconds, expected):
    assert pipeline.pv_share(total, rate, seconds) == expected


def _dd(*operands: str) -> str:
    return subprocess.run(['dd'] + list(operands), capture_output=True, text=True,
                          env={'LC_ALL': 'C', 'PATH': '/usr/bin:/bin'}).stderr


@pytest.mark.parametrize('count, bs', [(3, '1'), (1, '1'), (0, '1'), (2, '1M')],
                         ids=['bytes', 'one-byte', 'nothing', 'MiB'])
def test_ddstats_reads_real_dd_reports(count, bs):
    bytes_ = count * (MiB if bs == '1M' else 1)
    report = ddstats.report(_dd('if=/dev/zero', 'of=/dev/null', 'count=%d' % count,
                                'bs=' + bs))
    assert report is not None and report.bytes == bytes_ and report.seconds >= 0


def test_ddstats_without_a_report_is_none():
    assert ddstats.report(_dd('if=/nonexistent', 'of=/dev/null')) is None


def test_a_rate_request_to_a_copy_that_ends_meanwhile_is_not_an_error(tmp_path):
    """set-limit racing a copy's end (the new rate lets it finish at once): nothing is
    left to apply, so no error; a copy that runs on without applying it is one."""
    state_dir = tmp_path / 'state'
    state_dir.mkdir(mode=0o700)
    copy_id = 'copy-%d-0000abcd' % os.getpid()
    state = state_dir / (copy_id + '.pipe.json')
    state.write_text(json.dumps(pipe_state(copy_id, os.getpid(), time.time())))
    ending = threading.Timer(0.3, state.unlink)
    ending.start()
    try:
        assert pipeline.request_rate(str(state_dir), copy_id, 4 * MiB) is None
    finally:
        ending.join()
    state.write_text(json.dumps(pipe_state(copy_id, os.getpid(), time.time())))
    with pytest.raises(RuntimeError, match='did not apply rate 4194304 within 1 s'):
        pipeline.request_rate(str(state_dir), copy_id, 4 * MiB, timeout=1.0)
