#!/usr/bin/env bash
# A 3-loss x 2-method sweep on the built-in ring, as in docs/sweeps.md:
#   bash benchmarks/sweep_ring.sh [OUT]     (default OUT: runs/sweep; about 4 minutes on 2 cores)
set -euo pipefail
out=${1:-runs/sweep}
for loss in vsd sid dmd; do
  # one path per loss: dmd's nodes train at its Karras noise levels, vsd's and sid's log-normal
  disback record --config recipes/ring2d.toml --loss "$loss" --out "$out/$loss" -q
  for method in disback baseline; do
    flags=()
    [ "$method" = baseline ] && flags=(--no-trajectory)
    disback backtrack --config recipes/ring2d.toml -T "$out/$loss" --loss "$loss" \
      --name "$method" "${flags[@]}" -q
  done
done
disback runs "$out" --sort final_mmd2
disback runs "$out" --csv > "$out/runs.csv"
