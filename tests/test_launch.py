"""launch/: scripts parse, render the commands and environment they promise, and fail loudly."""

import json
import os
import re
import stat
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = ["local_multiprocess.sh", "tpu_vm.sh", "slurm_gpu.sbatch", "device_check.sh"]


def _run(script, *args, env=None, cwd=None, timeout=60):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SGCD_", "TPU_"))}
    full_env.update(env or {})
    return subprocess.run(["bash", str(LAUNCH / script), *args], env=full_env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_are_executable(script):
    path = LAUNCH / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    assert path.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"
    assert "set -" in path.read_text()  # fails fast on errors


# ----------------------------------------------------------------------------- local_multiprocess.sh

def test_local_dry_run_gives_each_process_its_id_and_one_coordinator():
    out = _run("local_multiprocess.sh", "--config", "configs/quickstart.py",
               env={"DRY_RUN": "1", "NUM_PROCESSES": "3", "DEVICES_PER_PROCESS": "2"}).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 3
    assert [re.search(r"SGCD_PROCESS_ID=(\d+)", l).group(1) for l in lines] == ["0", "1", "2"]
    assert len({re.search(r"SGCD_COORDINATOR_ADDRESS=(\S+)", l).group(1) for l in lines}) == 1
    assert all("--xla_force_host_platform_device_count=2" in l and "SGCD_NUM_PROCESSES=3" in l
               and l.endswith("python -m sgcd_jax.train --config configs/quickstart.py") for l in lines)


def test_local_gpu_mode_splits_devices_between_processes():
    out = _run("local_multiprocess.sh", env={"DRY_RUN": "1", "PLATFORM": "gpu", "NUM_PROCESSES": "2",
                                             "DEVICES_PER_PROCESS": "4"}).stdout
    assert re.findall(r"SGCD_LOCAL_DEVICE_IDS=(\S+)", out) == ["0,1,2,3", "4,5,6,7"]


def test_local_run_passes_environment_and_arguments(tmp_path):
    entry = (f"{sys.executable} -c \"import os,sys,json; print(json.dumps([os.environ[k] for k in "
             f"('SGCD_PROCESS_ID','SGCD_NUM_PROCESSES','SGCD_COORDINATOR_ADDRESS')] + sys.argv[1:]))\"")
    result = _run("local_multiprocess.sh", "--x=1", "two words",
                  env={"ENTRYPOINT": entry, "LOG_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    logs = [json.loads((tmp_path / f"process_{i}.log").read_text()) for i in range(2)]
    assert [log[0] for log in logs] == ["0", "1"] and {log[1] for log in logs} == {"2"}
    assert logs[0][2] == logs[1][2] and logs[0][2].startswith("127.0.0.1:")
    assert logs[0][3:] == ["--x=1", "two words"]


def test_local_failure_stops_the_other_processes_and_propagates_status(tmp_path):
    entry = (f"{sys.executable} -c \"import os,sys,time; p=os.environ['SGCD_PROCESS_ID']; "
             f"time.sleep(60 if p=='0' else 0.2); sys.exit(7)\"")
    started = time.monotonic()
    result = _run("local_multiprocess.sh", env={"ENTRYPOINT": entry, "LOG_DIR": str(tmp_path)},
                  timeout=40)
    assert result.returncode == 7 and time.monotonic() - started < 30
    assert "stopping the others" in result.stderr


def test_local_rejects_bad_counts():
    result = _run("local_multiprocess.sh", env={"NUM_PROCESSES": "0", "DRY_RUN": "1"})
    assert result.returncode == 2 and "positive" in result.stderr


# ----------------------------------------------------------------------------- tpu_vm.sh

TPU_ENV = {"DRY_RUN": "1", "TPU_NAME": "sgcd", "ZONE": "us-east5-a", "PROJECT": "proj",
           "ACCELERATOR_TYPE": "v5p-16"}


def test_tpu_create_picks_the_runtime_for_the_accelerator():
    out = _run("tpu_vm.sh", "create", env=TPU_ENV).stdout
    assert "tpu-vm create sgcd" in out and "--version=v2-alpha-tpuv5 " in out + " "
    lite = _run("tpu_vm.sh", "create", env={**TPU_ENV, "ACCELERATOR_TYPE": "v5litepod-16", "SPOT": "1"})
    assert "--version=v2-alpha-tpuv5-lite" in lite.stdout and "--spot" in lite.stdout


def test_tpu_run_goes_to_all_workers_with_tpu_detection_and_no_secret_values():
    env = {**TPU_ENV, "GEMINI_SECRET": "gemini-key", "GEMINI_API_KEY": "sk-must-not-appear"}
    out = _run("tpu_vm.sh", "run", "--config", "configs/sgcd.py", "--config.run.name=a b", env=env).stdout
    assert "--worker=all" in out and "SGCD_CLUSTER=tpu" in out and "sgcd_jax.train" in out
    assert "secrets\\ versions\\ access" in out and "sk-must-not-appear" not in out
    assert "--config.run.name=a\\\\\\ b" in out  # the argument keeps its space through two shells
    setup = _run("tpu_vm.sh", "setup", env=TPU_ENV).stdout
    assert setup.count("--worker=all") == 2 and "jax\\[tpu\\]==0.10.2" in setup


def test_tpu_missing_variables_are_named():
    result = _run("tpu_vm.sh", "create", env={"DRY_RUN": "1", "TPU_NAME": "x"})
    assert result.returncode == 2
    assert "ZONE" in result.stderr and "ACCELERATOR_TYPE" in result.stderr and "PROJECT" in result.stderr


# ----------------------------------------------------------------------------- slurm_gpu.sbatch

def test_slurm_directives_give_one_process_per_gpu():
    text = (LAUNCH / "slurm_gpu.sbatch").read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))
    assert directives["ntasks-per-node"] == directives["gpus-per-node"]  # JAX's SLURM default
    assert "srun --kill-on-bad-exit=1" in text and "python -m sgcd_jax.train" in text


def test_slurm_script_runs_srun_with_slurm_detection(tmp_path):
    fake_srun = tmp_path / "srun"
    fake_srun.write_text("#!/usr/bin/env bash\necho \"SGCD_CLUSTER=$SGCD_CLUSTER ARGS=$*\"\n")
    fake_srun.chmod(0o755)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_NTASKS": "16",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[1-2]", "SLURM_SUBMIT_DIR": str(tmp_path)}
    result = _run("slurm_gpu.sbatch", "--config", "configs/sgcd.py", env=env)
    assert result.returncode == 0, result.stderr
    assert "SGCD_CLUSTER=slurm" in result.stdout
    assert f"sgcd_jax.train --config configs/sgcd.py --config.run.workdir={tmp_path}/runs" in result.stdout
    outside = _run("slurm_gpu.sbatch", env={"PATH": os.environ["PATH"]})
    assert outside.returncode != 0 and "sbatch" in outside.stderr


