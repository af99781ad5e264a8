#!/usr/bin/env bash
# The sweep of sweep_ring.sh over 3 seeds, summarised per (loss, method) as in docs/sweeps.md:
#   bash benchmarks/sweep_ring_seeds.sh [OUT]  (default OUT: runs/sweep-seeds; 18 runs)
set -euo pipefail
out=${1:-runs/sweep-seeds}
for seed in 0 1 2; do
  for loss in vsd sid dmd; do
    disback record --config recipes/ring2d.toml --loss "$loss" --seed "$seed" \
      --out "$out/$loss-$seed" -q
    for method in disback baseline; do
      flags=()
      [ "$method" = baseline ] && flags=(--no-trajectory)
      disback backtrack --config recipes/ring2d.toml -T "$out/$loss-$seed" --loss "$loss" \
        --seed "$seed" --name "$method" "${flags[@]}" -q
    done
  done
done
disback runs "$out" --group-by loss,method --baseline method=baseline
disback runs "$out" --group-by loss,method --baseline method=baseline --json > "$out/groups.json"
