#!/usr/bin/env bash
# Installs what is missing and starts llmosd on its built-in model with the demo agent running.
#   bash tools/demo.sh                 # listens on 127.0.0.1:50051
#   LLMOS_LISTEN=unix:/tmp/llmos.sock bash tools/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup.sh
echo "llmos: talk to it with e.g.  llmos ps   |   grpcurl -plaintext 127.0.0.1:50051 list"
exec "$PY" -m llmosd --listen "${LLMOS_LISTEN:-127.0.0.1:50051}" --data-dir "${LLMOS_DATA:-llmos-data}" \
  --userland-root userland --spawn lua/demo.lua "$@"
