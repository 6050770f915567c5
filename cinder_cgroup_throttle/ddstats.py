"""dd's own account of a copy: the one parser of its final report.

GNU dd (under ``LC_ALL=C``) ends its stderr with ``N bytes (...) copied, S s, R/s``; that
line is the only trustworthy count of what reached the destination (a dd killed by a signal
prints none, a short source makes it smaller than ``count=``). qemu-img convert reports
nothing comparable, so a copy made by it is judged by its exit status alone.

Stdlib only: the pv fallback's wrapper imports it on every copy.
"""
from __future__ import annotations

import re
from typing import NamedTuple, Optional

_SUMMARY = re.compile(r'^(\d+) bytes?\b[^\n]* copied, ([0-9.e+-]+) s\b', re.MULTILINE)


class DDReport(NamedTuple):
    """What dd says it copied and how long its copy took, on its own clock."""
    bytes: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


def report(stderr: str) -> Optional[DDReport]:
    """The last summary in ``stderr`` (dd prints one at its end), or None if there is none."""
    found = _SUMMARY.findall(stderr)
    if not found:
        return None
    copied, seconds = found[-1]
    return DDReport(int(copied), float(seconds))
