#!/usr/bin/env bash
# The prepared GPU check (src/qdistill.cli.gpu_check.py): one line per check, under 10
# minutes on one GPU. `--cpu` runs its CPU-runnable parts on small data (CI does).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m qdistill.cli.gpu_check "$@"
