"""XLA's compiled memory of a recipe's update (RL or SFT warm-up) at given batch shapes, without running it.

    python -m sgcd_jax.bench update_memory --config configs/smollm2_airline_lite.py --rows 4 --length 704 --sft
    python -m sgcd_jax.bench update_memory --config configs/smollm2_airline_lite.py --rows 32 --length 2048

Builds the model and the Learner exactly as `train` does (the recipe's mesh, optimizer, step spec; for
`--sft` the warm-up learner of `phases.run_sft`), lowers its jitted update on abstract inputs of
[rows, length] tokens and prints one JSON object: compile seconds and `memory_analysis()` bytes
(temp = XLA scratch beyond arguments and outputs; arguments = params, master, optimizer state, batch).
`--set key=value` applies config overrides (e.g. `--set model.remat_policy=none`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp

from sgcd_jax.config_files import load_config_file
from sgcd_jax.learner.scoring import PackedBatch
from sgcd_jax.learner.train_step import Learner, StepInputs, make_optimizer
from sgcd_jax.parallel.sharding import MeshConfig, make_mesh
from sgcd_jax.trainer import phases


def abstract_inputs(rows: int, length: int) -> StepInputs:
    """ShapeDtypeStructs of one update's inputs: [rows, length] student and teacher rows."""
    tokens = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    mask = jax.ShapeDtypeStruct((rows, length), jnp.bool_)
    per_target = jax.ShapeDtypeStruct((rows, length - 1), jnp.float32)
    batch = PackedBatch(tokens=tokens, token_mask=mask, target_mask=per_target,
                        step_ids=jax.ShapeDtypeStruct((rows, length - 1), jnp.int32), sampler_logprobs=per_target,
                        teacher_tokens=tokens, teacher_mask=mask,
                        teacher_index=jax.ShapeDtypeStruct((rows, length - 1), jnp.int32),
                        has_teacher=jax.ShapeDtypeStruct((rows,), jnp.float32),
                        row_valid=jax.ShapeDtypeStruct((rows,), jnp.float32))
    return StepInputs(batch, per_target, per_target, per_target, per_target)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m sgcd_jax.bench update_memory")
    parser.add_argument("--config", required=True)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--length", type=int, required=True)
    parser.add_argument("--sft", action="store_true", help="the SFT warm-up's learner instead of the RL one")
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = type(_lookup(load_config_file(args.config), key))(value)
    config = load_config_file(args.config, overrides)
    model, _ = phases.build_model(config.model, seed=config.run.seed)
    mesh = make_mesh(MeshConfig(data=config.mesh.data, fsdp=config.mesh.fsdp, tp=config.mesh.tp))
    spec = phases.step_spec(config)
    if args.sft:  # phases.run_sft's learner
        tx = make_optimizer(config.optim, config.sft.steps, config.sft.learning_rate, trainable="")
        spec = dataclasses.replace(spec, sft=True, aux=(), vocab=dataclasses.replace(spec.vocab, temperature=1.0),
                                   micro_batch_size=min(config.sft.batch_size, config.optim.micro_batch_size))
    else:
        tx = make_optimizer(config.optim, config.run.num_iterations * config.optim.updates_per_iteration)
    learner = Learner(model, tx, spec, mesh=mesh)
    started = time.perf_counter()
    compiled = learner._update.lower(learner.params, learner.master, learner.opt_state, learner.rest,
                                     abstract_inputs(args.rows, args.length),
                                     jax.ShapeDtypeStruct((), jnp.uint32)).compile()
    seconds = time.perf_counter() - started
    memory = compiled.memory_analysis()
    print(json.dumps({"config": args.config, "sft": args.sft, "rows": args.rows, "length": args.length,
                      "micro_batch_size": spec.micro_batch_size, "remat_policy": config.model.remat_policy,
                      "overrides": overrides, "compile_s": round(seconds, 1),
                      "temp_gib": round(memory.temp_size_in_bytes / 2**30, 3),
                      "argument_gib": round(memory.argument_size_in_bytes / 2**30, 3),
                      "output_gib": round(memory.output_size_in_bytes / 2**30, 3),
                      "alias_gib": round(memory.alias_size_in_bytes / 2**30, 3)}))
    return 0


def _lookup(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node
