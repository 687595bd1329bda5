#!/usr/bin/env bash
# Run N copies of a llada-jax command as one multi-process JAX job on this machine (CPU devices), the way a
# pod or cluster runs it: a free localhost port for the coordinator, LLADA_JAX_* variables for each process,
# every process's output prefixed with its index. Exits with the first non-zero status of any process.
# Each process gets D CPU devices: --devices_per_process, else the count XLA_FLAGS already sets
# (--xla_force_host_platform_device_count=D, kept as it is), else 1; the two disagreeing is an error.
#
#   launch/local_multiprocess.sh [--devices_per_process D] [--heartbeat_timeout S] N -- llada-jax pretrain ...
set -euo pipefail

devices=""
heartbeat=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --devices_per_process) devices="$2"; shift 2 ;;
    --heartbeat_timeout) heartbeat="$2"; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
[[ $# -ge 3 && "$2" == "--" ]] || { echo "usage: $0 [--devices_per_process D] N -- CMD..." >&2; exit 2; }
n="$1"; shift 2
[[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "$0: N must be a positive integer, got '$n'" >&2; exit 2; }
[[ -z "$devices" || "$devices" =~ ^[1-9][0-9]*$ ]] || {
  echo "$0: --devices_per_process must be a positive integer, got '$devices'" >&2; exit 2; }

# The value XLA_FLAGS gives the XLA flag $1, empty when it sets none (the last one: XLA takes the last of
# repeated flags).
xla_flag() {
  local word value="" words=()
  read -rd '' -a words <<<"${XLA_FLAGS:-}" || true
  for word in ${words[@]+"${words[@]}"}; do
    word="${word#-}"; word="${word#-}"
    if [[ "$word" == "$1="* ]]; then value="${word#*=}"; fi
  done
  printf '%s\n' "$value"
}

# A device count already in XLA_FLAGS is the user's: appending ours would override it (the last flag wins).
preset=$(xla_flag xla_force_host_platform_device_count)
if [[ -n "$preset" ]]; then
  if [[ -n "$devices" && "$devices" != "$preset" ]]; then
    echo "$0: --devices_per_process $devices conflicts with --xla_force_host_platform_device_count=$preset in" \
         "XLA_FLAGS: give the count once" >&2
    exit 2
  fi
  xla_flags="$XLA_FLAGS"
else
  xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=${devices:-1}"
fi

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
for ((i = 0; i < n; i++)); do
  (
    export LLADA_JAX_COORDINATOR_ADDRESS="127.0.0.1:${port}" LLADA_JAX_NUM_PROCESSES="$n" LLADA_JAX_PROCESS_ID="$i"
    [[ -n "$heartbeat" ]] && export LLADA_JAX_HEARTBEAT_TIMEOUT="$heartbeat"
    export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
    export XLA_FLAGS="$xla_flags"
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
