#!/usr/bin/env bash
# Run N cooperating JAX processes on this machine (multi-host rehearsal, CPU or multi-GPU box).
#
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 launch/local_multiprocess.sh --config configs/quickstart.py
#
# Every process gets SGCD_COORDINATOR_ADDRESS=127.0.0.1:<free port>, SGCD_NUM_PROCESSES and
# SGCD_PROCESS_ID (read by sgcd_jax.parallel.distributed.initialize). On CPU (PLATFORM=cpu) each process
# simulates DEVICES_PER_PROCESS devices via XLA_FLAGS; on GPU (PLATFORM=gpu) process i owns GPUs
# [i*DEVICES_PER_PROCESS, (i+1)*DEVICES_PER_PROCESS) via SGCD_LOCAL_DEVICE_IDS.
# If one process fails, the others are stopped and the script exits with its status.
#
# Variables: NUM_PROCESSES (2), DEVICES_PER_PROCESS (4), PLATFORM (cpu|gpu, cpu),
#   ENTRYPOINT ("python -m sgcd_jax.train"), LOG_DIR (runs/local_multiprocess_logs),
#   COORDINATOR_PORT (a free port), HEARTBEAT_TIMEOUT_S (60: a peer silent this long stops the job;
#   exported as SGCD_HEARTBEAT_TIMEOUT_S), DRY_RUN (0). The mesh comes from the config: set
#   --config.mesh.data to a multiple of NUM_PROCESSES (params are replicated over data).
set -euo pipefail

NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-4}"
PLATFORM="${PLATFORM:-cpu}"
ENTRYPOINT="${ENTRYPOINT:-python -m sgcd_jax.train}"
LOG_DIR="${LOG_DIR:-runs/local_multiprocess_logs}"
DRY_RUN="${DRY_RUN:-0}"

case "$PLATFORM" in cpu|gpu) ;; *) echo "PLATFORM=$PLATFORM: use cpu or gpu" >&2; exit 2 ;; esac
if ! [[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ && "$DEVICES_PER_PROCESS" =~ ^[1-9][0-9]*$ ]]; then
  echo "NUM_PROCESSES and DEVICES_PER_PROCESS must be positive integers" >&2; exit 2
fi

free_port() {
  python - <<'PY'
import socket
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
PY
}
COORDINATOR_PORT="${COORDINATOR_PORT:-$(free_port)}"
export SGCD_COORDINATOR_ADDRESS="127.0.0.1:${COORDINATOR_PORT}"
export SGCD_NUM_PROCESSES="$NUM_PROCESSES"
if [[ -n "${HEARTBEAT_TIMEOUT_S:-}" ]]; then
  export SGCD_HEARTBEAT_TIMEOUT_S="$HEARTBEAT_TIMEOUT_S"
fi

pids=()
cleanup() {
  for pid in "${pids[@]:-}"; do
    [[ -n "$pid" ]] && kill "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT INT TERM

mkdir -p "$LOG_DIR"
for ((i = 0; i < NUM_PROCESSES; i++)); do
  env_vars=(SGCD_PROCESS_ID="$i")
  if [[ "$PLATFORM" == cpu ]]; then
    env_vars+=(JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}")
  else
    first=$((i * DEVICES_PER_PROCESS))
    ids=$(seq -s, "$first" $((first + DEVICES_PER_PROCESS - 1)))
    env_vars+=(SGCD_LOCAL_DEVICE_IDS="$ids")
  fi
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "SGCD_COORDINATOR_ADDRESS=$SGCD_COORDINATOR_ADDRESS SGCD_NUM_PROCESSES=$NUM_PROCESSES ${env_vars[*]} $ENTRYPOINT $*"
    continue
  fi
  # ENTRYPOINT is a command line (may hold quotes); the script's arguments follow it.
  env "${env_vars[@]}" bash -c "exec $ENTRYPOINT \"\$@\"" entrypoint "$@" >"$LOG_DIR/process_$i.log" 2>&1 &
  pids+=("$!")
done
[[ "$DRY_RUN" == 1 ]] && exit 0

echo "started ${#pids[@]} processes (coordinator $SGCD_COORDINATOR_ADDRESS); logs in $LOG_DIR/"
status=0
while ((${#pids[@]})); do
  # wait -n: the first process to finish decides; a failure stops the rest.
  wait -n "${pids[@]}" || status=$?
  if ((status != 0)); then
    echo "a process exited with status $status; stopping the others (see $LOG_DIR/)" >&2
    break
  fi
  alive=()
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
  pids=("${alive[@]:-}")
  [[ -z "${pids[0]:-}" ]] && pids=()
done
exit "$status"
