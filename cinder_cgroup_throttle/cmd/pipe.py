"""``cinder-cgroup-throttle-pipe``: the pv fallback's executable (see
:mod:`cinder_cgroup_throttle.pipeline`).

Imports nothing beyond the pipeline and the stdlib it needs, and skips the interpreter's
shutdown (10-20 ms): every copy pays for this process's start and end, in CPU and in time
taken from its rate.
"""
from __future__ import annotations

import os
import sys
from typing import NoReturn, Optional, Sequence

from cinder_cgroup_throttle import pipeline
from cinder_cgroup_throttle.exception import ThrottleError


def run(argv: Sequence[str]) -> int:
    """The copy's exit status: 0, 1 (the copy failed), 2 (refused)."""
    try:
        return pipeline.run(argv)
    except (pipeline.Refused, ThrottleError) as exc:  # ThrottleError: an unsafe state dir
        sys.stderr.write('cinder-cgroup-throttle-pipe: %s\n' % exc)
        return 2
    except OSError as exc:  # no pv, no pidfd (Linux < 5.3), ...
        sys.stderr.write('cinder-cgroup-throttle-pipe: copy failed: %s\n' % exc)
        return 1


def main(argv: Optional[Sequence[str]] = None) -> NoReturn:
    code = run(sys.argv[1:] if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # nothing left to clean up: the pipeline closed and removed its files


if __name__ == '__main__':
    main()
