"""The effective limits of a copy: operator configuration, then per-volume metadata.

Configuration lookup, per option: the backend's section, then ``[backend_defaults]``, then
``[DEFAULT]``; the first section where the option is *explicitly set* wins, so an explicit
``volume_copy_bps_limit = 0`` in a backend section turns throttling off for that backend
(Cinder's ``value or CONF.value`` cannot express that).

Metadata: users may set volume metadata, so a rate in user metadata can only *lower* the
operator's limit, never below the operator's floor (``volume_copy_min_bps_limit``); a rate
in admin metadata (settable only with admin rights) replaces it. Which of them apply
depends on the kind of copy (:data:`LIMIT_SOURCES`): a tenant must not stall the wipe of a
deleted volume or an admin's migration. The same key in the back-end QoS specs of the
volume's type (admin-only too) replaces the operator's limit for every volume of the type
and every kind of copy, like the option; a volume's admin metadata overrides it. An
invalid value is logged and ignored: metadata never fails a copy.
"""
from __future__ import annotations

import dataclasses
import logging
import socket
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

from oslo_config import cfg

from cinder_cgroup_throttle import opts
from cinder_cgroup_throttle.budget import BudgetConfig
from cinder_cgroup_throttle.exception import InvalidRate
from cinder_cgroup_throttle.sharing import StaticLimits
from cinder_cgroup_throttle.units import format_rate, parse_rate

LOG = logging.getLogger(__name__)

_NOT_SET = (cfg.Locations.opt_default, cfg.Locations.set_default)
#: QoS specs consumers whose specs the back end applies (Cinder's; 'front-end' is Nova's).
QOS_CONSUMERS = ('back-end', 'both')

#: Copy kinds; cinder_hook tells them by the Cinder method that started the copy.
WIPE = 'wipe'            # delete_volume: the wipe of a deleted volume
MIGRATION = 'migration'  # migration or retype started with an admin context
RETYPE = 'retype'        # migration or retype started by a tenant (non-admin context)
CLONE = 'clone'          # clone, volume from snapshot or backup
IMAGE = 'image'          # image to volume, volume to image
OTHER = 'other'          # started by no method the hook knows (e.g. the CLI)

#: Per copy kind, the per-volume sources that may change the operator's rate, in order:
#: 'admin' = admin metadata (replaces it), 'user' = user metadata (only lowers it, never
#: below the floor). The operator's options always apply. doc/limits.md has this table.
LIMIT_SOURCES: Dict[str, Tuple[str, ...]] = {
    WIPE: ('admin',),
    MIGRATION: ('admin',),
    RETYPE: ('admin', 'user'),
    CLONE: ('admin', 'user'),
    IMAGE: ('admin', 'user'),
    OTHER: ('admin', 'user'),
}


@dataclasses.dataclass(frozen=True)
class ThrottleConfig:
    """One backend's throttle settings, resolved from cinder.conf."""

    bps_limit: int = 0
    static: StaticLimits = StaticLimits()
    host_bps_limit: int = 0
    cgroup_name: str = opts.cinder_opts[0].default
    backend: str = 'auto'
    allow_unthrottled: bool = False
    metadata_key: str = opts.DEFAULT_METADATA_KEY
    min_bps: int = opts.DEFAULT_MIN_BPS
    budget: Optional[BudgetConfig] = None  # shared with the backend's other hosts


def lookup(conf: cfg.ConfigOpts, name: str, backend_group: Optional[str] = None) -> Any:
    """Value of ``name`` from the first of backend section, [backend_defaults], [DEFAULT]
    that sets it explicitly; the option's default when none does."""
    groups = ([backend_group, opts.SHARED_GROUP] if backend_group else []) + [None]
    for group in groups:
        try:
            location = conf.get_location(name, group)
        except (cfg.NoSuchOptError, cfg.NoSuchGroupError):
            continue
        if location is not None and location.location not in _NOT_SET:
            return conf[group][name] if group else conf[name]
    return conf[name]


def load_config(conf: cfg.ConfigOpts, backend_group: Optional[str] = None) -> ThrottleConfig:
    """Register our options and resolve them for ``backend_group`` (None: [DEFAULT] only)."""
    opts.register_opts(conf, backend_group)

    def get(name: str) -> Any:
        return lookup(conf, name, backend_group)

    return ThrottleConfig(
        # Cinder's IntOpt: no bounds (a negative or >= 2**64 value is refused here).
        bps_limit=parse_rate(get('volume_copy_bps_limit'), 'volume_copy_bps_limit'),
        static=StaticLimits(read_bps=get('volume_copy_read_bps_limit'),
                            write_bps=get('volume_copy_write_bps_limit'),
                            read_iops=get('volume_copy_read_iops_limit'),
                            write_iops=get('volume_copy_write_iops_limit')),
        host_bps_limit=get('volume_copy_host_bps_limit'),
        cgroup_name=get('volume_copy_blkio_cgroup_name'),
        backend=get('volume_copy_throttle_backend'),
        allow_unthrottled=get('volume_copy_allow_unthrottled'),
        metadata_key=(get('volume_copy_bps_limit_metadata_key') or '').strip(),
        min_bps=get('volume_copy_min_bps_limit'),
        budget=budget_config(conf, backend_group, get('volume_copy_backend_bps_limit'),
                             get('volume_copy_budget_name')))


