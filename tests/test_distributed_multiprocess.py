"""Two local processes × 4 simulated CPU devices behave like one process × 8 devices.

This file is also the worker: ``python tests/test_distributed_multiprocess.py --mode train ...``.
The workers run 2 iterations of a stand-in train step built from the project's parts — a tiny
Qwen3-style ``models.Decoder`` placed by ``sharding.shard_model`` (FSDP rules) on a (data=2, fsdp=4)
mesh, the losses' ``ppo_policy_loss``, AdamW — on a batch that each process builds from its own rows
(``distributed.global_batch``), with metrics reduced by ``distributed.reduce_metrics``.
TODO(trainer): switch to 2 iterations of ``sgcd_jax.train`` on its tiny config once it lands.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH, SEQ, VOCAB, DIM = 8, 12, 64, 32


# ----------------------------------------------------------------------------- worker side

def _worker(args: argparse.Namespace) -> None:
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sgcd_jax import distributed

    if args.num_processes > 1:
        distributed.initialize(distributed.DistributedConfig(
            cluster="explicit", coordinator_address=f"127.0.0.1:{args.port}",
            num_processes=args.num_processes, process_id=args.process_id,
            initialization_timeout_s=60, heartbeat_timeout_s=args.heartbeat_s,
            shutdown_timeout_s=10))
    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    print(json.dumps({"event": "ready", "process": jax.process_index()}), flush=True)

    if args.mode == "hang":  # collectives forever; the test kills a peer
        total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))
        ones = distributed.global_batch(np.ones((4, 4), np.float32), mesh)
        while True:
            float(total(ones))
            distributed.reduce_metrics({"alive": 1.0}, "sum")
            time.sleep(0.1)

    from flax import nnx

    from sgcd_jax import sharding
    from sgcd_jax.losses import PolicyBatch, PolicyLossConfig, ppo_policy_loss
    from sgcd_jax.models import Decoder, ModelConfig

    model_cfg = ModelConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=2 * DIM, num_layers=2,
                            num_heads=4, num_kv_heads=2, qk_norm=True)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4, tp=1))
    model = sharding.shard_model(Decoder(model_cfg, rngs=nnx.Rngs(0)), mesh)  # params FSDP-sharded
    graphdef, params = nnx.split(model, nnx.Param)
    initial = distributed.fully_replicated_host_copy(params)
    loss_cfg = PolicyLossConfig(clip_low=0.2, clip_high=0.28)
    optimizer = optax.adamw(1e-2)
    opt_state = jax.jit(optimizer.init)(params)

    def token_logprobs(p, batch):  # log π(y_t | y_<t) of each next token, [B, T-1]
        net = nnx.merge(graphdef, p)
        tokens = batch["tokens"]
        positions = jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), tokens.shape)
        hidden, _ = net(tokens, positions, jnp.ones(tokens.shape, bool))
        logprobs = jax.nn.log_softmax(net.logits(hidden)[:, :-1])  # tiny V: fine here
        return jnp.take_along_axis(logprobs, tokens[:, 1:, None], -1)[..., 0]

    def loss_fn(p, batch):
        logprobs = token_logprobs(p, batch)
        out = ppo_policy_loss(PolicyBatch(logprobs=logprobs, old_logprobs=batch["old_logprobs"],
                                          advantages=batch["advantages"][:, None],
                                          loss_mask=batch["loss_mask"][:, 1:]), loss_cfg)
        return out.value

    @jax.jit
    def train_step(p, state, batch):
        old = jax.lax.stop_gradient(token_logprobs(p, batch))  # on-policy: π_old = π_θ
        loss, grads = jax.value_and_grad(loss_fn)(p, dict(batch, old_logprobs=old))
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    rows = slice(args.process_id * GLOBAL_BATCH // args.num_processes,
                 (args.process_id + 1) * GLOBAL_BATCH // args.num_processes)
    losses = []
    for iteration in range(args.iterations):
        data_rng = np.random.default_rng(100 + iteration)  # the global batch of this iteration
        full = {"tokens": data_rng.integers(0, VOCAB, (GLOBAL_BATCH, SEQ)).astype(np.int32),
                "loss_mask": (data_rng.random((GLOBAL_BATCH, SEQ)) < 0.7).astype(np.float32),
                "advantages": data_rng.normal(size=(GLOBAL_BATCH,)).astype(np.float32)}
        local = {k: v[rows] for k, v in full.items()}  # only this process's rows
        batch = distributed.global_batch(local, mesh)
        params, opt_state, loss = train_step(params, opt_state, batch)
        losses.append(distributed.reduce_metrics({"loss": float(loss)}, "max")["loss"])
    params = {sharding.path_to_str(path): leaf for path, leaf in
              jax.tree_util.tree_leaves_with_path(params)}
    params.update({"initial/" + sharding.path_to_str(path): leaf for path, leaf in
                   jax.tree_util.tree_leaves_with_path(initial)})
    final = distributed.fully_replicated_host_copy(params)
    if distributed.is_main_process():
        np.savez(args.out, **final)
    distributed.barrier("saved", timeout_s=60)
    print(json.dumps({"event": "done", "process": jax.process_index(), "losses": losses}), flush=True)


# ----------------------------------------------------------------------------- test side

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(mode: str, process_id: int, num_processes: int, port: int, devices: int, out: Path,
           heartbeat_s: int = 10, iterations: int = 2) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    for key in list(env):  # stray cluster variables must not steer auto-detection
        if key.startswith(("SLURM_", "SGCD_", "JAX_COORDINATOR", "TPU_", "OMPI_")):
            env.pop(key)
    cmd = [sys.executable, __file__, "--mode", mode, "--process_id", str(process_id),
           "--num_processes", str(num_processes), "--port", str(port), "--out", str(out),
           "--heartbeat_s", str(heartbeat_s), "--iterations", str(iterations)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run_group(mode: str, num_processes: int, out: Path, timeout_s: float = 150,
               iterations: int = 2) -> list[str]:
    """Start the processes, retrying on a fresh port if the coordinator port was taken."""
    for attempt in range(3):
        port = _free_port()
        procs = [_spawn(mode, i, num_processes, port, 8 // num_processes, out, iterations=iterations)
                 for i in range(num_processes)]
        try:
            outputs = [p.communicate(timeout=timeout_s)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        if all(p.returncode == 0 for p in procs):
            return outputs
        joined = "\n".join(outputs)
        if "address already in use" not in joined.lower() or attempt == 2:
            raise AssertionError(f"{mode} run with {num_processes} processes failed:\n{joined[-4000:]}")
    raise AssertionError("unreachable")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_processes_reach_same_params_as_one_process(tmp_path):
    multi = tmp_path / "multi.npz"
    single = tmp_path / "single.npz"
    _run_group("train", 2, multi)
    _run_group("train", 1, single)
    multi_params, single_params = np.load(multi), np.load(single)
    assert sorted(multi_params.files) == sorted(single_params.files) and len(single_params.files) > 5
    for name in single_params.files:
        np.testing.assert_allclose(multi_params[name], single_params[name], rtol=2e-5, atol=2e-6,
                                   err_msg=f"param {name} differs between 2x4 and 1x8 devices")
    trained = [n for n in single_params.files if not n.startswith("initial/")]
    moved = max(np.abs(single_params[n] - single_params["initial/" + n]).max() for n in trained)
    assert moved > 1e-3, "training did not change the params"


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize("killed", [1, 0], ids=["kill_worker", "kill_coordinator"])
def test_killing_one_process_makes_the_other_exit_with_an_error(tmp_path, killed):
    heartbeat_s = 5
    survivor = 1 - killed
    port = _free_port()
    procs = [_spawn("hang", i, 2, port, 4, tmp_path / "x.npz", heartbeat_s) for i in range(2)]
    try:
        deadline = time.monotonic() + 120
        line = ""
        while '"ready"' not in line and time.monotonic() < deadline:
            line = procs[survivor].stdout.readline()
            assert line or procs[survivor].poll() is None, "survivor exited before getting ready"
        assert '"ready"' in line, "survivor never got ready"
        time.sleep(1.0)  # both inside the collective loop
        procs[killed].kill()
        killed_at = time.monotonic()
        bound_s = heartbeat_s * 4 + 20
        try:
            rest = procs[survivor].communicate(timeout=bound_s)[0]
        except subprocess.TimeoutExpired:
            pytest.fail(f"process {survivor} still running {bound_s}s after its peer was killed")
        elapsed = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[survivor].returncode != 0, f"survivor exited cleanly?\n{rest[-3000:]}"
    assert elapsed < bound_s
    # Either the coordinator's heartbeat check or the broken collective names the cause.
    lowered = rest.lower()
    assert ("heartbeat timeout" in lowered or "another task died" in lowered
            or "connection closed by peer" in lowered), rest[-3000:]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("train", "hang"), required=True)
    parser.add_argument("--process_id", type=int, default=0)
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--heartbeat_s", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=2)
    _worker(parser.parse_args())
