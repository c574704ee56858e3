#!/usr/bin/env bash
# One-shot accelerator check on a GPU machine (< 8 minutes on one H100): runs the sampler and the
# train-step benchmarks and prints one JSON object with MFU and the decode bandwidth fraction.
#
#   launch/device_check.sh                 # from the repository root, on the GPU machine
#
# Variables: BENCH ("python -m sgcd_jax.bench"), SAMPLER_ARGS / TRAIN_STEP_ARGS (extra bench
#   arguments), SAMPLER_TIMEOUT_S (210), TRAIN_STEP_TIMEOUT_S (210), OUT_DIR (where the raw bench
#   outputs go; $OUT if set, else a temp dir), ALLOW_CPU=1 (run without a GPU, for dry runs).
# Each bench gets its own time limit so the whole script stays under 8 minutes; a bench that fails
# or times out is reported in the JSON ("error") and the script exits 1.
set -uo pipefail

BENCH="${BENCH:-python -m sgcd_jax.bench}"
SAMPLER_TIMEOUT_S="${SAMPLER_TIMEOUT_S:-210}"
TRAIN_STEP_TIMEOUT_S="${TRAIN_STEP_TIMEOUT_S:-210}"
OUT_DIR="${OUT_DIR:-${OUT:-$(mktemp -d)}}"
mkdir -p "$OUT_DIR"

if command -v nvidia-smi >/dev/null 2>&1; then
  device="$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -n1)"
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
elif [[ "${ALLOW_CPU:-0}" == 1 ]]; then
  device="cpu (ALLOW_CPU=1)"
else
  echo "device_check.sh: no nvidia-smi: run it on a GPU machine (or ALLOW_CPU=1 for a dry run)" >&2
  exit 2
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.85}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

started=$SECONDS
run_bench() {  # name timeout args...
  local name="$1" limit="$2"; shift 2
  local begin=$SECONDS
  # shellcheck disable=SC2086  # BENCH is a command line on purpose
  timeout --kill-after=10 "$limit" $BENCH "$name" "$@" >"$OUT_DIR/$name.out" 2>"$OUT_DIR/$name.err"
  local rc=$?
  echo "$rc $((SECONDS - begin))" >"$OUT_DIR/$name.status"
}
# shellcheck disable=SC2086
run_bench sampler "$SAMPLER_TIMEOUT_S" ${SAMPLER_ARGS:-}
# shellcheck disable=SC2086
run_bench train_step "$TRAIN_STEP_TIMEOUT_S" ${TRAIN_STEP_ARGS:-}

DEVICE="$device" ELAPSED="$((SECONDS - started))" python - "$OUT_DIR" <<'PY'
import json, os, sys

out_dir = sys.argv[1]


def last_json(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def find(tree, words):
    """First numeric value whose key contains all of ``words`` (depth-first)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if all(w in key.lower() for w in words) and isinstance(value, (int, float)):
                return value
        for value in tree.values():
            found = find(value, words)
            if found is not None:
                return found
    if isinstance(tree, list):
        for value in tree:
            found = find(value, words)
            if found is not None:
                return found
    return None


report = {"device": os.environ["DEVICE"], "elapsed_s": int(os.environ["ELAPSED"]), "ok": True}
for name in ("sampler", "train_step"):
    rc, seconds = open(os.path.join(out_dir, f"{name}.status")).read().split()
    result = last_json(open(os.path.join(out_dir, f"{name}.out")).read())
    entry = {"exit_code": int(rc), "seconds": int(seconds), "result": result}
    if int(rc) != 0 or result is None:
        err = open(os.path.join(out_dir, f"{name}.err")).read()[-1500:]
        entry["error"] = "timed out" if int(rc) in (124, 137) else (err or "no JSON printed")
        report["ok"] = False
    report[name] = entry
report["mfu"] = find(report["train_step"]["result"], ("mfu",))
report["decode_bandwidth_fraction"] = (find(report["sampler"]["result"], ("bandwidth", "fraction"))
                                       or find(report["sampler"]["result"], ("bw", "frac")))
print(json.dumps(report))
sys.exit(0 if report["ok"] else 1)
PY
