#!/usr/bin/env bash
# Set everything up, simulate the demo data set (3,000 particles of a T-cell receptor-MHC complex with
# 10 % HIV-protease junk and every realistic defect of cryosieve-simulate --realistic: empty images,
# misaligned particles, wrong origins, hidden contrast, coloured noise per micrograph; box 112, 1.5 Å/px),
# sieve it once with cryosieve-core and report how much of each kind of bad particle was found, sieve it
# again letting the sieve choose how much to keep (--retention_ratio auto), then run
# the iterative cryosieve pipeline (built-in back-ends, stopping once the resolution stalls) and print the
# best round and where the report (with the angular plots) is.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/${CRYOSIEVE_VENV:-.venv}/bin:$PATH"  # the commands and the Python of the set-up

# Simulate once; again only when the demo's parameters changed (an older demo_data is replaced).
SIMULATE=(--num_particles 3000 --box 112 --angpix 1.5 --bfactor_max 400 --seed 0 --realistic)
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
for kind, group in scores.groupby("kind"):
    print(f"{kind:>12}: {(group.kept == 0).sum():4d} of {len(group):4d} sieved out "
          f"({100 * (group.kept == 0).mean():.0f} %)")
print(f"particles sieved in all: {(scores.kept == 0).sum()} of {len(scores)}")
PY

echo "== the same sieve choosing how much to keep: --retention_ratio auto"
cryosieve-core --i demo_data/particles.star --o demo_core/auto.star --directory demo_data \
  --volume demo_data/half1.mrc --volume demo_data/half2.mrc --mask demo_data/mask.mrc \
  --retention_ratio auto --frequency 20
python3 - <<'PY'
import pandas as pd
truth = pd.read_csv("demo_data/truth.csv")
curve = pd.read_csv("demo_core/auto_retention.csv")
chosen = curve.loc[curve.chosen == 1, "fraction"].iloc[0]
scores = pd.read_csv("demo_core/auto_scores.csv").merge(truth, on="rlnImageName")
print(f"chosen: keep {chosen:.2f} of each half-set (truly good: {1 - truth.is_bad.mean():.2f}); "
      f"bad particles sieved out: {100 * (scores[scores.is_bad].kept == 0).mean():.0f} %, "
      f"good ones: {100 * (scores[~scores.is_bad].kept == 0).mean():.0f} %")
PY

echo "== the iterative pipeline: cryosieve, at most 5 rounds from 40 Å to 8 Å, stopping after 2 without gain"
rm -rf demo_output
cryosieve --i demo_data/particles.star --o demo_output/ --angpix 1.5 --mask demo_data/mask.mrc \
  --directory demo_data --num_iters 5 --frequency_start 40 --frequency_end 8 --retention_ratio 0.8 --patience 2
python3 - <<'PY'
import pandas as pd
summary = pd.read_csv("demo_output/_summary.csv")
best = summary[summary.best].iloc[0]
print(f"best round: {int(best.iteration)} ({int(best.particles_half1 + best.particles_half2)} particles, "
      f"{best.resolution_angstrom:.2f} Å with the given poses), copied to demo_output/_best.star; "
      "viewing directions per round: demo_output/_angles.png")
PY
echo "== each round against the truth (known in the demo): bad particles left, and the map against the true map"
python3 scripts/demo_truth.py demo_data demo_output/
