"""On-disk registry of active copies, so other processes (CLI, monitoring) can see them.

One JSON file per copy in a state directory (default ``/run/cinder-cgroup-throttle``, a
tmpfs that a reboot empties). Files are replaced atomically; the owner's pid and process
start time let a cleanup tell an entry whose owner died from one whose pid was reused.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

import psutil

from cinder_cgroup_throttle.cgroups.base import DeviceLimit
from cinder_cgroup_throttle.devices import BlockDevice
from cinder_cgroup_throttle.sharing import StaticLimits, device_limits
from cinder_cgroup_throttle.statefiles import (BUDGET_NAME, COPY_ID, FINISHED_NAME, LOCK_NAME,
                                               STATE_NAME, TEMP_NAME, ForeignFile, StateDir)

LOG = logging.getLogger(__name__)

DEFAULT_STATE_DIR = '/run/cinder-cgroup-throttle'
STATE_DIR_ENV = 'CINDER_CGROUP_THROTTLE_STATE_DIR'


def state_dir(explicit: Optional[str] = None) -> str:
    return explicit or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR


def process_start_time(pid: int) -> Optional[float]:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def process_alive(pid: int, started_by: Optional[float]) -> bool:
    """Is ``pid`` the process that existed at time ``started_by`` (None: any process)?
    A process that started later is a reused pid; one we may not inspect counts as alive
    (never clean up after a live owner)."""
    try:
        created = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True
    return started_by is None or created <= started_by + 1.0  # create_time's resolution


@functools.lru_cache(maxsize=256)
def _kernel_name(majmin: str) -> str:
    """A disk's kernel name, for messages (the number is what counts). Cached: every
    start, re-limit and re-balance asks again for the same few disks."""
    try:
        return os.path.basename(os.readlink('/sys/dev/block/' + majmin))
    except OSError:
        return majmin


@dataclasses.dataclass
class Entry:
    """The one record of a running copy: what every process (its owner included) knows
    of it; in-process state is only a cache of it."""

    id: str
    owner_pid: int
    owner_start: Optional[float]
    src: str
    dst: str
    src_dev: Optional[str]
    dst_dev: Optional[str]
    bps_limit: int
    backend: str
    reason: str
    started: float
    volume_id: Optional[str] = None
    cgroup: Optional[str] = None  # 'controller:parent/leaf' for the cgroup backend
    mountpoint: Optional[str] = None  # cgroup hierarchy mount for the cgroup backend
    total_bytes: Optional[int] = None
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)
    # Whether a side was a file on that disk: decides the limit's direction (limits.py).
    src_via_file: bool = False
    dst_via_file: bool = False

    def devices(self) -> Tuple[Optional[BlockDevice], Optional[BlockDevice]]:
        """(source, destination) disks as the owner resolved them."""
        def device(majmin: Optional[str], via_file: bool) -> Optional[BlockDevice]:
            if not majmin:
                return None
            major, minor = (int(n) for n in majmin.split(':'))
            return BlockDevice(major, minor, _kernel_name(majmin), via_file=via_file)
        return (device(self.src_dev, self.src_via_file),
                device(self.dst_dev, self.dst_via_file))

    def static_limits(self) -> StaticLimits:
        """The per-direction limits the owner configured (relimit.policy_extra)."""
        return StaticLimits(**self.extra.get('static', {}))

    def device_limits(self, bps: Optional[int] = None) -> List[DeviceLimit]:
        """The device limits at ``bps`` (default: the rate in force), computed the same in
        every process (sharing.device_limits)."""
        return device_limits(*self.devices(), self.bps_limit if bps is None else bps,
                             self.static_limits())

    def owner_alive(self) -> bool:
        return process_alive(self.owner_pid, self.owner_start)

    @classmethod
    def parse(cls, data: Dict[str, Any], name: str, directory: str) -> 'Entry':
        """The entry in file ``name``, every field type-checked; ForeignFile otherwise.

        The id must be the file's name (an id is used in paths and cgroup names)."""
        def bad(reason: str) -> ForeignFile:
            return ForeignFile(directory, name, reason)
        unknown = set(data) - set(FIELD_CHECKS)
        if unknown:
            raise bad('unknown fields %s' % ', '.join(sorted(map(repr, unknown))))
        for field in dataclasses.fields(cls):
            required = (field.default is dataclasses.MISSING
                        and field.default_factory is dataclasses.MISSING)
            if field.name not in data:
                if required:
                    raise bad('no field %r' % field.name)
                continue
            if not FIELD_CHECKS[field.name](data[field.name]):
                raise bad('field %r: invalid value %.60r' % (field.name, data[field.name]))
        if data['id'] + '.json' != name:
            raise bad('its id %.60r is not its file name' % data['id'])
        return cls(**data)


