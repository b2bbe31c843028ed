#!/usr/bin/env bash
# One prepared GPU session (at most ~8 minutes): the backend tests on the GPU (Triton kernels
# compiled for real, bf16 included; grouped strategies on CUDA), then the MoE-layer benchmark with
# its per-part profile and the anchors. Meant for a lent GPU machine whose python3 already holds
# torch + triton + transformers; it installs nothing from the network: torchtitan comes from
# .bench-deps if benchmarks/setup_anchors.sh filled it here and the folder travels with the tree.
# Results (JSON and logs) land in $OUT (or ./gpu_out).
#     bash benchmarks/gpu_check.sh [pytest args...]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
# the repository root is the `upcycle` package: import it through a link, no install needed
mkdir -p /tmp/upcycle_pkg && ln -sfn "$PWD" /tmp/upcycle_pkg/upcycle
export PYTHONPATH=/tmp/upcycle_pkg${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -n 4 \
    tests/test_backends_triton.py tests/test_backends.py tests/test_backends_compile.py "$@" 2>&1 \
    | tail -n 60 | tee "$OUT/gpu_tests.log"
# every path side by side (ratios to the eager dense MLP, transformers and torchtitan), bf16
timeout ${BENCH_TIMEOUT:-200} python3 benchmarks/moe_layer.py --repeats 5 --json "$OUT/moe_layer_gpu.json" 2>&1 \
    | tee "$OUT/moe_layer_gpu.log"
# where the time goes, per part and path, with host syncs per step, at the two d2048 16k shapes
timeout ${PROFILE_TIMEOUT:-90} python3 benchmarks/moe_layer.py --d-model 2048 --tokens 16384 --repeats 2 --profile \
    --paths dense auto grouped:grouped_mm triton torchtitan --json "$OUT/moe_layer_gpu_profile.json" 2>&1 \
    | tee "$OUT/moe_layer_gpu_profile.log"
