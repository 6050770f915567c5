"""No limit: the copy runs as its command is (no rate configured, or the operator allowed
unthrottled copies where nothing else can throttle)."""
from __future__ import annotations

import logging
from typing import List, Tuple

from cinder_cgroup_throttle.backends.base import NOTHING_DONE, Action, CopyBackend, Done
from cinder_cgroup_throttle.registry import Entry

LOG = logging.getLogger(__name__)


class NoneBackend(CopyBackend):
    name = 'none'
    throttles = False

    def start(self, entry: Entry) -> List[str]:
        return []

    def set_rate(self, entry: Entry, bps: int) -> None:
        LOG.warning('copy %s runs unthrottled (%s): nothing to re-limit',
                    entry.id, entry.reason)

    def bytes_done(self, entry: Entry) -> Done:
        return NOTHING_DONE

    def stop(self, entry: Entry, grace: float) -> None:
        pass

    def reclaim(self, entry: Entry, dry_run: bool) -> Tuple[bool, List[Action]]:
        return True, []