# ----------------------------------------------------------------------------- gke_jobset.yaml

GKE_VARS = {"JOB_NAME": "sgcd-v5p", "IMAGE": "img:1", "TPU_ACCELERATOR": "tpu-v5p-slice",
            "TPU_TOPOLOGY": "2x2x2", "NUM_HOSTS": "2", "CHIPS_PER_HOST": "4",
            "CONFIG": "configs/sgcd.py", "RUN_WORKDIR": "gs://b/runs"}


def test_jobset_uses_exactly_the_documented_variables():
    text = (LAUNCH / "gke_jobset.yaml").read_text()
    body = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))
    used = set(re.findall(r"\$\{(\w+)\}", body))
    assert used == set(GKE_VARS)
    header = "\n".join(l for l in text.splitlines() if l.startswith("#"))
    assert all(f"{name}=" in header for name in GKE_VARS), "header must document every variable"
    with pytest.raises(KeyError):
        string.Template(text).substitute({k: v for k, v in GKE_VARS.items() if k != "IMAGE"})


def test_rendered_jobset_is_a_valid_tpu_jobset():
    manifest = yaml.safe_load(string.Template((LAUNCH / "gke_jobset.yaml").read_text()).substitute(GKE_VARS))
    assert manifest["kind"] == "JobSet" and manifest["apiVersion"].startswith("jobset.x-k8s.io/")
    job = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 2
    pod = job["template"]["spec"]
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "2x2x2"
    container = pod["containers"][0]
    assert container["command"] == ["python", "-m", "sgcd_jax.train"]
    assert container["resources"]["limits"]["google.com/tpu"] == 4
    env = {e["name"]: e for e in container["env"]}
    assert env["SGCD_CLUSTER"]["value"] == "tpu"
    assert "secretKeyRef" in env["GEMINI_API_KEY"]["valueFrom"]  # never a literal key


