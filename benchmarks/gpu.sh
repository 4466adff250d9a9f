#!/usr/bin/env bash
# The first GPU run in one command (see benchmarks/gpu.py): sets up the environment if needed, then runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || make install
exec .venv/bin/python -m benchmarks.gpu "$@"
