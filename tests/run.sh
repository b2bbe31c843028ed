#!/usr/bin/env bash
# The whole test suite from a fresh clone: sets up .venv (torch==2.13.0 first), then pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash .ci/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
exec .venv/bin/python -m pytest -q "$@"
