"""oslo.config options of the throttle, and their registration next to Cinder's.

Two options keep Cinder's own names (``volume_copy_bps_limit``,
``volume_copy_blkio_cgroup_name``) so an existing cinder.conf keeps working. oslo.config
raises DuplicateOptError when two *different* opts share a name in a group, and accepts
re-registration of an *equal* one; these two are therefore exact copies of Cinder 29's
definitions (a unit test compares them), whichever side registers first.

Rates in our own options accept units (``8Mi``, ``10M``; see ``units.parse_rate``);
``volume_copy_bps_limit`` stays an integer in bytes/s because its type is Cinder's.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

from oslo_config import cfg
from oslo_config import types

from cinder_cgroup_throttle.units import parse_rate

#: Cinder's group of values shared by all backend sections.
SHARED_GROUP = 'backend_defaults'
DEFAULT_METADATA_KEY = 'volume_copy_bps_limit'
DEFAULT_MIN_BPS = 2**20  # 1 MiB/s


class Rate(types.ConfigType):
    """Bytes per second, plain or with a unit (K/M/G = x1000, Ki/Mi/Gi = x1024)."""

    def __init__(self, type_name: str = 'rate value') -> None:
        super().__init__(type_name=type_name)

    def __call__(self, value: Any) -> int:
        return parse_rate(value)  # InvalidRate is a ValueError: oslo.config reports it

    def __eq__(self, other: object) -> bool:
        return self.__class__ == other.__class__

    __hash__ = types.ConfigType.__hash__

    def _formatter(self, value: Any) -> str:
        return str(value)


# Exact copies of cinder/volume/driver.py (29.0.0) volume_opts entries: see module doc.
cinder_opts = [
    cfg.StrOpt('volume_copy_blkio_cgroup_name',
               default='cinder-volume-copy',
               help='The blkio cgroup name to be used to limit bandwidth '
                    'of volume copy'),
    cfg.IntOpt('volume_copy_bps_limit',
               default=0,
               help='The upper limit of bandwidth of volume copy. '
                    '0 => unlimited'),
]

throttle_opts = [
    cfg.Opt('volume_copy_read_bps_limit', type=Rate(), default=0,
            help='Read limit in bytes/s on the source device of every host-based '
                 'volume copy, in addition to volume_copy_bps_limit (which limits one '
                 'direction only). Units: K, M, G (x1000) or Ki, Mi, Gi (x1024). '
                 '0 => no read limit.'),
    cfg.Opt('volume_copy_write_bps_limit', type=Rate(), default=0,
            help='Write limit in bytes/s on the destination device of every copy, '
                 'in addition to volume_copy_bps_limit. Units as for '
                 'volume_copy_read_bps_limit. 0 => no write limit.'),
    cfg.IntOpt('volume_copy_read_iops_limit', default=0, min=0,
               help='Read operations per second on the source device of every copy. '
                    '0 => unlimited.'),
    cfg.IntOpt('volume_copy_write_iops_limit', default=0, min=0,
               help='Write operations per second on the destination device of every '
                    'copy. 0 => unlimited.'),
    cfg.Opt('volume_copy_host_bps_limit', type=Rate(), default=0,
            help='Total bytes/s for all concurrent copies of this backend process. Each '
                 'active copy gets the smaller of its own limit and a fair share of '
                 'this total, re-balanced when copies start and end. Set it, with '
                 'volume_copy_bps_limit = 0, to get Cinder\'s built-in behaviour (one '
                 'total split across copies). 0 => no host-wide cap.'),
    cfg.Opt('volume_copy_backend_bps_limit', type=Rate(), default=0,
            help='Total bytes/s for all copies against this storage backend from every '
                 'cinder-volume host that serves it, shared through [copy_budget] '
                 '(tooz with etcd). Each copy gets the smaller of its own limit (within '
                 'volume_copy_host_bps_limit) and a max-min fair share of this budget. '
                 'Needs [copy_budget] enabled = true. 0 => no shared budget.'),
    cfg.StrOpt('volume_copy_budget_name',
               help='Name of the shared budget: hosts with the same name share one '
                    'budget. Default: volume_backend_name, else the backend section '
                    'name.'),
    cfg.StrOpt('volume_copy_throttle_backend', default='auto',
               choices=[('auto', 'a cgroup when one can throttle the copy, else pv'),
                        ('cgroup', 'a blkio/io cgroup per copy; a copy that no cgroup '
                                   'can throttle fails'),
                        ('pv', 'always a pv pipeline')],
               help='How copies are throttled.'),
    cfg.BoolOpt('volume_copy_allow_unthrottled', default=False,
                help='Run a copy without a limit when nothing can throttle it (no block '
                     'device and no pv), instead of failing it.'),
    cfg.StrOpt('volume_copy_bps_limit_metadata_key', default=DEFAULT_METADATA_KEY,
               help='Volume metadata key holding a per-volume copy rate (bytes/s or '
                    'with units). A value in user metadata can only lower the limit '
                    'set here, never below volume_copy_min_bps_limit, and never for a '
                    'delete wipe or an admin-started migration; a value in admin '
                    'metadata replaces it. Empty => metadata is not consulted. The same '
                    'key in the back-end QoS specs of a volume\'s type (consumer back-end '
                    'or both) replaces volume_copy_bps_limit for the volumes of that type '
                    'and every kind of copy.'),
    cfg.Opt('volume_copy_min_bps_limit', type=Rate(), default=DEFAULT_MIN_BPS,
            help='Floor for rates from user (tenant) metadata: a lower value counts as '
                 'this one, so a tenant cannot stall a copy. Units as for '
                 'volume_copy_read_bps_limit. 0 => no floor.'),
    cfg.FloatOpt('volume_copy_limit_poll_interval', default=1.0, min=0,
                 help='Seconds between re-reads of the metadata and QoS specs of the '
                      'volumes of running copies: a change made through Cinder\'s API '
                      're-limits a running copy within this time. 0 => read at the start '
                      'of a copy only.'),
]

# Read by cinder_hook.ThrottledDriver, the one-line way to enable the throttle.
hook_opts = [
    cfg.StrOpt('throttled_volume_driver',
               help='The real volume driver class when volume_driver is '
                    'cinder_cgroup_throttle.cinder_hook.ThrottledDriver, e.g. '
                    'cinder.volume.drivers.lvm.LVMVolumeDriver. Its copies are '
                    'throttled per copy by cinder-cgroup-throttle.'),
]

ALL_OPTS = cinder_opts + throttle_opts + hook_opts

BUDGET_GROUP = 'copy_budget'
budget_opts = [
    cfg.BoolOpt('enabled', default=False,
                help='Share volume_copy_backend_bps_limit among the cinder-volume hosts '
                     'of each backend that sets it.'),
    cfg.StrOpt('backend_url', secret=True,
               help='tooz coordination URL, etcd3+http://HOST:PORT or etcd3+https://... '
                    '(the etcd3gw driver). Default: [coordination] backend_url.'),
    cfg.StrOpt('host',
               help='Name of this host in the budget\'s membership (shown by status). '
                    'Default: the host option, else the hostname.'),
    cfg.IntOpt('lease_ttl', default=10, min=4,
               help='Seconds within which the copies of a host that died (or lost '
                    'etcd) stop counting and the other hosts share its part of the '
                    'budget. Its etcd lease is shorter by poll_interval + 1 s.'),
    cfg.FloatOpt('poll_interval', default=0.5, min=0.05, max=10,
                 help='Seconds between reads of the backend\'s copies while this host '
                      'runs copies: how fast shares follow copies starting or ending '
                      'on other hosts.'),
    cfg.IntOpt('timeout', default=2, min=1,
               help='Seconds an etcd request may take before this host falls back to '
                    'local limits.'),
]


def register_opts(conf: cfg.ConfigOpts, backend_group: Optional[str] = None) -> None:
    """Register every option in [DEFAULT], [backend_defaults] and the backend's section.

    Safe whether or not Cinder registered its two options before or does so after.
    """
    for group in (None, SHARED_GROUP, backend_group):
        conf.register_opts(ALL_OPTS, group=group)  # re-registering equal opts is a no-op
    conf.register_opts(budget_opts, group=BUDGET_GROUP)


def list_opts() -> List[Tuple[str, Sequence[cfg.Opt]]]:
    """Entry point for oslo-config-generator (namespace ``cinder_cgroup_throttle``)."""
    from cinder_cgroup_throttle import privsep  # here: it imports eventlet
    return [(SHARED_GROUP, ALL_OPTS), (BUDGET_GROUP, budget_opts),
            (privsep.SECTION, privsep.list_opts())]
