#!/usr/bin/env bash
# Installs what is missing, checks the generated code, and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup.sh
"$PY" tools/gen_protos.py --check
exec "$PY" -m pytest "$@"
