#!/usr/bin/env bash
# Set up (if needed) and run every check: ruff, mypy, import-linter (the layering), then the tests, real QEMU migrations included.
# Extra arguments go to pytest, e.g.  scripts/test.sh -k multifd
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check --output-format concise .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/lint-imports --no-cache
.venv/bin/pytest "$@"