# ----------------------------------------------------------------------------- device_check.sh

FAKE_BENCH = """
import json, sys, time
name = sys.argv[1]
mode = "{mode}"
if mode == "sleep":
    time.sleep(60)
if mode == "fail" and name == "train_step":
    sys.exit("CUDA out of memory")
print("compiling ...")  # logs before the JSON, and the JSON is indented, like the real benches
if name == "sampler":
    print(json.dumps({{"single_turn": {{"param_bytes": 270_000_000, "batch1": {{
        "ours_tokens_per_s": 5000.0, "ours_bandwidth_fraction": 0.41}}}}}}, indent=1))
else:
    print(json.dumps({{"bench": "train_step", "ours_gflops": 98940.0,
                      "ours_fraction_of_peak": 0.37}}, indent=2))
"""


def _device_check(tmp_path, mode, **env):
    bench = tmp_path / "bench.py"
    bench.write_text(FAKE_BENCH.format(mode=mode))
    full = {"ALLOW_CPU": "1", "BENCH": f"{sys.executable} {bench}", "OUT_DIR": str(tmp_path / "out"),
            "PATH": "/usr/bin:/bin:" + os.path.dirname(sys.executable), **env}
    return _run("device_check.sh", env=full, timeout=90)


def test_device_check_prints_mfu_and_bandwidth_fraction(tmp_path):
    result = _device_check(tmp_path, "ok")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["mfu"] == 0.37 and report["decode_bandwidth_fraction"] == 0.41 and report["ok"]
    assert "host memory copy" in report["decode_bandwidth_basis"]  # no GPU name: the bench's figure


def test_device_check_uses_the_gpu_spec_when_the_device_is_known(tmp_path):
    fake_smi = tmp_path / "bin" / "nvidia-smi"
    fake_smi.parent.mkdir()
    fake_smi.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559 MiB'\n")
    fake_smi.chmod(0o755)
    result = _device_check(tmp_path, "ok", PATH=f"{fake_smi.parent}:/usr/bin:/bin:"
                           + os.path.dirname(sys.executable))
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["device"].startswith("NVIDIA H100")
    assert report["decode_bandwidth_fraction"] == pytest.approx(270e6 * 5000 / 3.35e12, rel=1e-3)
    assert report["mfu_vs_spec_bf16_dense"] == pytest.approx(0.1, rel=1e-3)


def test_device_check_reports_a_failing_bench(tmp_path):
    result = _device_check(tmp_path, "fail")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 1 and not report["ok"]
    assert "out of memory" in report["train_step"]["error"] and report["mfu"] is None


def test_device_check_time_limits_each_bench(tmp_path):
    started = time.monotonic()
    result = _device_check(tmp_path, "sleep", SAMPLER_TIMEOUT_S="2", TRAIN_STEP_TIMEOUT_S="2")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["sampler"]["error"] == "timed out" and time.monotonic() - started < 30


def test_device_check_default_limits_fit_in_eight_minutes():
    text = (LAUNCH / "device_check.sh").read_text()
    limits = [int(x) for x in re.findall(r'TIMEOUT_S:-(\d+)', text)]
    assert len(limits) == 2 and sum(limits) + 2 * 10 + 30 < 8 * 60  # + kill grace + startup


def test_device_check_refuses_to_run_without_a_gpu(tmp_path):
    result = _run("device_check.sh", env={"PATH": "/usr/bin:/bin"})
    if "nvidia-smi" in subprocess.run(["bash", "-c", "command -v nvidia-smi"], capture_output=True,
                                      text=True).stdout:
        pytest.skip("this machine has a GPU")
    assert result.returncode == 2 and "GPU machine" in result.stderr
