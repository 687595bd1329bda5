#!/usr/bin/env bash
# Run N copies of a llada-jax command as one multi-process JAX job on this machine (CPU devices), the way a
# pod or cluster runs it: a free localhost port for the coordinator, LLADA_JAX_* variables for each process,
# every process's output prefixed with its index. Exits with the first non-zero status of any process.
#
#   launch/local_multiprocess.sh [--devices_per_process D] [--heartbeat_timeout S] N -- llada-jax pretrain ...
set -euo pipefail

devices=1
heartbeat=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --devices_per_process) devices="$2"; shift 2 ;;
    --heartbeat_timeout) heartbeat="$2"; shift 2 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
[[ $# -ge 3 && "$2" == "--" ]] || { echo "usage: $0 [--devices_per_process D] N -- CMD..." >&2; exit 2; }
n="$1"; shift 2
[[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "$0: N must be a positive integer, got '$n'" >&2; exit 2; }

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
for ((i = 0; i < n; i++)); do
  (
    export LLADA_JAX_COORDINATOR_ADDRESS="127.0.0.1:${port}" LLADA_JAX_NUM_PROCESSES="$n" LLADA_JAX_PROCESS_ID="$i"
    [[ -n "$heartbeat" ]] && export LLADA_JAX_HEARTBEAT_TIMEOUT="$heartbeat"
    export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}"
    exec "$@" > >(sed -u "s/^/[process $i] /") 2> >(sed -u "s/^/[process $i] /" >&2)
  ) &
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
  rc=0
  wait "$pid" || rc=$?
  if [[ $status -eq 0 && $rc -ne 0 ]]; then status=$rc; fi
done
exit "$status"
