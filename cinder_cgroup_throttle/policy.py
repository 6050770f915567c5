"""The effective limits of a copy: operator configuration, then per-volume metadata.

Configuration lookup, per option: the backend's section, then ``[backend_defaults]``, then
``[DEFAULT]``; the first section where the option is *explicitly set* wins, so an explicit
``volume_copy_bps_limit = 0`` in a backend section turns throttling off for that backend
(Cinder's ``value or CONF.value`` cannot express that).

Metadata: users may set volume metadata, so a rate in user metadata can only *lower* the
operator's limit; a rate in admin metadata (settable only with admin rights) replaces it.
The same key in the back-end QoS specs of the volume's type (admin-only too) replaces the
operator's limit for every volume of the type; a volume's admin metadata overrides it.
An invalid value is logged and ignored: metadata never fails a copy.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable, Mapping, Optional

from oslo_config import cfg

from cinder_cgroup_throttle import opts
from cinder_cgroup_throttle.exception import InvalidRate
from cinder_cgroup_throttle.sharing import StaticLimits
from cinder_cgroup_throttle.units import format_rate, parse_rate

LOG = logging.getLogger(__name__)

_NOT_SET = (cfg.Locations.opt_default, cfg.Locations.set_default)
#: QoS specs consumers whose specs the back end applies (Cinder's; 'front-end' is Nova's).
QOS_CONSUMERS = ('back-end', 'both')


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
        bps_limit=get('volume_copy_bps_limit'),
        static=StaticLimits(read_bps=get('volume_copy_read_bps_limit'),
                            write_bps=get('volume_copy_write_bps_limit'),
                            read_iops=get('volume_copy_read_iops_limit'),
                            write_iops=get('volume_copy_write_iops_limit')),
        host_bps_limit=get('volume_copy_host_bps_limit'),
        cgroup_name=get('volume_copy_blkio_cgroup_name'),
        backend=get('volume_copy_throttle_backend'),
        allow_unthrottled=get('volume_copy_allow_unthrottled'),
        metadata_key=(get('volume_copy_bps_limit_metadata_key') or '').strip())


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


def volume_bps_limit(volume: Any, operator_bps: int, key: str) -> int:
    """The rate for copies of ``volume``: 0 means unlimited (as in the options)."""
    if not key:
        return operator_bps
    vid = volume_id(volume)
    limit = operator_bps
    qos = _metadata(volume, 'qos_specs').get(key)  # admin-only, like admin metadata
    if qos is not None:
        parsed = _parse_metadata_rate(volume, 'back-end QoS spec', key, qos)
        if parsed is not None:
            limit = parsed
    admin = _metadata(volume, 'admin_metadata').get(key)
    if admin is not None:
        parsed = _parse_metadata_rate(volume, 'admin metadata', key, admin)
        if parsed is not None:
            limit = parsed
            LOG.info('volume %s: admin metadata %s sets the copy limit to %s', vid, key,
                     format_rate(limit) if limit else 'unlimited')
    user = _metadata(volume, 'metadata').get(key)
    if user is not None:
        parsed = _parse_metadata_rate(volume, 'metadata', key, user)
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


def copy_bps_limit(volumes: Iterable[Any], operator_bps: int, key: str) -> int:
    """The rate of a copy touching ``volumes`` (e.g. both sides of a migration): the
    lowest of their limits, so each volume's owner gets at most what they asked for."""
    limits = [volume_bps_limit(v, operator_bps, key) for v in volumes]
    if not limits:
        return operator_bps
    return min((lim for lim in limits if lim), default=0)
