"""The jitted update: micro-batched gradient accumulation of the actor loss, AdamW, grad clipping,
non-finite skip. Also the SFT (demonstration) step, which shares the machinery.

Exactness: each loss returns (sum, denominator); denominators are computed once over the FULL
batch masks, so Σ_micro ∇(sum_m / D) equals the gradient of the full-batch loss for every
aggregation mode.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sgcd_jax.config import OptimSpec
from sgcd_jax.losses.distill import DistillBatch, DistillConfig
from sgcd_jax.losses.policy import PolicyBatch, PolicyLossConfig
from sgcd_jax.losses.registry import get
from sgcd_jax.losses.types import aggregate
from sgcd_jax.losses.vocab import VocabConfig, pair_stats, token_stats
from sgcd_jax.learner.scoring import PackedBatch, forward_hidden, gather_rows
from sgcd_jax.parallel.sharding import path_to_str, state_shardings


@flax.struct.dataclass
class StepInputs:
    batch: PackedBatch
    token_advantages: jax.Array  # [N, T-1] Ã (credit-weighted GRPO advantages), detached
    old_logprobs: jax.Array  # [N, T-1] log π_old from the scoring pass
    ref_logprobs: jax.Array  # [N, T-1] reference-model logprobs (zeros when no KL)
    teacher_logprobs: jax.Array  # [N, T-1] teacher logprobs (SDPO only; zeros otherwise)


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static structure of the update (hashable). Loss functions are registry names
    (``policy_loss/<policy_fn>``, ``aux_loss/<name>`` for each of ``aux``), looked up when traced."""

    policy: PolicyLossConfig
    vocab: VocabConfig
    micro_batch_size: int
    policy_fn: str = "ppo"
    aux: tuple[str, ...] = ()  # e.g. ("sdpo",): actor losses toward the teacher, with ``distill``
    distill: DistillConfig = DistillConfig()
    sft: bool = False
    # optim.master_dtype: "float32" = fp32 master weights + moments whenever a param is stored in a
    # lower precision (the model keeps its bf16 copy for the forward); "param" = opt-in bf16-only
    # storage (moments too) with stochastic rounding of every update.
    master_dtype: str = "float32"


def trainable_labels(params, pattern: str):
    """'train' / 'freeze' per leaf: parameters whose path (sharding.path_to_str, e.g.
    'layers/0/mlp/up_proj/kernel') ``re.search``-matches ``pattern`` train ("" = all); a pattern that
    matches none is an error, not a silent no-op run."""
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "train" if not pattern or re.search(pattern, path_to_str(path)) else "freeze", params)
    if pattern and "train" not in jax.tree.leaves(labels):
        paths = [path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        raise ValueError(f"optim.trainable={pattern!r} matches no parameter; paths look like {paths[:4]}")
    return labels


MAX_LEARNING_RATE = 1.0  # AdamW steps each weight by ~lr: above this a single update destroys the policy


def make_optimizer(optim: OptimSpec, total_steps: int, learning_rate: float | None = None, *,
                   trainable: str | None = None) -> optax.GradientTransformation:
    """AdamW with linear warmup then cosine (or constant) schedule, after global-norm clipping.
    ``trainable`` (default ``optim.trainable``): a regex over parameter paths; the others get zero
    updates and no optimizer moments (clipping sees only the trained gradients)."""
    trainable = optim.trainable if trainable is None else trainable
    inner = _adamw(optim, total_steps, learning_rate)
    if not trainable:
        return inner
    return optax.multi_transform({"train": inner, "freeze": optax.set_to_zero()},
                                 lambda params: trainable_labels(params, trainable))


def _adamw(optim: OptimSpec, total_steps: int, learning_rate: float | None) -> optax.GradientTransformation:
    peak = optim.learning_rate if learning_rate is None else learning_rate
    if not (math.isfinite(peak) and 0 < peak <= MAX_LEARNING_RATE):
        raise ValueError(f"learning rate {peak!r} must be finite and in (0, {MAX_LEARNING_RATE}] "
                         "(optim.learning_rate / sft.learning_rate): AdamW moves each weight by about lr per step")
    total_steps = max(total_steps, optim.warmup_steps + 1)
    if optim.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0 if optim.warmup_steps else peak, peak_value=peak,
            warmup_steps=optim.warmup_steps, decay_steps=total_steps, end_value=peak * optim.end_lr_fraction)
    else:
        schedule = optax.join_schedules([optax.linear_schedule(0.0, peak, max(optim.warmup_steps, 1)),
                                         optax.constant_schedule(peak)], [optim.warmup_steps]) \
            if optim.warmup_steps else optax.constant_schedule(peak)
    parts = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay))
    return optax.chain(*parts)


