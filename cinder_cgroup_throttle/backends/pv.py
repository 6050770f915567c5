"""The pv fallback: the copy's command runs inside our wrapper, which paces it with pv.

For copies no cgroup can throttle (no controller, read-only cgroupfs, neither side on a
block device). The wrapper (``cinder-cgroup-throttle-pipe``, pipeline.py) takes one rate
and publishes its state next to the registry entry (``<id>.pipe.json``); a rate change is
a request file it applies with ``pv -R`` (``pipeline.request_rate``).
"""
from __future__ import annotations

import shutil
from typing import List, Optional, Tuple

from cinder_cgroup_throttle import pipeline
from cinder_cgroup_throttle.backends.base import NOTHING_DONE, Action, CopyBackend, Done
from cinder_cgroup_throttle.cgroups.base import DeviceLimit
from cinder_cgroup_throttle.exception import ThrottleError
from cinder_cgroup_throttle.privileged import PIPE_COMMAND
from cinder_cgroup_throttle.registry import Entry, process_alive
from cinder_cgroup_throttle.sharing import pipe_rate
from cinder_cgroup_throttle.statefiles import ForeignFile


class PvBackend(CopyBackend):
    name = 'pv'

    def unusable(self, bps: int, limits: List[DeviceLimit]) -> Optional[str]:
        """Why the fallback cannot throttle a copy at ``bps`` with ``limits``; None if it can."""
        if not (self.executor.pipe_command() and shutil.which('pv')):
            return ('the pv fallback is not available (install pv and this package\'s %s)'
                    % PIPE_COMMAND)
        if not pipe_rate(bps, limits):
            return ('only IOPS limits apply, which the pv fallback cannot enforce (set '
                    'volume_copy_read_bps_limit or volume_copy_write_bps_limit too)')
        return None

    def start(self, entry: Entry) -> List[str]:
        command = self.executor.pipe_command()
        if command is None:
            raise ThrottleError('copy %s: the pv fallback\'s %s is not installed'
                                % (entry.id, PIPE_COMMAND))
        return [command, '--id', entry.id,
                '--rate', str(pipe_rate(entry.bps_limit, entry.device_limits())),
                '--state-dir', self.state_dir, '--']

    def set_rate(self, entry: Entry, bps: int) -> None:
        # pv enforces the lowest bytes/s that applies.
        rate = pipe_rate(bps, entry.device_limits(bps))
        try:  # a pipeline not running yet applies the request as it starts
            pipeline.request_rate(self.state_dir, entry.id, rate)
        except (RuntimeError, ValueError) as exc:
            raise ThrottleError('cannot re-limit copy %s: %s' % (entry.id, exc)) from exc

    def bytes_done(self, entry: Entry) -> Done:
        """The pipeline publishes its copier's byte count (every POLL seconds)."""
        try:
            done = (pipeline.read_pipe_state(self.state_dir, entry.id) or {}).get('bytes')
        except ThrottleError:  # a foreign pipe.json: no progress known
            return NOTHING_DONE
        return NOTHING_DONE if done is None else (int(done), 'pv', [])

    def stop(self, entry: Entry, grace: float) -> None:
        # The pipeline removes its state when it ends; not when it was killed.
        pipeline.remove_state(self.state_dir, entry.id)

    def reclaim(self, entry: Entry, dry_run: bool) -> Tuple[bool, List[Action]]:
        try:
            if self.pipeline_alive(entry.id):
                return False, [Action('registry', entry.id, 'kept', 'owner pid %d is gone, '
                                      'but its pv pipeline runs on' % entry.owner_pid)]
        except ForeignFile as exc:
            return False, [Action('registry', entry.id, 'kept', str(exc))]
        return True, []

    def pipeline_alive(self, copy_id: str) -> bool:
        """Whether the copy's wrapper still runs; ForeignFile when its state is not one
        a pipeline wrote."""
        state = pipeline.read_pipe_state(self.state_dir, copy_id)
        return state is not None and process_alive(state['wrapper_pid'], state['started'])
