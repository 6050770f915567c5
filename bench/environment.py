"""Make sure the benchmark runs where Cinder 29.0.0, this package and matplotlib import.

The comparison needs Cinder's own ``BlkioCgroup`` and ``copy_volume``; a fresh checkout on a
machine without them gets a private venv (``bench/.venv``, gitignored) with
``cinder==29.0.0``, ``matplotlib`` and this checkout installed editable (so the pv
fallback's console script exists), and the benchmark re-executes itself there.
"""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from typing import List

CINDER_VERSION = '29.0.0'
PIPE_COMMAND = 'cinder-cgroup-throttle-pipe'
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(REPO, 'bench', '.venv')
REEXEC_ENV = 'CCT_BENCH_REEXEC'
TOOLS = ('dd', 'cgexec', 'cgcreate', 'cgset', 'losetup', 'sfdisk', 'partx', 'mkfs.ext4',
         'pv', 'df', 'mount')


def missing_python() -> List[str]:
    """What this interpreter lacks for the benchmark, as pip requirement strings."""
    missing = []
    try:
        from importlib.metadata import PackageNotFoundError, version
        try:
            if version('cinder') != CINDER_VERSION:
                missing.append('cinder==' + CINDER_VERSION)
        except PackageNotFoundError:
            missing.append('cinder==' + CINDER_VERSION)
    except ImportError:
        missing.append('cinder==' + CINDER_VERSION)
    for module, requirement in (('matplotlib', 'matplotlib'), ('pyudev', 'pyudev'),
                                ('psutil', 'psutil'), ('oslo_concurrency', 'oslo.concurrency')):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(requirement)
    if not os.path.exists(os.path.join(os.path.dirname(sys.executable), PIPE_COMMAND)):
        missing.append('-e ' + REPO)
    return missing


def missing_tools() -> List[str]:
    return [tool for tool in TOOLS if not shutil.which(tool)]


def ensure(argv: List[str], allow_install: bool) -> None:
    """Return when this interpreter can run the benchmark; otherwise re-exec in bench/.venv."""
    if os.geteuid() != 0:
        sys.exit('bench/run.py must run as root (it creates loop devices, mounts and cgroups)')
    tools = missing_tools()
    if tools:
        sys.exit('missing tools: %s (Debian: apt-get install cgroup-tools pv fdisk util-linux '
                 'e2fsprogs)' % ' '.join(tools))
    missing = missing_python()
    if not missing:
        return
    if os.environ.get(REEXEC_ENV) or not allow_install:
        sys.exit('%s lacks %s; install them or run without --no-install'
                 % (sys.executable, ', '.join(missing)))
    python = os.path.join(VENV, 'bin', 'python')
    print('bench: %s lacks %s; preparing %s (a few minutes the first time)'
          % (sys.executable, ', '.join(missing), VENV), file=sys.stderr)
    if not os.path.exists(python):
        subprocess.run([sys.executable, '-m', 'venv', VENV], check=True)
    subprocess.run([python, '-m', 'pip', 'install', '-q', 'cinder==' + CINDER_VERSION,
                    'matplotlib', '-e', REPO], check=True)
    os.environ[REEXEC_ENV] = '1'
    os.execv(python, [python, os.path.abspath(argv[0])] + argv[1:])


def activate() -> None:
    """Import the checkout (not an installed copy) and find console scripts of this env."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get('PATH', '')
    if bindir not in path.split(os.pathsep):
        os.environ['PATH'] = bindir + os.pathsep + path


def compile_package() -> None:
    """Byte-compile this package as ``pip install`` does: with PYTHONDONTWRITEBYTECODE set
    (as in this project's environments) every start of the fallback's wrapper would
    otherwise compile its modules again, a cost no installed copy has."""
    import compileall
    compileall.compile_dir(os.path.join(REPO, 'cinder_cgroup_throttle'), quiet=1)
