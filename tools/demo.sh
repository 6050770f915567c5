#!/bin/bash
# The main job on a built-in default, as root on a fresh machine: set-up, then a throttled
# copy between two scratch loop devices it creates (progress bar, achieved rate vs limit),
# removing everything it created afterwards. Arguments go to `cinder-cgroup-throttle demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
exec cinder-cgroup-throttle demo "$@"
