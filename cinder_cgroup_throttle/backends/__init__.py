"""The ways of limiting a copy, one module each, and the one place that chooses between
them.

* ``cgroup_v1``/``cgroup_v2`` (shared code in ``cgroup``): a leaf cgroup per copy;
* ``pv``: the fallback, our wrapper around pv;
* ``none``: no limit.

:class:`Selector` chooses once per copy and says why (the reason goes into the copy's
entry and into ``check``). Any other process rebuilds a copy's backend from its registry
entry with :func:`for_entry`. A new backend is one module with a :class:`CopyBackend`
subclass, named in :data:`NAMES`; nothing outside this package compares backend names.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple, Type

from cinder_cgroup_throttle.backends.base import Action, CopyBackend  # noqa: F401
from cinder_cgroup_throttle.backends.cgroup import CgroupBackend
from cinder_cgroup_throttle.backends.cgroup_v1 import CgroupV1Backend  # noqa: F401
from cinder_cgroup_throttle.backends.cgroup_v2 import CgroupV2Backend  # noqa: F401
from cinder_cgroup_throttle.backends.none import NoneBackend
from cinder_cgroup_throttle.backends.pv import PvBackend
from cinder_cgroup_throttle.cgroups import DeviceLimit, placement
from cinder_cgroup_throttle.exception import CgroupUnavailable, ThrottleError
from cinder_cgroup_throttle.privileged import Executor
from cinder_cgroup_throttle.registry import Entry

LOG = logging.getLogger(__name__)

#: Entry.backend -> the class that rebuilds it.
NAMES: Dict[str, Type[CopyBackend]] = {
    cls.name: cls for cls in (CgroupBackend, PvBackend, NoneBackend)}
AUTO = 'auto'
#: What an operator may ask for (volume_copy_throttle_backend, --backend).
CHOICES = (AUTO, CgroupBackend.name, PvBackend.name)


def for_entry(entry: Entry, executor: Executor, state_dir: str) -> CopyBackend:
    """The backend of a running copy, rebuilt from its registry entry."""
    return NAMES[entry.backend].from_entry(entry, executor, state_dir)


def throttles(entry: Entry) -> bool:
    """Whether the entry's copy runs under a limit (a re-balance counts it)."""
    return NAMES[entry.backend].throttles


def host_cgroup(cgroup_name: str, executor: Executor, state_dir: str) -> CgroupBackend:
    """The cgroup backend of this host: leaves under ``cgroup_name`` where this process's
    placement puts them (cgroups.placement); CgroupUnavailable says why there is none."""
    driver = executor.driver(placement.place(cgroup_name))
    return CgroupBackend.for_driver(executor, state_dir, driver)


class Selector:
    """Chooses the backend of each copy from the operator's ``mode`` and what the host and
    the copy's devices allow: 'cgroup' fails a copy no cgroup can throttle, 'pv' always
    takes the fallback, 'auto' a cgroup where the host has a usable controller and a side
    of the copy is on a block device, else pv. With ``allow_unthrottled`` a copy nothing
    can throttle runs without a limit instead of failing. The host's cgroup is looked up
    once, here."""

    def __init__(self, mode: str, cgroup_name: str, executor: Executor, state_dir: str,
                 allow_unthrottled: bool = False) -> None:
        if mode not in CHOICES:
            raise ThrottleError('backend must be one of %s, not %r'
                                % ('|'.join(CHOICES), mode))
        self.mode = mode
        self.allow_unthrottled = allow_unthrottled
        self.cgroup: Optional[CgroupBackend] = None
        self.cgroup_unavailable = 'backend pv chosen by the operator'
        if mode != PvBackend.name:
            try:
                self.cgroup = host_cgroup(cgroup_name, executor, state_dir)
            except CgroupUnavailable as exc:
                LOG.warning('cgroup throttling unavailable: %s', exc)
                self.cgroup_unavailable = str(exc)
        self.pv = PvBackend(executor, state_dir)
        self.none = NoneBackend(executor, state_dir)

    def choose(self, src: str, dst: str, bps: int,
               limits: List[DeviceLimit]) -> Tuple[CopyBackend, str]:
        """(backend, why) for a copy at ``bps`` whose devices get ``limits``; raises
        ThrottleError when the operator's choice cannot serve."""
        if not bps and not limits:
            return self.none, 'no rate configured and no limit applies to its devices'
        if self.cgroup is not None and limits:
            return self.cgroup, self.cgroup.reason(limits)
        why = (self.cgroup_unavailable if self.cgroup is None
               else 'neither %s nor %s is on a block device' % (src, dst))
        if self.mode == CgroupBackend.name:
            raise ThrottleError('cgroup backend cannot throttle %s -> %s: %s'
                                % (src, dst, why))
        unusable = self.pv.unusable(bps, limits)
        if unusable is None:
            return self.pv, why
        why += ', and ' + unusable
        if self.allow_unthrottled:
            return self.none, why + '; unthrottled copies are allowed'
        raise ThrottleError('cannot throttle %s -> %s: %s' % (src, dst, why))
