#!/usr/bin/env bash
# The benchmarks' anchors from other projects, installed beside the checkout (.bench-deps, git-ignored)
# without their training dependencies, so they never enter the project's own environment:
#     bash benchmarks/setup_anchors.sh   # then the benchmarks find them (benchmarks/anchors.py)
# torchtitan 0.3's MoE needs, to import: spmd_types, tyro, docstring_parser. A GPU session carries
# the folder with the working tree (it installs nothing from the network).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pip install --quiet --no-deps --target .bench-deps \
    "torchtitan==0.3.0" "spmd_types==0.2.3" "tyro>=0.9,<2" "docstring_parser>=0.16,<1"
PYTHONPATH=.bench-deps "$PY" -c "import torchtitan.models.common.moe" && echo "anchors ready in .bench-deps"
