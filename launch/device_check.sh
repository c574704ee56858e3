#!/usr/bin/env bash
# One-shot accelerator check on a GPU machine (< 8 minutes on one H100): runs the sampler and the
# train-step benchmarks and prints one JSON object with MFU and the decode bandwidth fraction.
#
#   launch/device_check.sh                 # from the repository root, on the GPU machine
#
# MFU = the train-step bench's model FLOP/s over the matmul peak it measures in the same run (also
# against the bf16 dense spec); decode bandwidth fraction = param bytes × batch-1 decode tokens/s
# over the GPU's HBM spec bandwidth.
# Variables: BENCH ("python -m sgcd_jax.bench"), SAMPLER_ARGS / TRAIN_STEP_ARGS (bench
#   arguments; defaults below), SAMPLER_TIMEOUT_S (210), TRAIN_STEP_TIMEOUT_S (210), OUT_DIR (where the raw bench
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
# torch here is the CPU build: skip the transformers peer in the train-step bench on the GPU box.
SAMPLER_ARGS="${SAMPLER_ARGS:---repeats 2 --episodes 8}"
TRAIN_STEP_ARGS="${TRAIN_STEP_ARGS:---skip-torch --batch 8 --seq 1024 --steps 5}"
# shellcheck disable=SC2086
run_bench sampler "$SAMPLER_TIMEOUT_S" $SAMPLER_ARGS
# shellcheck disable=SC2086
run_bench train_step "$TRAIN_STEP_TIMEOUT_S" $TRAIN_STEP_ARGS

DEVICE="$device" ELAPSED="$((SECONDS - started))" python - "$OUT_DIR" <<'PY'
import json, os, sys

out_dir = sys.argv[1]
# Dense spec peaks of the GPUs this script is meant for: (HBM bytes/s, bf16 dense FLOP/s).
SPECS = [("H100 PCIe", 2.0e12, 756e12), ("H100 NVL", 3.9e12, 835e12), ("H100", 3.35e12, 989e12),
         ("H200", 4.8e12, 989e12), ("A100-SXM4-80GB", 2.039e12, 312e12), ("A100", 1.555e12, 312e12)]


def last_json(text):
    """The last JSON object printed (the benches print indented JSON after their logs)."""
    decoder = json.JSONDecoder()
    starts = [i for i, ch in enumerate(text) if ch == "{" and (i == 0 or text[i - 1] == "\n")]
    for start in reversed(starts):
        try:
            return decoder.raw_decode(text[start:])[0]
        except json.JSONDecodeError:
            continue
    return None


def spec_for(device):
    for name, bandwidth, flops in SPECS:
        if name.lower() in device.lower():
            return bandwidth, flops
    return None, None


device = os.environ["DEVICE"]
report = {"device": device, "elapsed_s": int(os.environ["ELAPSED"]), "ok": True}
for name in ("sampler", "train_step"):
    rc, seconds = open(os.path.join(out_dir, f"{name}.status")).read().split()
    result = last_json(open(os.path.join(out_dir, f"{name}.out")).read())
    entry = {"exit_code": int(rc), "seconds": int(seconds), "result": result}
    if int(rc) != 0 or result is None:
        err = open(os.path.join(out_dir, f"{name}.err")).read()[-1500:]
        entry["error"] = "timed out" if int(rc) in (124, 137) else (err or "no JSON printed")
        report["ok"] = False
    report[name] = entry

hbm_bandwidth, bf16_peak = spec_for(device)
train = report["train_step"]["result"] or {}
report["mfu"] = train.get("ours_fraction_of_peak")
report["mfu_basis"] = "model FLOP/s / dense matmul peak measured in the same run and dtype"
if bf16_peak and train.get("ours_gflops") is not None:
    report["mfu_vs_spec_bf16_dense"] = round(train["ours_gflops"] * 1e9 / bf16_peak, 4)
sampler = report["sampler"]["result"] or {}
single = sampler.get("single_turn", {})
batch1 = single.get("batch1", {})
if hbm_bandwidth and single.get("param_bytes") and batch1.get("ours_tokens_per_s"):
    # Batch-1 decode reads every parameter once per token: achieved bytes/s over the HBM spec.
    achieved = single["param_bytes"] * batch1["ours_tokens_per_s"]
    report["decode_bandwidth_fraction"] = round(achieved / hbm_bandwidth, 4)
    report["decode_bandwidth_basis"] = f"param bytes x batch-1 tokens/s / {hbm_bandwidth / 1e12:.2f} TB/s HBM spec"
else:
    report["decode_bandwidth_fraction"] = batch1.get("ours_bandwidth_fraction")
    report["decode_bandwidth_basis"] = "bench's own figure (vs a host memory copy)"
print(json.dumps(report))
sys.exit(0 if report["ok"] else 1)
PY
