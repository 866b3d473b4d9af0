#!/usr/bin/env bash
# N processes on one machine, each with its own slice of the local devices, one global mesh (the tested path).
#   launch/multiprocess_local.sh 2 --flagfile=experiments/flags/quickstart.flags --workdir=runs/mp
# On CPU each process gets DEVICES_PER_PROCESS forced host devices (default 1); collectives use gloo.
set -euo pipefail
N=${1:?usage: multiprocess_local.sh NUM_PROCESSES [experiment flags...]}; shift
PORT=${TDAE_PORT:-$((20000 + RANDOM % 20000))}
ENTRY=${TDAE_ENTRY:-experiments.tdae}
DEV=${DEVICES_PER_PROCESS:-1}
pids=()
for ((i = 0; i < N; i++)); do
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEV}" \
    python -m "$ENTRY" "$@" --multihost=on --coordinator="127.0.0.1:${PORT}" \
      --num_processes="$N" --process_id="$i" > >(sed "s/^/[p$i] /") 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit "$rc"
