#!/usr/bin/env bash
# The continued-training demonstration of examples/train.py on SmolLM2-135M (E8G8T8, all 30 layers):
# 300 steps of 4 x 256 tokens of KJV text, killed at step 160 (last checkpoint 150) and resumed.
# Peak LR 6e-5 (cosine to 6e-6): a first attempt at 3e-4 made the training loss climb on these
# 1024-token batches (3.11 -> 3.58 by step 40). Resumable: re-running continues from the newest checkpoint. tcmalloc keeps freed gradient
# buffers (glibc returns them to the OS and page-faults them back every step).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RUN=${RUN:-experiments/runs/smollm2-e8g8t8}
TC=$(ls /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 2>/dev/null || true)
ARGS=(--run-dir "$RUN" --steps 300 --batch 4 --seq-len 256 --lr 6e-5 --min-lr 6e-6 --eval-every 50 --checkpoint-every 75 --eval-seqs 32 --log-every 10)
if [ ! -d "$RUN/checkpoints" ]; then
  UPCYCLE_TRAIN_KILL_AT_STEP=160 LD_PRELOAD=$TC .venv/bin/python examples/train.py "${ARGS[@]}" 2>&1 | tee "$RUN.part1.log"
  echo "(killed at step 160 on purpose; resuming)"
fi
LD_PRELOAD=$TC .venv/bin/python examples/train.py "${ARGS[@]}" --resume 2>&1 | tee "$RUN.part2.log"
