#!/usr/bin/env bash
# Set up (if needed), then migrate a real VM through migtap on 127.0.0.1 and show its logs.
# Extra arguments go to scripts/demo.py (--multifd 4, --port N, --random-mib N).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
