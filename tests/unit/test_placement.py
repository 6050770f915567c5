"""Which case cgroups.placement picks, on a directory tree laid out like cgroupfs.

The real cases (a delegated systemd unit, a private cgroup namespace, a read-only mount)
run in the VM lane: tests/systemd and tests/kernel/test_containers.py.
"""
from __future__ import annotations

import os

import pytest

from cinder_cgroup_throttle.cgroups import CgroupHost
from cinder_cgroup_throttle.cgroups.placement import resolve

NAME = 'cinder-volume-copy'


@pytest.fixture
def tree(tmp_path):
    unit = tmp_path / 'system.slice' / 'cinder-volume.service'
    (unit / 'main').mkdir(parents=True)
    (tmp_path / 'system.slice' / 'ssh.service').mkdir()
    (unit / 'cgroup.type').write_text('domain\n')
    for name in ('trusted.delegate', 'user.delegate'):
        try:
            os.setxattr(str(unit), name, b'1')
            break
        except OSError:
            continue
    else:
        pytest.skip('%s supports neither trusted.* nor user.* xattrs' % tmp_path)
    return str(tmp_path)


def v2(root, **kw):
    return CgroupHost(layout='unified', v2_root=root, v2_controllers=['io'], **kw)


def test_delegated_unit_gets_its_copies_below_it(tree):
    for own in ('/system.slice/cinder-volume.service',
                '/system.slice/cinder-volume.service/main'):  # after the move
        p = resolve(NAME, v2(tree), own)
        assert (p.case, p.parent, p.home) == (
            'v2-delegated', 'system.slice/cinder-volume.service/' + NAME,
            'system.slice/cinder-volume.service')


def test_unit_without_delegation_keeps_the_top_level_parent(tree):
    p = resolve(NAME, v2(tree), '/system.slice/ssh.service')
    assert (p.case, p.parent, p.home) == ('v2-not-delegated', NAME, None)


def test_namespace_root_is_told_from_the_real_root_by_cgroup_type(tree):
    assert resolve(NAME, v2(tree), '/').case == 'v2-not-delegated'  # the real root
    ns_root = os.path.join(tree, 'system.slice', 'cinder-volume.service')
    p = resolve(NAME, v2(ns_root), '/')
    assert (p.case, p.parent, p.home) == ('v2-cgroupns', NAME, '')
    assert resolve(NAME, v2(ns_root), '/main').case == 'v2-cgroupns'


def test_a_cgroup_outside_the_mount_is_not_ours(tree):
    p = resolve(NAME, v2(tree, v2_mount_root='/machine.slice'),
                '/system.slice/cinder-volume.service')
    assert p.case == 'v2-not-delegated'


def test_read_only_and_v1(tree):
    p = resolve(NAME, v2(tree, v2_readonly=True), '/system.slice/cinder-volume.service')
    assert p.case == 'read-only' and 'mounted read-only' in p.reason
    v1 = CgroupHost(layout='hybrid', v1_blkio='/sys/fs/cgroup/blkio', v2_root=tree)
    assert (resolve(NAME, v1, '/system.slice/cinder-volume.service').case, NAME) == (
        'v1', resolve(NAME, v1).parent)
