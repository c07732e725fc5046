#!/usr/bin/env bash
# Set everything up, simulate the demo data set (3,000 particles of a T-cell receptor-MHC complex with
# 10 % HIV-protease junk, per-particle B-factors and noise; box 112, 1.5 Å/px), sieve it once with
# cryosieve-core and report how much of the junk was found, then run the iterative cryosieve pipeline
# with the built-in reconstruction and post-processing and print where the report is.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

# Simulate once; again only when the demo's parameters changed (an older demo_data is replaced).
SIMULATE=(--num_particles 3000 --box 112 --angpix 1.5 --bfactor_max 400 --seed 0)
if [ ! -f demo_data/particles.star ] || [ "$(cat demo_data/.demo_parameters 2>/dev/null)" != "${SIMULATE[*]}" ]; then
  rm -rf demo_data
  cryosieve-simulate --o demo_data "${SIMULATE[@]}"
  echo "${SIMULATE[*]}" > demo_data/.demo_parameters
fi

echo "== one sieve: cryosieve-core at a 20 Å cut-off, keeping 80 % of each half-set"
rm -rf demo_core
cryosieve-core --i demo_data/particles.star --o demo_core/kept.star --directory demo_data \
  --volume demo_data/half1.mrc --volume demo_data/half2.mrc --mask demo_data/mask.mrc \
  --retention_ratio 0.8 --frequency 20
python3 - <<'PY'
import pandas as pd
truth = pd.read_csv("demo_data/truth.csv")
scores = pd.read_csv("demo_core/kept_scores.csv").merge(truth, on="rlnImageName")
junk = scores["is_junk"].astype(bool)
print(f"junk particles sieved out: {(junk & (scores.kept == 0)).sum()} of {junk.sum()} "
      f"({100 * (junk & (scores.kept == 0)).sum() / junk.sum():.0f} %); "
      f"particles sieved in all: {(scores.kept == 0).sum()} of {len(scores)}")
PY

echo "== the iterative pipeline: cryosieve, 3 rounds from 40 Å to 8 Å, built-in back-end"
rm -rf demo_output
cryosieve --i demo_data/particles.star --o demo_output/ --angpix 1.5 --mask demo_data/mask.mrc \
  --directory demo_data --num_iters 3 --frequency_start 40 --frequency_end 8 --retention_ratio 0.8
