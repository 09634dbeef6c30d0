#!/usr/bin/env bash
# Run the whole benchmark and keep its results and plots in benchmarks/results/.
#
# Usage: benchmarks/run.sh [SCALE] [RUNS]   (defaults: medium 3)
#
# Run files (samples, logs, the broker's log) stay in a temporary folder,
# whose path the bench prints; each run's event store is deleted after it.
# At medium scale the whole bench takes about 45 minutes on 2 cores and
# needs about 3 GB of memory beside the job's own.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scale="${1:-medium}"
runs="${2:-3}"
work="$(mktemp -d -t raysource-bench-XXXXXX)"
results="benchmarks/results"

echo "machine: $(nproc) CPUs; load before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
raysource bench --suite all --scale "$scale" --runs "$runs" --out "$work"
echo "load after the run: $(cut -d' ' -f1-3 /proc/loadavg)"

mkdir -p "$results"
cp "$work/results.json" "$work"/*.png "$results/"
echo "results and plots copied to $results/; run files kept in $work"
