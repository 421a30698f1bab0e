#!/usr/bin/env bash
# Runs every benchmark in one go, with the arguments docs/BENCHMARKS.md reports, and keeps the
# whole output (machine, commit, each program's figures, wall time) in target/bench-all-<time>.log.
# Run it on an otherwise idle machine: the daemon, the load generators and PostgreSQL share the
# cores, so anything else running moves every figure.
#
#   benches/all.sh            # every benchmark (~30 minutes on 2 cores)
#   benches/all.sh ingest     # only the ones named
set -euo pipefail
cd "$(dirname "$0")/.."

declare -A ARGS=(
  [crypto]=""
  [ingest]="--events 60000 --concurrency 64 --seconds-pgbench 10 --rounds 3"
  [client]="--calls 20000 --concurrency 32 --seconds 30"
  [outbox]="--latency-rows 300 --rows 5000 --budget-rows 200 --lost-rows 1000 --search-rows 300 --concurrency 32"
  [sweep]="--approvals 10000 --qps 200 --converge 1000"
  [listener]="--connections 1500 --header-kb 380 --seconds 10 --probe-clients 50"
  [month]="--day-seconds 10"
)
ORDER=(crypto ingest client outbox sweep listener month)
if [ "$#" -gt 0 ]; then ORDER=("$@"); fi

mkdir -p target
log="target/bench-all-$(date -u +%Y%m%dT%H%M%SZ).log"
{
  echo "# dingsync benchmarks, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "commit:     $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (with uncommitted changes)')"
  echo "cpu:        $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo "memory:     $(free -g | awk '/^Mem:/ {print $2}') GiB"
  echo "postgres:   $(psql -h 127.0.0.1 -U postgres -Atc 'SHOW server_version' 2>/dev/null || echo '?'), fsync $(psql -h 127.0.0.1 -U postgres -Atc 'SHOW fsync' 2>/dev/null), synchronous_commit $(psql -h 127.0.0.1 -U postgres -Atc 'SHOW synchronous_commit' 2>/dev/null)"
  echo "rustc:      $(rustc --version)"
} | tee "$log"

# Build first, so that no benchmark shares the cores with the compiler.
cargo bench --no-run 2>&1 | tail -n 1
echo "load:       $(cut -d' ' -f1-3 /proc/loadavg) (1, 5, 15 min) after the build" | tee -a "$log"

for bench in "${ORDER[@]}"; do
  [ -n "${ARGS[$bench]+x}" ] || { echo "unknown benchmark: $bench" >&2; exit 2; }
  echo | tee -a "$log"
  echo "## cargo bench --bench $bench -- ${ARGS[$bench]}" | tee -a "$log"
  started=$(date +%s)
  # shellcheck disable=SC2086 # the arguments are meant to split
  cargo bench -q --bench "$bench" -- ${ARGS[$bench]} 2>&1 | tee -a "$log"
  echo "(wall time $(( $(date +%s) - started )) s)" | tee -a "$log"
done
echo
echo "figures kept in $log"
