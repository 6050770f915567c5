"""Fixtures for driving the throttle through real Cinder 29 code."""
from __future__ import annotations

import pytest

from tests.functional.nonroot import Deployment, deploy


@pytest.fixture(scope='session')
def cinder_modules():
    """Cinder's copy paths, set up as cinder-volume runs them, but in-process as root."""
    import cinder  # requirements.txt: missing, it is a broken install, not a skip
    from cinder.image import image_utils
    import cinder.privsep
    from cinder.volume import throttling, volume_utils

    # Running as root: privsep calls run in-process instead of through sudo + daemon.
    cinder.privsep.sys_admin_pctxt.set_client_mode(False)
    return cinder, throttling, volume_utils, image_utils


@pytest.fixture
def install_throttle(cinder_modules, cgroup_parent, state_dir):
    """Install a CgroupThrottle as Cinder's default, as BaseVD.set_throttle() does."""
    from cinder_cgroup_throttle.throttle import CgroupThrottle

    throttling = cinder_modules[1]
    installed = []

    def install(bps_limit, **kw):
        throttle = CgroupThrottle(bps_limit, cgroup_name=cgroup_parent, **kw)
        throttling.Throttle.set_default(throttle)
        installed.append(throttle)
        return throttle

    previous = throttling.Throttle.DEFAULT
    yield install
    throttling.Throttle.set_default(previous)
    for throttle in installed:
        leftovers = throttle.manager.driver.leaves()
        assert not leftovers, 'cgroups left behind: %s' % leftovers


@pytest.fixture
def deployment(cgroup_parent, scratch) -> Deployment:
    """cinder-volume's user, its sudo + cinder-rootwrap rule and its state directory."""
    return deploy(scratch, cgroup_parent)
