"""Resolve a copy's source or destination path to the block device that carries its I/O.

blk-throttle limits are keyed by MAJ:MIN of a whole disk (partitions are refused with
ENODEV on v1 and rejected on v2), so every path is mapped to the disk whose request queue
sees the copy's bios:

* block devices (after following symlinks such as /dev/mapper/* or /dev/disk/by-*) -> itself,
  or its parent disk if it is a partition (sysfs via pyudev, never a name pattern);
* regular files -> the device of their filesystem (``st_dev``); major 0 (btrfs' anonymous
  numbers) -> the mount source in /proc/self/mountinfo when that is a block device;
* tmpfs, NFS, overlay, CIFS, character devices (/dev/zero) -> ``None``: nothing to throttle;
* a destination that does not exist yet -> the filesystem of its directory.
"""
from __future__ import annotations

import dataclasses
import os
import stat
from typing import Optional

import pyudev

from cinder_cgroup_throttle.exception import DeviceResolutionError

MOUNTINFO = '/proc/self/mountinfo'


@dataclasses.dataclass(frozen=True)
class BlockDevice:
    """A whole disk, as blk-throttle wants it."""

    major: int
    minor: int
    name: str  # kernel name, e.g. 'loop3', 'dm-0', 'nvme0n1'
    # True when the path was a file (or a file to be created) on this disk's filesystem:
    # its writes may be buffered, and v1 does not charge writeback to the writer.
    via_file: bool = dataclasses.field(default=False, compare=False)

    @property
    def majmin(self) -> str:
        return '%d:%d' % (self.major, self.minor)

    def __str__(self) -> str:
        return '%s (%s)' % (self.name, self.majmin)


_context: Optional[pyudev.Context] = None


def _udev() -> pyudev.Context:
    global _context
    if _context is None:
        _context = pyudev.Context()
    return _context


def whole_disk(devnum: int) -> BlockDevice:
    """Return the disk that owns block device number ``devnum`` (itself unless a partition)."""
    try:
        dev = pyudev.Devices.from_device_number(_udev(), 'block', devnum)
    except pyudev.DeviceNotFoundError as exc:
        raise DeviceResolutionError(
            'block device %d:%d is not known to sysfs: %s'
            % (os.major(devnum), os.minor(devnum), exc)) from exc
    if dev.device_type == 'partition':
        parent = dev.find_parent('block', 'disk')
        if parent is None:
            raise DeviceResolutionError(
                'partition %s has no parent disk in sysfs' % dev.sys_name)
        dev = parent
    return BlockDevice(os.major(dev.device_number), os.minor(dev.device_number),
                       dev.sys_name)


def _unescape_mountinfo(field: str) -> str:
    return (field.replace('\\040', ' ').replace('\\011', '\t')
            .replace('\\012', '\n').replace('\\134', '\\'))


def mount_source(path: str) -> Optional[str]:
    """Mount source of the filesystem holding ``path`` (its innermost mount).

    Matching by path rather than by st_dev: btrfs gives each subvolume its own anonymous
    device number, which differs from the one mountinfo lists for the mount.
    """
    best, source = -1, None
    with open(MOUNTINFO) as f:
        for line in f:
            fields = line.split()
            point = _unescape_mountinfo(fields[4])
            inside = path == point or path.startswith(point.rstrip('/') + '/')
            if inside and len(point) >= best:  # later lines stack on earlier ones
                sep = fields.index('-')
                best, source = len(point), _unescape_mountinfo(fields[sep + 2])
    return source


def _filesystem_device(path: str, st_dev: int) -> Optional[BlockDevice]:
    dev = _filesystem_disk(path, st_dev)
    return dataclasses.replace(dev, via_file=True) if dev else None


def _filesystem_disk(path: str, st_dev: int) -> Optional[BlockDevice]:
    if os.major(st_dev) != 0:
        return whole_disk(st_dev)
    # Anonymous device: tmpfs, NFS, overlay (nothing to throttle) or btrfs (mount source).
    source = mount_source(path)
    if source and source.startswith('/'):
        try:
            st = os.stat(source)
        except OSError:
            return None
        if stat.S_ISBLK(st.st_mode):
            return whole_disk(st.st_rdev)
    return None


def resolve(path: str, must_exist: bool = True) -> Optional[BlockDevice]:
    """Return the disk carrying ``path``'s I/O, or None when no block device does.

    ``must_exist=False`` is for destinations that the copy tool creates (qemu-img): the
    directory that will hold the file decides.
    """
    if not path:
        raise DeviceResolutionError('empty path')
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        if must_exist:
            raise DeviceResolutionError('%s does not exist' % path) from None
        parent = os.path.dirname(real) or '/'
        try:
            st = os.stat(parent)
        except OSError as exc:
            raise DeviceResolutionError(
                'neither %s nor its directory %s exist: %s' % (path, parent, exc)) from exc
        if not stat.S_ISDIR(st.st_mode):
            raise DeviceResolutionError('%s: %s is not a directory' % (path, parent))
        return _filesystem_device(parent, st.st_dev)
    except OSError as exc:
        raise DeviceResolutionError('cannot stat %s: %s' % (path, exc)) from exc
    if stat.S_ISBLK(st.st_mode):
        return whole_disk(st.st_rdev)
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        return _filesystem_device(real, st.st_dev)
    if stat.S_ISCHR(st.st_mode):
        return None
    raise DeviceResolutionError(
        '%s is neither a block device, a character device nor a regular file' % path)