def _micro_loss(params, graphdef, rest, inputs: StepInputs, denominators: dict, spec: StepSpec):
    model = nnx.merge(graphdef, params, rest)
    batch = inputs.batch
    mask = batch.target_mask * batch.row_valid[:, None]
    hidden = forward_hidden(model, batch.tokens, batch.token_mask)[:, :-1]
    features = ("student_logprobs", "student_entropy") if spec.policy.entropy_coef > 0 else ("student_logprobs",)
    stats = token_stats(hidden, model.lm_head_kernel(), batch.tokens[:, 1:], spec.vocab, mask, features=features)
    logprobs = stats["student_logprobs"]
    if spec.sft:
        nll = -jnp.where(mask > 0, logprobs, 0.0).sum()
        return nll / denominators["policy"], {"sft/nll_sum": nll}
    policy = get(f"policy_loss/{spec.policy_fn}")(PolicyBatch(logprobs=logprobs, old_logprobs=inputs.old_logprobs,
                                         advantages=inputs.token_advantages, loss_mask=mask,
                                         ref_logprobs=inputs.ref_logprobs,
                                         entropy=stats.get("student_entropy")), spec.policy)
    total = policy.sum / denominators["policy"]
    metrics = dict(policy.metrics)
    if spec.aux:
        divergence = None
        if spec.distill.mode == "full":  # full-vocabulary divergence to the detached teacher
            teacher_hidden = jax.lax.stop_gradient(gather_rows(
                forward_hidden(model, batch.teacher_tokens, batch.teacher_mask), batch.teacher_index))
            divergence = pair_stats(hidden, teacher_hidden, model.lm_head_kernel(), batch.tokens[:, 1:],
                                    spec.vocab, mask, features=(spec.distill.divergence,))[spec.distill.divergence]
        distill_batch = DistillBatch(loss_mask=mask * batch.has_teacher[:, None], logprobs=logprobs,
                                     old_logprobs=inputs.old_logprobs,
                                     teacher_logprobs=inputs.teacher_logprobs, divergence=divergence)
        for name in spec.aux:
            aux = get(f"aux_loss/{name}")(distill_batch, spec.distill)
            total = total + aux.sum / denominators["distill"]  # aux.sum already carries distill.coef
            metrics.update(aux.metrics)
    return total, metrics


def full_batch_denominators(inputs: StepInputs, spec: StepSpec) -> dict[str, jax.Array]:
    mask = inputs.batch.target_mask * inputs.batch.row_valid[:, None]
    zeros = jnp.zeros_like(mask)
    if spec.sft:
        return {"policy": jnp.maximum(mask.sum(), 1.0)}
    _, policy = aggregate(zeros, mask, spec.policy.agg_mode, spec.policy.norm_length)
    out = {"policy": jnp.maximum(policy, 1.0)}
    if spec.aux:
        _, distill = aggregate(zeros, mask * inputs.batch.has_teacher[:, None], spec.distill.agg_mode,
                               spec.distill.norm_length)
        out["distill"] = jnp.maximum(distill, 1.0)
    return out


def loss_and_grads(params, graphdef, rest, inputs: StepInputs, spec: StepSpec):
    """Σ over micro-batches (lax.scan) of the loss and its gradient; returns (loss, grads, metrics)."""
    rows = inputs.batch.tokens.shape[0]
    micro = min(spec.micro_batch_size, rows)
    if rows % micro:
        raise ValueError(f"batch rows {rows} must be a multiple of optim.micro_batch_size={micro}: "
                         "pack() with rows_multiple=micro_batch_size")
    denominators = full_batch_denominators(inputs, spec)
    # Strided micro-batches (micro-batch m = rows m, m + R/micro, ...): the batch dim is sharded over
    # the mesh's batch axes in contiguous blocks, so every micro-batch keeps rows on every device.
    stacked = jax.tree.map(lambda x: x.reshape((micro, rows // micro) + x.shape[1:]).swapaxes(0, 1), inputs)
    grad_fn = jax.value_and_grad(_micro_loss, has_aux=True)

    def body(carry, micro_inputs):
        loss_acc, grad_acc = carry
        (loss, metrics), grads = grad_fn(params, graphdef, rest, micro_inputs, denominators, spec)
        return (loss_acc + loss, jax.tree.map(jnp.add, grad_acc, grads)), metrics

    # Accumulate in >= fp32: summing bf16 micro-batch gradients in bf16 would drop small ones.
    zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params)
    (loss, grads), metrics = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zero_grads), stacked)
    return loss, grads, jax.tree.map(jnp.mean, metrics)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves))


