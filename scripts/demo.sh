#!/usr/bin/env bash
# The demo pipeline on sample_data/ with the offline `tiny` models. Everything lands in ./demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
export WORKBENCH_CATALOG="$PWD/demo/workbench.duckdb"
export WORKBENCH_HOME="${WORKBENCH_HOME:-$PWD/demo/home}"
export HF_HUB_OFFLINE=1
rm -rf demo/workbench.duckdb* demo/lora demo/kohya_export demo/class_priors
mkdir -p demo

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. ingest sample_data/ (hashes, sizes, quality stats, sidecar captions, kohya folder concepts);
   sample_data/bad/ holds planted broken files (truncated, a decompression bomb, a link loop...): the errors are expected"
workbench ingest sample_data

step "2. dedup: exact copies and pHash near-duplicates (threshold 6); the best copy is kept"
workbench dedup
workbench sql "SELECT duplicate_group, is_keeper, path, width, height, format FROM images_view
               WHERE duplicate_group IS NOT NULL ORDER BY duplicate_group, is_keeper DESC"

step "3. caption with BLIP (tiny preset: a small random BLIP, so the words are nonsense)"
workbench caption --model tiny

step "4. CLIP embeddings and CLIP scores (tiny preset)"
workbench score --model tiny

step "4b. text search over the CLIP embeddings, and the concept read from the kohya folder name"
workbench search "a photo of a cat" --limit 3
workbench concept list

step "5. filter: short side >= 256 px, aspect <= 3"
workbench filter --min-side 256 --max-aspect 3

step "6. kohya aspect buckets at 64 px (the tiny model's training size)"
workbench buckets --resolution 64 --min-bucket-reso 32 --max-bucket-reso 128 --bucket-reso-steps 16

step "7. what the catalog says now: where each step stands, then SQL"
workbench status
workbench sql "SELECT status, count(*) AS images FROM images_view GROUP BY status ORDER BY status"
workbench sql "SELECT exclusion_reason, count(*) AS images FROM images_view WHERE excluded GROUP BY 1 ORDER BY 2 DESC"
workbench sql "SELECT count(*) AS curated_images, count(DISTINCT bucket_width || 'x' || bucket_height) AS buckets FROM dataset"

step "8. export the curated set for kohya-ss sd-scripts"
workbench export --format kohya demo/kohya_export

step "9. train a LoRA on the curated set (tiny, CPU; the CLIP score of its samples is ~0: the tiny CLIP is random)"
workbench train lora --model tiny --resolution 64 --max-train-steps 40 --train-batch-size 4 \
    --learning-rate 1e-3 --checkpointing-steps 20 --validation-prompt "photo of wbk cat" --validation-steps 20 \
    --output-dir demo/lora

step "done"
ls -1 demo/lora
echo "LoRA (diffusers): demo/lora/pytorch_lora_weights.safetensors"
echo "LoRA (kohya/A1111/ComfyUI): demo/lora/lora_kohya.safetensors"
echo "Open the workbench on this catalog: .venv/bin/workbench tui --catalog demo/workbench.duckdb"