# -- type checks of an entry's fields (state files are data from an untrusted writer) ----
_MAJMIN = re.compile(r'^([0-9]{1,4}):([0-9]{1,7})\Z')
_MAX_U64 = 2**64 - 1


def _int(low: int = 0, high: int = _MAX_U64) -> Callable[[Any], bool]:
    return lambda v: type(v) is int and low <= v <= high


def _number(v: Any) -> bool:
    return type(v) in (int, float) and 0 <= v < 2**63


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _str(v: Any) -> bool:
    return type(v) is str and '\0' not in v


def _known_backend(name: str) -> bool:
    from cinder_cgroup_throttle import backends  # lazy: the backends read entries
    return name in backends.NAMES


def _majmin(v: Any) -> bool:
    match = _str(v) and _MAJMIN.match(v)
    return bool(match) and int(match.group(1)) < 2**12 and int(match.group(2)) < 2**20


_STATIC_KEYS = ('read_bps', 'write_bps', 'read_iops', 'write_iops')


def _extra(v: Any) -> bool:
    """Known keys (relimit.policy_extra) typed; other keys, for newer writers, kept."""
    if type(v) is not dict or not all(type(k) is str for k in v):
        return False
    static = v.get('static', {})
    return (all(_int()(v[k]) for k in ('requested_bps', 'host_bps_limit') if k in v)
            and (v.get('budget_bps') is None or _int()(v['budget_bps']))  # budget.py
            and type(static) is dict and set(static) <= set(_STATIC_KEYS)
            and all(_int()(n) for n in static.values()))


#: One check per Entry field; a field without a check makes every entry foreign
#: (tests/unit/test_statefiles.py keeps the two in step).
FIELD_CHECKS: Dict[str, Callable[[Any], bool]] = {
    'id': lambda v: _str(v) and bool(COPY_ID.match(v)),
    'owner_pid': _int(1, 2**22),
    'owner_start': _optional(_number),
    'src': _str, 'dst': _str,
    'src_dev': _optional(_majmin), 'dst_dev': _optional(_majmin),
    'bps_limit': _int(),
    'backend': lambda v: _str(v) and _known_backend(v),
    'reason': _str,
    'started': _number,
    'volume_id': _optional(_str),
    'cgroup': _optional(_str),
    'mountpoint': _optional(_str),
    'total_bytes': _optional(_int()),
    'extra': _extra,
    'src_via_file': lambda v: type(v) is bool,
    'dst_via_file': lambda v: type(v) is bool,
}


class Registry:
    def __init__(self, directory: Optional[str] = None) -> None:
        self.directory = state_dir(directory)
        self.files = StateDir(self.directory)

    def save(self, entry: Entry) -> None:
        if not COPY_ID.match(entry.id):
            raise ForeignFile(self.directory, entry.id, 'not a copy id')
        self.files.makedirs()
        # World-readable, so a non-root status/cinder-volume reads what root re-saved.
        self.files.write_json(entry.id + '.json', dataclasses.asdict(entry))

    def remove(self, copy_id: str) -> None:
        self.files.remove(copy_id + '.json')

    def read(self, copy_id: str) -> Optional[Entry]:
        """The entry of ``copy_id``; None when there is none, ForeignFile when the file
        is not a valid entry."""
        name = copy_id + '.json'
        try:
            return Entry.parse(self.files.read_json(name), name, self.directory)
        except FileNotFoundError:
            return None

    def load(self, copy_id: str) -> Optional[Entry]:
        """Like :meth:`read`, but a foreign file is logged and counts as no entry."""
        try:
            return self.read(copy_id)
        except ForeignFile as exc:
            LOG.warning('%s', exc)
            return None

    def scan(self) -> Tuple[List[Entry], List[ForeignFile]]:
        """Every valid entry, and every file that is neither an entry nor another file of
        ours (pipeline state, rate request, temporary file, lock)."""
        found: List[Entry] = []
        foreign: List[ForeignFile] = []
        for name in self.files.names():
            match = STATE_NAME.match(name)
            if match and match.group(2) == 'json':
                try:
                    entry = self.read(match.group(1))
                except ForeignFile as exc:
                    foreign.append(exc)
                    continue
                if entry is not None:
                    found.append(entry)
            elif not (match or TEMP_NAME.match(name) or name == LOCK_NAME
                      or BUDGET_NAME.match(name) or FINISHED_NAME.match(name)):
                foreign.append(ForeignFile(self.directory, name,
                                           'not a name this package uses'))
        return found, foreign

    def entries(self) -> List[Entry]:
        """Every valid entry; foreign files are logged and left alone."""
        found, foreign = self.scan()
        for exc in foreign:
            LOG.warning('%s', exc)
        return found
