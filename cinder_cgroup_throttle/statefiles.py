"""Copy ids and atomic JSON files of the state directory.

Shared by the registry (any process) and the pv pipeline (root, under rootwrap); stdlib
only, so that the pipeline's wrapper starts fast.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import tempfile

#: A copy id: also the name of its leaf cgroup; the pid is the owner's, so a cleanup can
#: tell a dead owner's leftovers. The rootwrap filters pin the same pattern.
COPY_ID = re.compile(r'^copy-([0-9]+)-[0-9a-f]{8}$')


def new_copy_id() -> str:
    return 'copy-%d-%s' % (os.getpid(), secrets.token_hex(4))


def write_json(path: str, data: dict) -> None:
    """Atomic replace, world-readable: readers (a non-root status, cinder-volume reading
    what root re-saved) see the old or the new file, never a partial one."""
    write_text(path, json.dumps(data))


def write_text(path: str, text: str) -> None:
    """Atomic replace of a world-readable text file (see write_json)."""
    directory = os.path.dirname(path) or '.'
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, 'w') as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
