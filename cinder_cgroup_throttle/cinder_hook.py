"""Enable the throttle in a real cinder-volume: one configuration step, no Cinder edits.

In each backend section of cinder.conf::

    volume_driver = cinder_cgroup_throttle.cinder_hook.ThrottledDriver
    throttled_volume_driver = cinder.volume.drivers.lvm.LVMVolumeDriver   # the real one

Cinder builds ``volume_driver`` with ``importutils.import_object``; ThrottledDriver returns
an instance of a subclass of the real driver (same class name and module, so Cinder's
``isinstance`` checks, logs and stats are unchanged) whose ``set_throttle()``, which
``VolumeManager._init_host`` calls, installs a :class:`PolicyThrottle` as
``Throttle.get_default()`` for the whole process.

Knowing the volume of a copy: Cinder calls ``throttle.subcommand(src, dst)`` with paths
only. The volume is known one frame up, in the methods that start copies; they are
wrapped to record their volumes in a ``contextvars.ContextVar`` (per thread and per
greenthread, so concurrent copies never see each other's volumes) for their duration:

* ``VolumeManager._copy_volume_data(ctxt, src_vol, dest_vol)``: generic migration and
  retype; patched on the class once, when the first ThrottledDriver is built;
* the driver's ``create_cloned_volume``, ``create_volume_from_snapshot``,
  ``create_volume_from_backup``, ``copy_image_to_volume``, ``copy_volume_to_image``,
  ``migrate_volume``, ``retype`` and ``delete_volume`` (LVM's wipe of a deleted volume).

A copy started anywhere else sees no volume and gets the operator's limit.

The same wrappers record the copy's kind (``policy.LIMIT_SOURCES``), from the outermost
method: ``delete_volume`` is a wipe; ``migrate_volume``, ``retype`` and
``_copy_volume_data`` are an admin's migration when their context is an admin's, else a
tenant's retype; clones and image transfers by name.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import logging
import threading
import time
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from oslo_config import cfg
from oslo_utils import importutils

from cinder_cgroup_throttle import opts, policy, progress
from cinder_cgroup_throttle.exception import CopyNotFound
from cinder_cgroup_throttle.manager import CopyManager
from cinder_cgroup_throttle.throttle import CgroupThrottle
from cinder_cgroup_throttle.units import format_rate

LOG = logging.getLogger(__name__)

_volumes: contextvars.ContextVar[Tuple[Any, ...]] = contextvars.ContextVar(
    'cinder_cgroup_throttle_volumes', default=())
_kind: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    'cinder_cgroup_throttle_kind', default=None)

#: Driver methods that may copy data, and the kind of copy each starts (None: decided
#: by the context, see :func:`migration_kind`).
DRIVER_METHODS: Dict[str, Optional[str]] = {
    'create_cloned_volume': policy.CLONE, 'create_volume_from_snapshot': policy.CLONE,
    'create_volume_from_backup': policy.CLONE, 'copy_image_to_volume': policy.IMAGE,
    'copy_volume_to_image': policy.IMAGE, 'migrate_volume': None, 'retype': None,
    'delete_volume': policy.WIPE}
VOLUME_PARAMS = ('volume', 'src_vref')
CONTEXT_PARAMS = ('context', 'ctxt')


def migration_kind(ctxt: Any) -> str:
    """An admin's migration, or a tenant's retype (a non-admin or no context)."""
    return policy.MIGRATION if getattr(ctxt, 'is_admin', False) is True else policy.RETYPE


@contextlib.contextmanager
def copying(*volumes: Any, kind: Optional[str] = None) -> Iterator[None]:
    """Copies started inside this block are copies of ``volumes`` (the first one names
    the copy in the registry), of ``kind`` unless an enclosing block set one."""
    token = _volumes.set(tuple(v for v in volumes if v is not None) + _volumes.get())
    kind_token = _kind.set(_kind.get() or kind)
    try:
        yield
    finally:
        _kind.reset(kind_token)
        _volumes.reset(token)


def current_volumes() -> Tuple[Any, ...]:
    return _volumes.get()


def current_kind() -> str:
    return _kind.get() or policy.OTHER


def policy_view(volume: Any) -> Any:
    """What policy reads of ``volume``, fresh from the database: its metadata, its admin
    metadata and the back-end QoS specs of its type.

    Fresh, because an API change must reach a running copy (the watcher re-reads it);
    elevated, because Cinder loads admin metadata only for admin contexts while copies
    started for a user (image to volume, clone) carry the user's context. Read-only.
    """
    ctxt = getattr(volume, '_context', None)
    if ctxt is None or not hasattr(volume, 'obj_attr_is_set'):
        return volume  # not a Cinder object from the database: nothing more to read
    try:
        from cinder.db import api as db
        admin = ctxt.elevated()
        view = {'id': volume.id, 'metadata': db.volume_metadata_get(admin, volume.id),
                'admin_metadata': db.volume_admin_metadata_get(admin, volume.id)}
        type_id = volume.volume_type_id
        qos = db.volume_type_qos_specs_get(admin, type_id)['qos_specs'] if type_id else None
        if qos and qos.get('consumer') in policy.QOS_CONSUMERS:
            view['qos_specs'] = dict(qos.get('specs') or {})
        return view
    except Exception as exc:  # never fail a copy over metadata
        LOG.warning('volume %s: cannot read its metadata and QoS specs (%s); using what '
                    'the request loaded', policy.volume_id(volume), exc)
        return volume


class LimitWatcher:
    """Re-reads the policy inputs of running copies every ``interval`` seconds and
    re-limits a copy when its policy rate changed (metadata or a QoS spec changed through
    Cinder's API). One thread (a greenthread under eventlet), only while copies run.

    A rate set by hand (``set-limit``) stays until the policy's answer changes again.
    """

    def __init__(self, throttle: 'PolicyThrottle', interval: float) -> None:
        self.throttle = throttle
        self.interval = interval
        self._lock = threading.Lock()
        self._watched: Dict[str, Tuple[Tuple[Any, ...], str, int]] = {}
        self._thread: Optional[threading.Thread] = None

    @contextlib.contextmanager
    def watching(self, copy_id: str, volumes: Tuple[Any, ...], kind: str,
                 bps: int) -> Iterator[None]:
        with self._lock:
            self._watched[copy_id] = (volumes, kind, bps)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name='cinder-cgroup-throttle-watcher')
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._watched.pop(copy_id, None)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            with self._lock:
                if not self._watched:
                    self._thread = None
                    return
                watched = dict(self._watched)
            for copy_id, (volumes, kind, last) in watched.items():
                try:
                    self._check(copy_id, volumes, kind, last)
                except Exception:  # the watcher must outlive any one failure
                    LOG.exception('copy %s: re-reading its limit failed', copy_id)

    def _check(self, copy_id: str, volumes: Tuple[Any, ...], kind: str, last: int) -> None:
        bps = self.throttle.policy_bps(volumes, kind)
        if bps == last:
            return
        with self._lock:
            if copy_id not in self._watched:
                return  # ended meanwhile
            self._watched[copy_id] = (volumes, kind, bps)
        if not bps:
            LOG.warning('copy %s: its policy now allows an unlimited rate; a running copy '
                        'keeps a limit (%s before)', copy_id, format_rate(last))
            return
        try:
            copy = self.throttle.manager.set_limit(copy_id, bps)
        except CopyNotFound:
            return
        LOG.info('copy %s of volume %s: policy limit changed through the API: %s -> %s '
                 '(in force: %s)', copy_id, copy.volume_id,
                 format_rate(last) if last else 'unlimited', format_rate(bps),
                 format_rate(copy.bps_limit))


class PolicyThrottle(CgroupThrottle):
    """CgroupThrottle whose rate per copy comes from policy: config, then volume metadata."""

    def __init__(self, config: policy.ThrottleConfig,
                 manager: Optional[CopyManager] = None, poll_interval: float = 0.0) -> None:
        self.config = config
        self.watcher = LimitWatcher(self, poll_interval) if poll_interval > 0 else None
        if manager is not None:
            super().__init__(config.bps_limit, manager=manager)
            return
        static = config.static
        super().__init__(config.bps_limit, cgroup_name=config.cgroup_name,
                         backend=config.backend, allow_unthrottled=config.allow_unthrottled,
                         host_bps_limit=config.host_bps_limit,
                         read_bps_limit=static.read_bps, write_bps_limit=static.write_bps,
                         read_iops_limit=static.read_iops, write_iops_limit=static.write_iops,
                         budget_config=config.budget)

    def policy_bps(self, volumes: Tuple[Any, ...], kind: str) -> int:
        """The policy's rate for a copy of ``kind`` of ``volumes``, from their current
        state (the copy kind decides which sources apply, user metadata keeps the floor)."""
        if self.config.metadata_key:
            volumes = tuple(policy_view(v) for v in volumes)
        return policy.copy_bps_limit(volumes, self.config.bps_limit, self.config.metadata_key,
                                     kind=kind, min_bps=self.config.min_bps)

    @contextlib.contextmanager
    def subcommand(self, srcpath: str, dstpath: str) -> Iterator[Dict[str, Any]]:
        volumes = current_volumes()
        kind = current_kind()
        bps = self.policy_bps(volumes, kind)
        if not self._throttled(bps):
            yield {'prefix': []}
            return
        vid = policy.volume_id(volumes[0]) if volumes else None
        with self.manager.copy(srcpath, dstpath, bps, volume_id=vid) as copy:
            if self.watcher and volumes and self.config.metadata_key:
                with self.watcher.watching(copy.id, volumes, kind, bps):
                    yield {'prefix': list(copy.prefix)}
            else:
                yield {'prefix': list(copy.prefix)}

    def migration_progress(self, volume: Any) -> str:
        """``volume``'s migration progress: 'NA', '0%', the copied percent, '100%'."""
        return progress.volume_progress(
            self.manager.registry, volume.id,
            getattr(volume, 'migration_status', None)).text


def _with_volumes(method: Callable[..., Any], kind: Optional[str]) -> Callable[..., Any]:
    signature = inspect.signature(method)

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(self, *args, **kwargs).arguments
        except TypeError:  # let the real method report the bad call
            return method(self, *args, **kwargs)
        ctxt = next((bound[n] for n in CONTEXT_PARAMS if n in bound), None)
        with copying(*(bound.get(name) for name in VOLUME_PARAMS),
                     kind=kind or migration_kind(ctxt)):
            return method(self, *args, **kwargs)

    wrapper.__cinder_cgroup_throttle__ = True  # type: ignore[attr-defined]
    return wrapper


class _ThrottleHook:
    """Mixed in front of the real driver class."""

    configuration: Any
    _throttle: Any

    def set_throttle(self) -> None:
        from cinder.volume import throttling
        group = getattr(self.configuration, 'config_group', None)
        config = policy.load_config(cfg.CONF, group)
        self._throttle = PolicyThrottle(
            config, poll_interval=policy.lookup(cfg.CONF, 'volume_copy_limit_poll_interval',
                                                group))
        throttling.Throttle.set_default(self._throttle)
        LOG.info('volume copies of backend %s are throttled per copy: %s', group or
                 'DEFAULT', config)

    def get_migrate_volume_progress(self, context: Any, volume: Any) -> str:
        """Progress of ``volume``'s migration copy in this process: 'NA' before a copy
        is known, '0%' while starting, the copied percent, '100%' once done."""
        throttle = getattr(self, '_throttle', None)
        if not isinstance(throttle, PolicyThrottle):
            return 'NA'
        return throttle.migration_progress(volume)


_subclasses: Dict[type, type] = {}
_subclass_lock = threading.Lock()


def throttled_class(real: type) -> type:
    """The real driver class with our set_throttle() and volume-aware copy methods."""
    with _subclass_lock:
        if real not in _subclasses:
            namespace: Dict[str, Any] = {'__module__': real.__module__,
                                         '__qualname__': real.__qualname__}
            for name, kind in DRIVER_METHODS.items():
                method = getattr(real, name, None)
                if callable(method):
                    namespace[name] = _with_volumes(method, kind)
            _subclasses[real] = type(real.__name__, (_ThrottleHook, real), namespace)
        return _subclasses[real]


def install_manager_hook() -> None:
    """Make ``VolumeManager._copy_volume_data`` record its volumes (idempotent)."""
    from cinder.volume import manager
    original = manager.VolumeManager._copy_volume_data
    if getattr(original, '__cinder_cgroup_throttle__', False):
        return

    @functools.wraps(original)
    def _copy_volume_data(self: Any, ctxt: Any, src_vol: Any, dest_vol: Any,
                          *args: Any, **kwargs: Any) -> Any:
        with copying(src_vol, dest_vol, kind=migration_kind(ctxt)):
            return original(self, ctxt, src_vol, dest_vol, *args, **kwargs)

    _copy_volume_data.__cinder_cgroup_throttle__ = True  # type: ignore[attr-defined]
    manager.VolumeManager._copy_volume_data = _copy_volume_data

    original_migrate = manager.VolumeManager.migrate_volume

    @functools.wraps(original_migrate)
    def migrate_volume(self: Any, ctxt: Any, volume: Any, *args: Any, **kwargs: Any) -> Any:
        # Progress of this migration must not read the end of an earlier copy as 100%.
        throttle = getattr(getattr(self, 'driver', None), '_throttle', None)
        if isinstance(throttle, PolicyThrottle):
            progress.forget_finished(throttle.manager.registry, volume.id)
        return original_migrate(self, ctxt, volume, *args, **kwargs)

    manager.VolumeManager.migrate_volume = migrate_volume


class ThrottledDriver:
    """``volume_driver`` value that builds ``throttled_volume_driver`` with our throttle."""

    def __new__(cls, *args: Any, configuration: Any = None, **kwargs: Any) -> Any:
        if configuration is not None:
            configuration.append_config_values(opts.hook_opts)
            real_path = configuration.safe_get('throttled_volume_driver')
        else:
            cfg.CONF.register_opts(opts.hook_opts)
            real_path = cfg.CONF.throttled_volume_driver
        if not real_path:
            raise ValueError('volume_driver is %s.%s but throttled_volume_driver (the real '
                             'driver class) is not set' % (__name__, cls.__name__))
        real = importutils.import_class(real_path)
        if issubclass(real, (ThrottledDriver, _ThrottleHook)):
            raise ValueError('throttled_volume_driver must be the real driver class, not '
                             '%s' % real_path)
        install_manager_hook()
        return throttled_class(real)(*args, configuration=configuration, **kwargs)
