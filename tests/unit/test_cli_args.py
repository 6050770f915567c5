"""CLI argument handling: a bad argument gets one error line and the usage, never a
traceback, and a documented exit status. Needs no root: nothing gets as far as the kernel.
"""
from __future__ import annotations

import os
import subprocess

import pytest

from cinder_cgroup_throttle.cgroups import detect
from tests.kernel.test_cli import PROG, cli_argv


@pytest.mark.parametrize('args, code, message', [
    ([], 2, 'the following arguments are required: COMMAND'),
    (['frobnicate'], 2, "invalid choice: 'frobnicate'"),
    (['copy', '/dev/zero', '/dev/null'], 2, 'the following arguments are required: --limit'),
    (['copy', 'a', 'b', '--limit', 'fast'], 2, "RATE 'fast' is not a rate"),
    (['copy', 'a', 'b', '--limit', '0'], 2, 'RATE must be greater than 0'),
    (['copy', 'a', 'b', '--limit', '1Mi', '--bs', 'huge'], 2, 'is not a dd block size'),
    (['copy', 'a', 'b', '--limit', '1Mi', '--backend', 'magic'], 2, "invalid choice: 'magic'"),
    (['set-limit', 'copy-1-00000000', '-5'], 2, "RATE '-5' is not a rate"),
    (['status', '--interval', 'soon'], 2, "'soon' is not a number of seconds"),
    (['check', '/dev/zero'], 2, 'check takes SRC and DST together'),
    (['--cgroup-name', '../etc', 'cleanup'], 2, "invalid cgroup name '../etc'"),
    (['copy', '/nonexistent/src', '/dev/null', '--limit', '1Mi'], 1,
     '/nonexistent/src does not exist'),
    (['set-limit', 'copy-1-00000000', '1Mi'], 3, "no active copy with id or volume id"),
])
def test_bad_arguments_one_line_no_traceback(tmp_path, args, code, message):
    parent = 'cct-test-args-%d' % os.getpid()
    out = subprocess.run(cli_argv() + ['--state-dir', str(tmp_path), '--cgroup-name', parent]
                         + args, capture_output=True, text=True)
    assert out.returncode == code, out.stderr
    assert 'Traceback' not in out.stderr and out.stdout == ''
    errors = [line for line in out.stderr.splitlines() if 'error:' in line]
    assert len(errors) == 1 and message in errors[0], out.stderr
    assert errors[0] == out.stderr.splitlines()[-1]
    if code == 2:
        assert out.stderr.startswith('usage: %s' % PROG)
    host = detect()
    for mount in (host.v1_blkio, host.v2_root):
        assert not mount or not os.path.exists(os.path.join(mount, parent))


def test_help_documents_exit_codes():
    out = subprocess.run(cli_argv() + ['--help'], capture_output=True, text=True)
    assert out.returncode == 0
    for line in ('0    success', '2    bad arguments', '3    no active copy'):
        assert line in out.stdout
