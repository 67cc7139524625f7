#!/usr/bin/env bash
# The demo pipeline on sample_data/ with the offline `tiny` models. Everything lands in ./demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
export WORKBENCH_CATALOG="$PWD/demo/workbench.duckdb"
export WORKBENCH_HOME="${WORKBENCH_HOME:-$PWD/demo/home}"
export HF_HUB_OFFLINE=1
rm -rf demo && mkdir -p demo

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "ingest sample_data/"
workbench ingest sample_data

step "dedup (exact + pHash, threshold 6)"
workbench dedup

step "the catalog, with SQL"
workbench sql "SELECT status, count(*) AS images FROM images_view GROUP BY status ORDER BY status"
workbench sql "SELECT duplicate_group, is_keeper, path, width, height, format FROM images_view WHERE duplicate_group IS NOT NULL ORDER BY duplicate_group, is_keeper DESC"
workbench sql "SELECT count(*) AS curated_images FROM dataset"
