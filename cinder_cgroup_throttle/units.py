"""Parse and format byte rates.

Accepted: a plain integer (bytes/s), or a number with a unit. ``K``, ``M``, ``G``, ``T``
(also ``KB``, ``MB``...) are decimal (1000-based, as disk vendors count); ``Ki``, ``Mi``,
``Gi``, ``Ti`` (also ``KiB``...) are binary (1024-based). A trailing ``/s`` is allowed.
Examples: ``8388608``, ``8Mi``, ``8MiB/s``, ``10M``, ``1.5Gi``.
"""
from __future__ import annotations

import re

from cinder_cgroup_throttle.exception import InvalidRate

_UNITS = {'': 1, 'k': 10**3, 'm': 10**6, 'g': 10**9, 't': 10**12,
          'ki': 2**10, 'mi': 2**20, 'gi': 2**30, 'ti': 2**40}
_RATE = re.compile(r'^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?(?:/s)?\s*\Z', re.IGNORECASE)
#: The kernel's limits are u64 (a larger value would wrap: 2**64 + 1000 -> 1000 B/s).
MAX_RATE = 2**64 - 1


def parse_rate(value: object, what: str = 'rate') -> int:
    """Return ``value`` as whole bytes per second; InvalidRate names what was wrong."""
    if isinstance(value, bool):
        raise InvalidRate('%s must be bytes per second, not %r' % (what, value))
    if isinstance(value, int):
        if value < 0:
            raise InvalidRate('%s must not be negative: %d' % (what, value))
        return _bounded(value, what)
    if not isinstance(value, str):
        raise InvalidRate('%s must be a number or a string such as "8Mi", not %r'
                          % (what, value))
    match = _RATE.match(value)
    if not match:
        raise InvalidRate('%s %r is not a rate: use bytes/s or a number with K, M, G, T '
                          '(x1000) or Ki, Mi, Gi, Ti (x1024), e.g. "8Mi"' % (what, value))
    number, unit = match.group(1), (match.group(2) or '').lower()
    if len(number) > 40:
        raise InvalidRate('%s %.40r... is too large (at most %d bytes/s)'
                          % (what, value, MAX_RATE))
    if '.' not in number:  # exact for integers of any size; float loses beyond 2**53
        return _bounded(int(number) * _UNITS[unit], what)
    return _bounded(int(float(number) * _UNITS[unit]), what)


def _bounded(bps: int, what: str) -> int:
    if bps > MAX_RATE:
        raise InvalidRate('%s is too large: %d bytes/s (at most %d, the kernel\'s limit)'
                          % (what, bps, MAX_RATE))
    return bps


def format_size(n: float, digits: int = 1) -> str:
    """Human-readable binary size, e.g. '16.0 MiB'."""
    for unit, size in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
        if n >= size:
            return '%.*f %s' % (digits, n / size, unit)
    return '%d B' % n


def format_rate(bps: float) -> str:
    """Human-readable binary rate, e.g. '8.00 MiB/s'."""
    return format_size(bps, 2) + '/s'