def optimizer_shardings(opt_state: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optax state: a leaf whose tree path ends with a parameter's path (Adam's mu,
    nu, ...) and has its shape is sharded like that parameter; everything else (counts) replicated."""
    shapes = {path_to_str(path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    by_path = {path_to_str(path): sharding for path, sharding in
               jax.tree_util.tree_leaves_with_path(param_shardings)}
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        name = path_to_str(path)
        for param_path, sharding in by_path.items():
            if (name == param_path or name.endswith("/" + param_path)) and leaf.shape == shapes[param_path]:
                return sharding
        return replicated

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def stochastic_round(x: jax.Array, dtype, key: jax.Array) -> jax.Array:
    """Round fp32 ``x`` to bf16 ``dtype`` stochastically (unbiased: E[round(x)] = x): add uniform
    random bits below bf16's 16-bit mantissa cut, then truncate. Other dtypes: a plain cast."""
    if jnp.dtype(dtype) != jnp.bfloat16:
        return x.astype(dtype)
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint32) & jnp.uint32(0xFFFF)
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
    out = jax.lax.bitcast_convert_type(rounded, jnp.float32)
    out = jnp.where(jnp.isfinite(x), out, x)  # inf/nan pass through (adding noise could carry into them)
    return out.astype(dtype)


def needs_master(params: Any, master_dtype: str) -> bool:
    """fp32 master weights are kept when ``master_dtype='float32'`` and any param is stored narrower."""
    return master_dtype == "float32" and any(
        jnp.dtype(leaf.dtype).itemsize < 4 and jnp.issubdtype(leaf.dtype, jnp.floating)
        for leaf in jax.tree.leaves(params))


def rounds_stochastically(params: Any, master_dtype: str) -> bool:
    """bf16-only storage (``master_dtype='param'``) with a bf16 param: updates are stochastically
    rounded, and the rounding stream's step is part of the checkpoint (``rounding_step``)."""
    return master_dtype == "param" and any(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))


def _upcast(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), tree)


