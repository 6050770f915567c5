"""On-disk registry of active copies, so other processes (CLI, monitoring) can see them.

One JSON file per copy in a state directory (default ``/run/cinder-cgroup-throttle``, a
tmpfs that a reboot empties). Files are replaced atomically; the owner's pid and process
start time let a cleanup tell an entry whose owner died from one whose pid was reused.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any, Dict, List, Optional

import psutil

DEFAULT_STATE_DIR = '/run/cinder-cgroup-throttle'
STATE_DIR_ENV = 'CINDER_CGROUP_THROTTLE_STATE_DIR'


def state_dir(explicit: Optional[str] = None) -> str:
    return explicit or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR


def process_start_time(pid: int) -> Optional[float]:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


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

    def owner_alive(self) -> bool:
        start = process_start_time(self.owner_pid)
        return start is not None and (self.owner_start is None
                                      or abs(start - self.owner_start) < 1.0)


class Registry:
    def __init__(self, directory: Optional[str] = None) -> None:
        self.directory = state_dir(directory)

    def _path(self, copy_id: str) -> str:
        return os.path.join(self.directory, copy_id + '.json')

    def save(self, entry: Entry) -> None:
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix='.' + entry.id, dir=self.directory)
        try:
            with os.fdopen(fd, 'w') as f:
                json.dump(dataclasses.asdict(entry), f)
            os.replace(tmp, self._path(entry.id))
        except BaseException:
            os.unlink(tmp)
            raise

    def remove(self, copy_id: str) -> None:
        try:
            os.unlink(self._path(copy_id))
        except FileNotFoundError:
            pass

    def load(self, copy_id: str) -> Optional[Entry]:
        try:
            with open(self._path(copy_id)) as f:
                return Entry(**json.load(f))
        except (FileNotFoundError, ValueError, TypeError):
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
