"""On-disk registry of active copies, so other processes (CLI, monitoring) can see them.

One JSON file per copy in a state directory (default ``/run/cinder-cgroup-throttle``, a
tmpfs that a reboot empties). Files are replaced atomically; the owner's pid and process
start time let a cleanup tell an entry whose owner died from one whose pid was reused.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Tuple

import psutil

from cinder_cgroup_throttle.devices import BlockDevice
from cinder_cgroup_throttle.statefiles import write_json

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


@dataclasses.dataclass
class Entry:
    """What another process needs to know about a copy."""

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
            return BlockDevice(major, minor, majmin, via_file=via_file)
        return (device(self.src_dev, self.src_via_file),
                device(self.dst_dev, self.dst_via_file))

    def owner_alive(self) -> bool:
        return process_alive(self.owner_pid, self.owner_start)


class Registry:
    def __init__(self, directory: Optional[str] = None) -> None:
        self.directory = state_dir(directory)

    def _path(self, copy_id: str) -> str:
        return os.path.join(self.directory, copy_id + '.json')

    def save(self, entry: Entry) -> None:
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        # World-readable, so a non-root status/cinder-volume reads what root re-saved.
        write_json(self._path(entry.id), dataclasses.asdict(entry))

    def remove(self, copy_id: str) -> None:
        try:
            os.unlink(self._path(copy_id))
        except FileNotFoundError:
            pass

    def load(self, copy_id: str) -> Optional[Entry]:
        try:
            with open(self._path(copy_id)) as f:
                return Entry(**json.load(f))
        except (OSError, ValueError, TypeError):  # gone, unreadable or not an entry
            return None

    def entries(self) -> List[Entry]:
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            # '<id>.json' only: ids have no dots; '<id>.pipe.json' is the pipeline's state.
            if name.endswith('.json') and name.count('.') == 1 and not name.startswith('.'):
                entry = self.load(name[:-len('.json')])
                if entry is not None:
                    found.append(entry)
        return found
