#!/usr/bin/env bash
# One prepared GPU session: the backend tests on the GPU (Triton kernels compiled for real, bf16
# included; grouped strategies on CUDA) and the MoE-layer benchmark. Meant for a lent GPU machine
# whose python3 already holds torch + triton + transformers; results land in $OUT (or ./gpu_out).
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
timeout ${BENCH_TIMEOUT:-240} python3 benchmarks/moe_layer.py --repeats 5 --json "$OUT/moe_layer_gpu.json" 2>&1 \
    | tee "$OUT/moe_layer_gpu.log"
