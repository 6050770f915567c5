"""Cinder's LVM driver with its volumes attached locally, for the VM lane's end-to-end tests.

The only change to ``LVMVolumeDriver``: ``initialize_connection`` returns os-brick's
``local`` connection (the LV's device path) instead of an iSCSI target. In production the
copy host reaches a volume over iSCSI/FC; the VM lane has no iSCSI initiator, and the
attachment is not what these tests are about: the copies, the throttle, the states are
Cinder's own. Cinder's manager connects through os-brick's LocalConnector as it does for
any protocol.
"""
from __future__ import annotations

from typing import Any, Dict

from cinder.volume.drivers.lvm import LVMVolumeDriver


class LocalAttachLVMDriver(LVMVolumeDriver):
    def validate_connector(self, connector: Dict[str, Any]) -> None:
        return None  # an iSCSI target would need the connector's initiator name

    def initialize_connection(self, volume: Any, connector: Dict[str, Any]) -> Dict[str, Any]:
        return {'driver_volume_type': 'local',
                'data': {'device_path': self.local_path(volume)}}

    def terminate_connection(self, volume: Any, connector: Dict[str, Any], **kwargs: Any) -> None:
        return None