def _cinder_option(conf: cfg.ConfigOpts, name: str, group: Optional[str] = None) -> Any:
    """An option Cinder registers (None where it is not registered: CLI, tests)."""
    try:
        return conf[group][name] if group else conf[name]
    except (cfg.NoSuchOptError, cfg.NoSuchGroupError, KeyError):
        return None


def budget_config(conf: cfg.ConfigOpts, backend_group: Optional[str], bps_limit: int,
                  name: Optional[str]) -> Optional[BudgetConfig]:
    """The backend's shared budget, None unless [copy_budget] is enabled and the backend
    has a budget; raises ThrottleError naming what is missing or wrong."""
    section = conf[opts.BUDGET_GROUP]
    if not (section.enabled and bps_limit):
        return None
    url = section.backend_url or _cinder_option(conf, 'backend_url', 'coordination')
    name = (name or (_cinder_option(conf, 'volume_backend_name', backend_group)
                     if backend_group else None) or backend_group or 'DEFAULT')
    return BudgetConfig(url=url or '', group=name, bps_limit=bps_limit,
                        host=section.host or _cinder_option(conf, 'host')
                        or socket.gethostname(),
                        lease_ttl=section.lease_ttl, poll_interval=section.poll_interval,
                        timeout=section.timeout)


def _metadata(volume: Any, attr: str) -> Mapping[str, str]:
    """A volume's (admin) metadata as a dict, from a Cinder Volume object or a dict.

    Unreadable metadata (an object without a context, admin metadata seen by a non-admin
    context, which Cinder returns as empty) counts as none.
    """
    try:
        value = volume[attr] if isinstance(volume, Mapping) else getattr(volume, attr)
    except Exception as exc:  # lazy-loading from the DB can fail in many ways
        LOG.debug('volume %s: %s not readable: %s', volume_id(volume), attr, exc)
        return {}
    if isinstance(value, Mapping):
        return value
    if isinstance(value, list):  # DB rows: [{'key': k, 'value': v}, ...]
        return {item['key']: item['value'] for item in value}
    return {}


def volume_id(volume: Any) -> Optional[str]:
    """The id of a Cinder volume object or dict, None when it has none."""
    try:
        return volume['id'] if isinstance(volume, Mapping) else volume.id
    except Exception:
        return None


def _parse_metadata_rate(volume: Any, where: str, key: str,
                         value: str) -> Optional[int]:
    try:
        return parse_rate(value, '%s %r of volume %s' % (where, key, volume_id(volume)))
    except InvalidRate as exc:
        LOG.warning('ignoring %s; the operator\'s limit applies', exc)
        return None


def volume_bps_limit(volume: Any, operator_bps: int, key: str,
                     sources: Tuple[str, ...] = LIMIT_SOURCES[OTHER],
                     min_bps: int = 0) -> int:
    """The rate for copies of ``volume``: 0 means unlimited (as in the options).

    ``sources``: the per-volume sources that apply (:data:`LIMIT_SOURCES`); ``min_bps``:
    the floor under a rate from user metadata."""
    if not key:
        return operator_bps
    vid = volume_id(volume)
    limit = operator_bps
    qos = _metadata(volume, 'qos_specs').get(key)  # admin-only: every kind, like the option
    if qos is not None:
        parsed = _parse_metadata_rate(volume, 'back-end QoS spec', key, qos)
        if parsed is not None:
            limit = parsed
    admin = _metadata(volume, 'admin_metadata').get(key) if 'admin' in sources else None
    if admin is not None:
        parsed = _parse_metadata_rate(volume, 'admin metadata', key, admin)
        if parsed is not None:
            limit = parsed
            LOG.info('volume %s: admin metadata %s sets the copy limit to %s', vid, key,
                     format_rate(limit) if limit else 'unlimited')
    user = _metadata(volume, 'metadata').get(key)
    if user is not None and 'user' not in sources:
        LOG.info('volume %s: metadata %s does not apply to this copy; the operator\'s '
                 'limit does', vid, key)
        user = None
    if user is not None:
        parsed = _parse_metadata_rate(volume, 'metadata', key, user)
        if parsed and parsed < min_bps:
            LOG.warning('volume %s: metadata %s=%r is below the operator\'s floor '
                        'volume_copy_min_bps_limit; using %s', vid, key, user,
                        format_rate(min_bps))
            parsed = min_bps
        if parsed is None:
            pass
        elif parsed and (not limit or parsed < limit):
            LOG.info('volume %s: metadata %s lowers the copy limit to %s', vid, key,
                     format_rate(parsed))
            limit = parsed
        elif parsed != limit:
            LOG.warning('volume %s: ignoring metadata %s=%r: user metadata can only lower '
                        'the copy limit (%s); raising it needs admin metadata', vid, key,
                        user, format_rate(limit) if limit else 'unlimited')
    return limit


def copy_bps_limit(volumes: Iterable[Any], operator_bps: int, key: str,
                   kind: str = OTHER, min_bps: int = 0) -> int:
    """The rate of a copy of ``kind`` touching ``volumes`` (e.g. both sides of a
    migration): the lowest of their limits, so each volume's owner gets at most what they
    asked for."""
    sources = LIMIT_SOURCES[kind]
    limits = [volume_bps_limit(v, operator_bps, key, sources, min_bps) for v in volumes]
    if not limits:
        return operator_bps
    return min((lim for lim in limits if lim), default=0)
