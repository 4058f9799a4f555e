#!/usr/bin/env bash
# Install everything, create ./demo-workspace with round 1 sampled, serve the app on :8501.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/prefloop demo --workspace demo-workspace
exec .venv/bin/prefloop serve --workspace demo-workspace --port "${PORT:-8501}"
