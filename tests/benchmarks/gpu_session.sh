#!/usr/bin/env bash
# One prepared GPU session for issue [7 of 10]'s measurement (about 6-8 minutes on an H200).
#
# Run from the repository root on a bare GPU machine that has PyTorch, transformers and peft
# but no network. DeepSpeed's pure-Python wheel and its needs travel in .whl/ (see README,
# "GPU measurement"); results land in $OUT (default ./gpu_results).
#   bash tests/benchmarks/gpu_session.sh
set -u -o pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'deepspeed', deepspeed.__version__)" | tee -a "$OUT/card.txt"
# 1. the frozen tower alone, Hugging Face's per-window loop vs packed (real 3B tower, 32 frames)
timeout 120 python3 tests/benchmarks/bench_vision.py --device cuda --shape 3b --frames 32 \
  --json "$OUT/vision_3b.json" 2>&1 | grep -v -i warn | tee "$OUT/vision_3b.txt"
# 2. the full training step: 3B shape, full fine-tuning, 16 clips of 2 frames, packed vision attention, fused AdamW
timeout 240 python3 tests/benchmarks/gpu_mfu.py --shape 3b --trainable full --clips 16 --clip-frames 2 --persistence 1e10 \
  --json "$OUT/mfu_3b_p16_packed.json" 2>&1 | grep -v -i warn | tee "$OUT/mfu_3b_p16_packed.txt"
# 3. the same with the trainer's default persistence threshold (what multi-GPU runs use)
timeout 200 python3 tests/benchmarks/gpu_mfu.py --shape 3b --trainable full --clips 16 --clip-frames 2 --top 0 \
  --json "$OUT/mfu_3b_p16_packed_default.json" 2>&1 | grep -v -i warn | tail -12 \
  | tee "$OUT/mfu_3b_p16_packed_default.txt"
