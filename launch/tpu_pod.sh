#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM pod (or multi-host slice): optionally create the TPU, copy this
# repository to every worker, install it, and run the same llada-jax command on all hosts at once.
# jax.distributed.initialize() finds the other workers from the TPU metadata.
#
#   launch/tpu_pod.sh --tpu my-v5p-64 --zone us-east5-a [--project P] \
#       [--create --accelerator_type v5p-64 --version v2-alpha-tpuv5] [--skip_install] [--dry_run] \
#       -- llada-jax pretrain --config configs/llada_8b_pretrain.py --data_path /mnt/data/pretrain --output_dir /mnt/ckpt/run
#
# --dry_run prints every gcloud command instead of running it.
set -euo pipefail

tpu="" zone="" project="" create=0 accelerator="" version="" dry=0 install=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --create) create=1; shift ;;
    --accelerator_type) accelerator="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --skip_install) install=0; shift ;;
    --dry_run) dry=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "$0: unknown option $1" >&2; exit 2 ;;
  esac
done
[[ -n "$tpu" && -n "$zone" ]] || { echo "$0: --tpu and --zone are required" >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "$0: give the command to run after --" >&2; exit 2; }
if [[ $create -eq 1 && ( -z "$accelerator" || -z "$version" ) ]]; then
  echo "$0: --create needs --accelerator_type and --version" >&2; exit 2
fi

gcloud_tpu=(gcloud compute tpus tpu-vm)
common=(--zone "$zone")
[[ -n "$project" ]] && common+=(--project "$project")

run() {
  if [[ $dry -eq 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

repo_root="$(cd "$(dirname "$0")/.." && pwd)"
archive="/tmp/llada-jax-$$.tar.gz"
remote_dir="llada-jax"
cmd=$(printf '%q ' "$@")

if [[ $create -eq 1 ]]; then
  run "${gcloud_tpu[@]}" create "$tpu" "${common[@]}" --accelerator-type "$accelerator" --version "$version"
fi
# Ship the tracked files of this checkout (no virtual environments, runs or caches).
run tar -czf "$archive" -C "$repo_root" $(cd "$repo_root" && git ls-files)
run "${gcloud_tpu[@]}" scp "$archive" "$tpu:/tmp/llada-jax.tar.gz" --worker=all "${common[@]}"
run "${gcloud_tpu[@]}" ssh "$tpu" --worker=all "${common[@]}" --command \
  "mkdir -p ~/$remote_dir && tar -xzf /tmp/llada-jax.tar.gz -C ~/$remote_dir"
if [[ $install -eq 1 ]]; then
  run "${gcloud_tpu[@]}" ssh "$tpu" --worker=all "${common[@]}" --command \
    "cd ~/$remote_dir && python3 -m pip install -q -U 'jax[tpu]' -e ."
fi
run "${gcloud_tpu[@]}" ssh "$tpu" --worker=all "${common[@]}" --command \
  "cd ~/$remote_dir && LLADA_JAX_DISTRIBUTED=1 $cmd"
[[ $dry -eq 1 ]] || rm -f "$archive"