class Learner:
    """Holds the policy's params and optimizer state; ``update`` is one jitted optimizer step.

    With a ``mesh``, params are sharded by ``sharding.state_shardings`` (fsdp/tp rules, replicated over
    ``data``), the optimizer state like its params, and the update is one SPMD program over the mesh
    (batches must be global arrays sharded over the batch axes: ``distributed.global_batch``). Without
    a mesh everything stays where the model put it (one device).

    Mixed precision (``spec.master_dtype``): when the model stores bf16 params, the learner keeps an
    fp32 ``master`` copy (sharded like the params) that AdamW updates with fp32 moments; ``params``
    (what the forward and rollouts use) is the master cast back after every step. At lr 1e-6 a bf16
    weight of magnitude 0.02 has a ulp (7.8e-5) far above one update, so updating bf16 storage in
    place loses nearly every step (tests/test_mixed_precision.py). ``master_dtype='param'`` (opt-in,
    half the optimizer memory) updates in place with stochastic rounding instead: unbiased in
    expectation, noisier per weight.

    Non-finite loss or gradients leave params and optimizer state untouched (``skipped`` = 1).
    """

    def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, spec: StepSpec,
                 mesh: Mesh | None = None):
        self.master: Any = {}  # fp32 master weights ({} = none: params are updated in place)
        self.graphdef, self._params, self.rest = nnx.split(model, nnx.Param, ...)
        self.tx = tx
        self.spec = spec
        self.mesh = mesh
        self._step = 0  # stochastic-rounding stream (master_dtype='param'): checkpointed, so resume draws new noise
        self._rounds = rounds_stochastically(self._params, spec.master_dtype)
        use_master = needs_master(self._params, spec.master_dtype)
        if mesh is None:
            self.master = _upcast(self._params) if use_master else {}
            self.opt_state = tx.init(self.master if use_master else self._params)
            self._update = jax.jit(self._update_impl, donate_argnums=(0, 1, 2))
            return
        from sgcd_jax.parallel import distributed

        self.param_shardings = state_shardings(self._params, mesh)
        self._params = distributed.place(self._params, self.param_shardings)
        self.rest = distributed.replicated(self.rest, mesh)
        master_shardings = self.param_shardings if use_master else {}
        if use_master:
            self.master = jax.jit(_upcast, out_shardings=self.param_shardings)(self._params)
        opt_target = self.master if use_master else self._params
        abstract = jax.eval_shape(tx.init, opt_target)
        self.opt_shardings = optimizer_shardings(abstract, self._params, self.param_shardings, mesh)
        self.opt_state = jax.jit(tx.init, out_shardings=self.opt_shardings)(opt_target)
        self._update = jax.jit(self._update_impl, donate_argnums=(0, 1, 2),
                               out_shardings=(self.param_shardings, master_shardings, self.opt_shardings,
                                              NamedSharding(mesh, P())))

    @property
    def params(self) -> Any:
        return self._params

    @params.setter
    def params(self, value: Any) -> None:
        """Replacing the params (SFT warm-up, cache) re-seeds the fp32 master from them."""
        self._params = value
        if jax.tree.leaves(self.master):
            self.master = jax.jit(_upcast)(value) if self.mesh is None else \
                jax.jit(_upcast, out_shardings=self.param_shardings)(value)

    def _update_impl(self, params, master, opt_state, rest, inputs: StepInputs, step):
        loss, grads, metrics = loss_and_grads(params, self.graphdef, rest, inputs, self.spec)
        step_state = functools.partial(self._step_state, grads, params, master, opt_state, step)
        new_params, new_master, _ = step_state()
        checked = [grads, new_params] + ([new_master] if jax.tree.leaves(master) else [])
        finite = jnp.isfinite(loss) & jnp.all(jnp.stack([_all_finite(tree) for tree in checked]))
        # The step runs twice: above only reduced to the flag (fused, never stored), here written into the
        # donated buffers. A select(finite, new, old) kept old and new params, master and moments all alive.
        state = (params, master, opt_state)
        stored = lambda: jax.tree.map(lambda new, old: new.astype(old.dtype), step_state(), state)  # noqa: E731
        new_params, new_master, new_opt_state = jax.lax.cond(finite, stored, lambda: state)
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                       skipped=1.0 - finite.astype(jnp.float32))
        return new_params, new_master, new_opt_state, metrics

    def _step_state(self, grads, params, master, opt_state, step):
        """(params, master, optimizer state) after one optimizer step, not yet checked for finiteness."""
        if jax.tree.leaves(master):  # fp32 master: AdamW on fp32, params = master cast to storage dtype
            updates, new_opt_state = self.tx.update(grads, opt_state, master)
            new_master = optax.apply_updates(master, updates)
            return jax.tree.map(lambda m, p: m.astype(p.dtype), new_master, params), new_master, new_opt_state
        updates, new_opt_state = self.tx.update(grads, opt_state, params)
        keys = jax.tree.unflatten(jax.tree.structure(params), list(jax.random.split(
            jax.random.fold_in(jax.random.key(0x5EED), step), len(jax.tree.leaves(params)))))
        new_params = jax.tree.map(
            lambda p, u, k: stochastic_round(p.astype(jnp.float32) + u.astype(jnp.float32), p.dtype, k),
            params, updates, keys)
        return new_params, master, new_opt_state

    def update(self, inputs: StepInputs) -> dict[str, float]:
        self._params, self.master, self.opt_state, metrics = self._update(
            self._params, self.master, self.opt_state, self.rest, inputs, jnp.asarray(self._step, jnp.uint32))
        self._step += 1
        return {k: float(v) for k, v in jax.device_get(metrics).items()}

    def reset_optimizer(self) -> None:
        """A fresh optimizer state for the current params (the SFT warm-up frees the RL state, still
        at its init values, while its own AdamW runs, and calls this after)."""
        target = self.master if jax.tree.leaves(self.master) else self._params
        self.opt_state = (self.tx.init(target) if self.mesh is None else
                          jax.jit(self.tx.init, out_shardings=self.opt_shardings)(target))

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self._params, self.rest)

    def local_model(self) -> nnx.Module:
        """The policy on this process's devices (zero-copy view of the shared params; multi-host
        rollouts sample with it). One process: ``model()``."""
        if self.mesh is None:
            return self.model()
        from sgcd_jax.parallel import distributed

        return nnx.merge(self.graphdef, distributed.process_local_view(self._params, self.mesh),
                         distributed.process_local_view(self.rest, self.mesh))

    def state(self) -> dict[str, Any]:
        state = {"params": self._params, "opt_state": self.opt_state}
        if jax.tree.leaves(self.master):
            state["master"] = self.master
        if self._rounds:
            step = np.asarray(self._step, np.uint32) if self.mesh is not None else jnp.asarray(self._step, jnp.uint32)
            if self.mesh is not None:
                from sgcd_jax.parallel import distributed

                step = distributed.replicated(step, self.mesh)
            state["rounding_step"] = step
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        self._params, self.opt_state = state["params"], state["opt_state"]
        if "master" in state:
            self.master = state["master"]
        if "rounding_step" in state:  # a replicated scalar: this process's copy
            step = state["rounding_step"]
            self._step = int(np.asarray(step.addressable_shards[0].data if isinstance(step, jax.Array) else step))
