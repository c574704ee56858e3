#!/usr/bin/env bash
# Multi-host Cloud TPU VM slice: create it, install the project on every worker, run training on
# all workers at once (one JAX process per worker host), stream logs, delete it.
#
#   export TPU_NAME=sgcd-v5p ZONE=us-east5-a ACCELERATOR_TYPE=v5p-16 PROJECT=my-proj
#   launch/tpu_vm.sh create
#   launch/tpu_vm.sh setup                      # copies this checkout, pip installs (jax[tpu])
#   launch/tpu_vm.sh run --config configs/sgcd.py --config.run.name=sgcd_v5p
#   launch/tpu_vm.sh ssh                        # interactive shell on worker 0
#   launch/tpu_vm.sh delete
#
# Required: TPU_NAME, ZONE, ACCELERATOR_TYPE (create only), PROJECT.
# Optional: RUNTIME_VERSION (v2-alpha-tpuv5 for v5p, v2-alpha-tpuv5-lite for v5e), SPOT=1,
#   REMOTE_DIR (~/sgcd_jax), RUN_DIR_BUCKET (gs://... : run.workdir on GCS so every host sees it),
#   GEMINI_SECRET (a Secret Manager secret holding the Gemini key: each worker reads it into
#   GEMINI_API_KEY at start, so the key is never on a command line or on disk), DRY_RUN=1
#   (print the gcloud commands instead of running them).
# On the workers sgcd_jax.parallel.distributed sees SGCD_CLUSTER=tpu and lets JAX read the slice topology
# from the TPU metadata server: no coordinator address is needed.
set -euo pipefail

usage() { sed -n '2,21p' "$0"; exit 2; }
[[ $# -ge 1 ]] || usage
command="$1"; shift

require() {
  local missing=()
  for var in "$@"; do [[ -n "${!var:-}" ]] || missing+=("$var"); done
  if ((${#missing[@]})); then
    echo "tpu_vm.sh $command: set ${missing[*]} (see the header of $0)" >&2
    exit 2
  fi
}

run() {  # echo or execute a command
  if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

REMOTE_DIR="${REMOTE_DIR:-~/sgcd_jax}"
JAX_VERSION="0.10.2"

case "$command" in
  create)
    require TPU_NAME ZONE ACCELERATOR_TYPE PROJECT
    case "$ACCELERATOR_TYPE" in
      v5litepod-*|v5e-*) default_runtime=v2-alpha-tpuv5-lite ;;
      v5p-*) default_runtime=v2-alpha-tpuv5 ;;
      v6e-*) default_runtime=v2-alpha-tpuv6e ;;
      *) default_runtime=tpu-ubuntu2204-base ;;
    esac
    extra=()
    [[ "${SPOT:-0}" == 1 ]] && extra+=(--spot)
    run gcloud compute tpus tpu-vm create "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="${RUNTIME_VERSION:-$default_runtime}" \
      "${extra[@]}"
    ;;
  setup)
    require TPU_NAME ZONE PROJECT
    repo_root="$(cd "$(dirname "$0")/.." && pwd)"
    archive="$(mktemp -d)/sgcd_jax.tar.gz"
    run tar -C "$repo_root" --exclude=.git --exclude=runs -czf "$archive" .
    run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:/tmp/sgcd_jax.tar.gz" \
      --project="$PROJECT" --zone="$ZONE" --worker=all
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --worker=all \
      --command="mkdir -p $REMOTE_DIR && tar -C $REMOTE_DIR -xzf /tmp/sgcd_jax.tar.gz && cd $REMOTE_DIR && pip install -q -r requirements.txt 'jax[tpu]==$JAX_VERSION' && pip install -q --no-deps -r requirements-nodeps.txt"
    ;;
  run)
    require TPU_NAME ZONE PROJECT
    args="$(printf '%q ' "$@")"
    workdir=""
    [[ -n "${RUN_DIR_BUCKET:-}" ]] && workdir="--config.run.workdir=$RUN_DIR_BUCKET"
    env_line="SGCD_CLUSTER=tpu"
    if [[ -n "${GEMINI_SECRET:-}" ]]; then
      env_line="export GEMINI_API_KEY=\$(gcloud secrets versions access latest --secret=$GEMINI_SECRET) && $env_line"
    fi
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" \
      --project="$PROJECT" --zone="$ZONE" --worker=all \
      --command="cd $REMOTE_DIR && $env_line python -m sgcd_jax.train $args $workdir 2>&1 | tee -a train_\$(hostname).log"
    ;;
  ssh)
    require TPU_NAME ZONE PROJECT
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --worker=0
    ;;
  delete)
    require TPU_NAME ZONE PROJECT
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --quiet
    ;;
  *) usage ;;
esac
