#!/usr/bin/env bash
# The one prepared GPU check (run through the device tool, from the repository root):
#   BLIP-base-architecture captioning at fp16 (batched vs one at a time), and
#   SD-1.5-architecture LoRA training at 512 px, batch 4, bf16 vs diffusers' train_dreambooth_lora.py.
# Needs, carried beside the tree: the packages the GPU image lacks (diffusers, duckdb, polars, polars-runtime-32,
# open_clip_torch, ftfy, wcwidth), either as .whl/ (wheels; see the device README) or, where the wheels pass the
# device's 64 MiB carry limit, as .gpu_site/site.tar.xz (the same wheels unzipped into one folder and xz-packed);
# and .bench/peers/ (the fetched peer script).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if [ -f .gpu_site/site.tar.xz ]; then
  python3 -c "import tarfile; tarfile.open('.gpu_site/site.tar.xz').extractall('/tmp/site', filter='tar')" || exit 1
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 WORKBENCH_HOME=/tmp/wbhome HF_HUB_OFFLINE=1
python3 -c "import torch, diffusers, transformers, peft, accelerate, duckdb, polars, open_clip; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee "$OUT/versions.txt"
if [ "${CAPTION:-1}" = 1 ]; then  # CAPTION=0 skips it (its H100 figures are in benchmarks/results/caption_h100.txt)
  timeout "${CAPTION_TIMEOUT:-170}" python3 benchmarks/caption.py --device cuda --dtype fp16 --images 128 --batch-size 32 2>&1 | tee "$OUT/caption_gpu.txt"
fi
timeout "${TRAIN_TIMEOUT:-480}" python3 benchmarks/train.py --device cuda --full-size --steps "${TRAIN_STEPS:-40}" 2>&1 | tee "$OUT/train_gpu.txt"
