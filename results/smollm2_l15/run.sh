#!/usr/bin/env bash
# The paper's comparison on the embedded model: BatchTopK vs TopK vs JumpReLU at k (target L0) 16/32/64,
# 8x dictionary (4,608 latents), SmolLM2-135M-Instruct resid_post.15, bundled corpus, one token budget.
# Run from the repository root: bash results/smollm2_l15/run.sh
# TOKENS=786432 (the committed table, 12 SAEs) takes ~30-40 min after the capture on 2 CPU cores.
set -euo pipefail
OUT=${OUT:-runs/smollm2_l15}
TOKENS=${TOKENS:-786432}
saekit capture --hook resid_post.15 --tokens 600000 --split train --out "$OUT/store_train"
saekit capture --hook resid_post.15 --tokens 30000 --split test --out "$OUT/store_test"
saekit sweep --store "$OUT/store_train" --eval-store "$OUT/store_test" --enc-init-norm 1 \
  --arch batchtopk topk jumprelu matryoshka --k 16 32 64 --expansion 8 \
  --tokens "$TOKENS" --batch-size 1024 --lr 1e-3 --warmup-steps 50 --checkpoint-every 100 \
  --eval-tokens 27000 --ce-tokens 1024 --out "$OUT/sweep_$TOKENS"
python -m saekit.sweep_report "$OUT/sweep_$TOKENS" results/smollm2_l15
