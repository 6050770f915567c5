"""Errors raised by cinder-cgroup-throttle.

Every error names the thing that was wrong (a path, a device, a cgroup file, a rate) so an
operator can act on the message alone.
"""


class ThrottleError(Exception):
    """Base class: a copy could not be throttled as configured."""


class DeviceResolutionError(ThrottleError):
    """A copy's source or destination path cannot be used (missing, unreadable, odd type)."""


class CgroupUnavailable(ThrottleError):
    """No usable blkio/io cgroup controller on this host (or it is not writable)."""


class CgroupOperationError(ThrottleError):
    """A cgroup file or directory operation failed."""


class InvalidRate(ThrottleError, ValueError):
    """A rate string or number is not a valid bytes-per-second value."""


class CopyNotFound(ThrottleError, LookupError):
    """No active copy has the given id."""


class PrivilegedHelperError(CgroupOperationError):
    """The root side of a non-root service (the privsep daemon) failed to start or died."""


class PrivilegedTimeout(PrivilegedHelperError):
    """A call into root did not finish within its deadline."""
