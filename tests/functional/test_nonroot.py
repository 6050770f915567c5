"""cinder-volume as an unprivileged user, privileged steps through sudo + cinder-rootwrap.

As operators deploy it (doc/deployment.md): a system user, a sudoers rule for
cinder-rootwrap only, a rootwrap.conf over our filters and Cinder's. Copies run through
Cinder's real ``volume_utils.copy_volume`` in a process of that user; this test, as root,
watches the copy's cgroup leaf and limit appear and disappear.
"""
from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
import sys
import sysconfig
import textwrap
import time

import pytest

from cinder_cgroup_throttle.cgroups import get_driver
from tests.functional.nonroot import user_python
from tests.scratch import MiB, fill_random, sha256_prefix
from tests.unit.test_rootwrap_filters import EXEC_DIRS

pytestmark = [pytest.mark.kernel, pytest.mark.cinder]

RATE = 8 * MiB
LIMIT_FILE = {'blkio': 'blkio.throttle.write_bps_device', 'io': 'io.max'}
SIZE_MB = 24
BIN = os.path.dirname(sys.executable)

# Runs as the unprivileged user: Cinder's copy_volume with our throttle installed as
# BaseVD.set_throttle() does, nothing else configured but Cinder's rootwrap_config.
USER_SCRIPT = textwrap.dedent('''
    import json, site, sys
    site.addsitedir(sys.argv[6])  # this environment's packages only (python -S)
    from cinder import utils
    from cinder.common import config  # noqa: F401  (registers rootwrap_config)
    from oslo_config import cfg
    cfg.CONF([], project='cinder', default_config_files=[])
    cfg.CONF.set_override('rootwrap_config', sys.argv[1])
    from cinder.volume import throttling, volume_utils
    from cinder_cgroup_throttle.throttle import CgroupThrottle
    throttle = CgroupThrottle(int(sys.argv[2]), cgroup_name=sys.argv[3])
    throttling.Throttle.set_default(throttle)
    ran = []
    def execute(*cmd, **kw):
        out, err = utils.execute(*cmd, **kw)
        ran.append((list(cmd), err))
        return out, err
    copies = json.loads(sys.argv[4])
    for src, dst in copies:
        volume_utils.copy_volume(src, dst, int(sys.argv[5]), '1M', execute=execute,
                                 ionice='-c2')
    print(json.dumps({'driver': type(throttle.manager.driver).__name__,
                      'ran': ran}))
''')


def run_as(user, conf, state, parent, copies):
    env = {'PATH': ':'.join([BIN] + EXEC_DIRS), 'CINDER_CGROUP_THROTTLE_STATE_DIR': state,
           'PYTHONPATH': os.path.dirname(os.path.dirname(os.path.dirname(
               os.path.abspath(__file__)))), 'PYTHONDONTWRITEBYTECODE': '1'}
    argv = ['runuser', '-u', user, '--', 'env', '-i'] + ['%s=%s' % kv for kv in env.items()]
    argv += [user_python(user), '-S', '-c', USER_SCRIPT, conf, str(RATE), parent,
             json.dumps(copies), str(SIZE_MB), sysconfig.get_paths()['purelib']]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd='/')


def test_copy_as_unprivileged_user_through_rootwrap(scratch, cgroup_parent, deployment):
    user, conf, state = deployment.user, deployment.conf, deployment.state
    size = SIZE_MB * MiB
    src, dst = scratch.loop(32), scratch.loop(32)
    digest = fill_random(src, size)
    work = scratch.tmpfs(64)
    fsrc, fdst = os.path.join(work, 'src.img'), os.path.join(work, 'dst.img')
    fdigest = fill_random(fsrc, size)
    os.chmod(os.path.dirname(work), 0o711)  # scratch dirs are private to root
    os.chmod(work, 0o755)

    driver = get_driver(cgroup_parent)
    proc = run_as(user, conf, state, cgroup_parent, [[src, dst], [fsrc, fdst]])
    seen_limits, seen_pipe = set(), []
    while proc.poll() is None:  # watch the copies from outside, as root
        for leaf in driver.leaves():
            try:
                with open(os.path.join(driver.leaf_path(leaf), LIMIT_FILE[
                        driver.controller])) as f:
                    seen_limits.update(tuple(line.split()) for line in f)
            except FileNotFoundError:
                pass
        for name in os.listdir(state):
            if name.endswith('.pipe.json'):
                path = os.path.join(state, name)
                with open(path) as f:
                    seen_pipe.append((os.stat(path).st_uid, json.load(f)['bytes'] or 0))
        time.sleep(0.05)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])

    assert result['driver'] == 'PrivilegedDriver'
    rdev = os.stat(dst).st_rdev
    dst_majmin = '%d:%d' % (os.major(rdev), os.minor(rdev))
    assert ((dst_majmin, str(RATE)) in seen_limits  # v1 blkio
            or (dst_majmin, 'rbps=max', 'wbps=%d' % RATE, 'riops=max', 'wiops=max')
            in seen_limits), seen_limits  # v2 io.max
    # The root pipeline wrote its state as the user, and could read pv's progress.
    assert seen_pipe and {uid for uid, _ in seen_pipe} == {pwd.getpwnam(user).pw_uid}
    assert 0 < max(done for _, done in seen_pipe) <= size
    assert sha256_prefix(dst, size) == digest
    assert sha256_prefix(fdst, size) == fdigest
    copies = [(cmd, err) for cmd, err in result['ran'] if 'count=%d' % size in cmd]
    assert [cmd[0] for cmd, _ in copies] == ['cgexec', 'cinder-cgroup-throttle-pipe']
    for cmd, err in copies:
        assert cmd[cmd.index('dd') - 2:cmd.index('dd')] == ['ionice', '-c2']
        # dd's own account of the transfer (the writer's, for the pipeline): sudo and
        # rootwrap start-up, slow on a loaded host, are not the throttle's doing.
        copied = re.search(r'^(\d+) bytes .* copied, ([0-9.]+) s', err, re.M)
        assert copied and int(copied.group(1)) == size, err
        ratio = size / float(copied.group(2)) / RATE
        print('%s: achieved/limit %.3f' % (cmd[0], ratio))  # shown with pytest -s
        assert 0.8 <= ratio <= 1.15, '%s: achieved/limit %.3f' % (cmd[0], ratio)
    assert driver.leaves() == []
    assert os.listdir(state) == [] or all(n.startswith('.') for n in os.listdir(state))
