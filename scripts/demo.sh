#!/usr/bin/env bash
# Set up, then run the demo pipeline on the embedded model and data (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
export DAGSTER_HOME="${DAGSTER_HOME:-$PWD/.dagster_home}"
python -m gradsentry_dagster.demo "$@"
