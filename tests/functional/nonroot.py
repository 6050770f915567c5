"""The deployment operators run (doc/deployment.md): cinder-volume as an unprivileged user
that reaches root only through ``sudo cinder-rootwrap``, owning the state directory.

Used through the ``deployment`` fixture (tests/functional/conftest.py); every object is
named after this test process and removed afterwards, also when the test fails.
"""
from __future__ import annotations

import dataclasses
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from typing import List


from tests.unit.test_rootwrap_filters import EXEC_DIRS, write_filters

BIN = os.path.dirname(sys.executable)


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


@dataclasses.dataclass
class Deployment:
    user: str
    uid: int
    gid: int
    conf: str  # rootwrap.conf
    state: str  # the state directory, owned by the user

    def rootwrap(self, *cmd: str) -> List[str]:
        """argv running ``cmd`` as root the way cinder-volume does: as the user, through
        sudo and cinder-rootwrap."""
        return ['runuser', '-u', self.user, '--', 'sudo', '-n',
                os.path.join(BIN, 'cinder-rootwrap'), self.conf] + list(cmd)


def deploy(scratch, cgroup_parent: str) -> Deployment:
    """User, sudoers rule, rootwrap config and state dir; all removed with ``scratch``."""
    for tool in ('sudo', 'runuser'):  # tools/bootstrap.sh installs them
        assert shutil.which(tool), '%s is needed (apt-get install sudo util-linux)' % tool
    user = 'cct-nr-%d' % os.getpid()
    run('useradd', '--system', '--no-create-home', '--shell', '/usr/sbin/nologin', user)
    scratch.defer('userdel ' + user, lambda: run('userdel', user))
    pw = pwd.getpwnam(user)

    etc = tempfile.mkdtemp(prefix='cct-rootwrap-')  # root-owned, as rootwrap requires
    scratch.defer('rm ' + etc, lambda: shutil.rmtree(etc))
    os.chmod(etc, 0o755)
    filters = write_filters(os.path.join(etc, 'rootwrap.d'), cgroup_parent)
    conf = os.path.join(etc, 'rootwrap.conf')
    with open(conf, 'w') as f:
        f.write('[DEFAULT]\nfilters_path=%s\nexec_dirs=%s\nuse_syslog=False\n'
                % (filters, ','.join(EXEC_DIRS)))

    rootwrap = os.path.join(BIN, 'cinder-rootwrap')
    sudoers = '/etc/sudoers.d/cct-nonroot-%d' % os.getpid()
    rule = ('Defaults:%s secure_path="%s"\n%s ALL = (root) NOPASSWD: %s %s *\n'
            % (user, ':'.join(EXEC_DIRS), user, rootwrap, conf))
    with open(sudoers + '.tmp', 'w') as f:
        f.write(rule)
    run('visudo', '-c', '-q', '-f', sudoers + '.tmp')
    os.chmod(sudoers + '.tmp', 0o440)
    os.replace(sudoers + '.tmp', sudoers)
    scratch.defer('rm ' + sudoers, lambda: os.unlink(sudoers))

    os.chmod(scratch.dir, 0o711)  # the user reaches its state dir and the test files
    state = os.path.join(scratch.dir, 'state')
    os.mkdir(state)
    os.chown(state, pw.pw_uid, pw.pw_gid)
    return Deployment(user, pw.pw_uid, pw.pw_gid, conf, state)


def user_python(user: str) -> str:
    """An interpreter of this Python version that the user may run (a venv's python may
    point into root's home)."""
    for python in (sys.executable, '/usr/bin/python%d.%d' % sys.version_info[:2]):
        if subprocess.run(['runuser', '-u', user, '--', python, '-c', 'pass'],
                          capture_output=True).returncode == 0:
            return python
    raise AssertionError('no python%d.%d that %s can run' % (sys.version_info[:2] + (user,)))
