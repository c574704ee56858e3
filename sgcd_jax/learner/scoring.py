"""Host-side packing of trajectories into static-shape arrays, the jitted scoring pass and the jitted
train step.

Alignment: row b holds the student conversation ``tokens[b]`` (prompt + response). Target position t
is the hidden state at t predicting ``tokens[b, t+1]``; its loss mask is ``loss_mask[b, t+1]``. The
teacher conversation (credit-reference prompt + the SAME response ids) sits in ``teacher_tokens[b]``
and ``teacher_index[b, t]`` is the teacher hidden position that predicts the same token, so teacher
features line up with the student's token by token.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgcd_jax.losses.vocab import VocabConfig, pair_stats, token_stats
from sgcd_jax.rollout.trajectory import Trajectory


def bucket(length: int, multiple: int = 64) -> int:
    """Round up so jit sees few distinct shapes."""
    return max(multiple, -(-length // multiple) * multiple)


@flax.struct.dataclass
class PackedBatch:
    tokens: jax.Array  # [N, T] int32 student conversation
    token_mask: jax.Array  # [N, T] bool, valid tokens
    target_mask: jax.Array  # [N, T-1] float32, loss mask of the predicted token (policy tokens only)
    step_ids: jax.Array  # [N, T-1] int32, assistant turn of the predicted token, -1 elsewhere
    sampler_logprobs: jax.Array  # [N, T-1] float32
    teacher_tokens: jax.Array  # [N, Tt] int32
    teacher_mask: jax.Array  # [N, Tt] bool
    teacher_index: jax.Array  # [N, T-1] int32 teacher hidden position aligned with target t
    has_teacher: jax.Array  # [N] float32, 1 where a credit reference exists
    row_valid: jax.Array  # [N] float32, 0 on padding rows


def pack(trajectories: Sequence[Trajectory], teacher_prompts: Sequence[np.ndarray | None] | None = None,
         *, rows_multiple: int = 1, length_multiple: int = 64, pad_id: int = 0, min_rows: int = 0,
         min_length: int = 0, min_teacher_length: int = 0) -> PackedBatch:
    """Right-pad trajectories (and their teacher conversations) into a PackedBatch (numpy leaves).

    ``teacher_prompts[i]``: token ids of the teacher prompt replacing ``token_ids[:prompt_len]`` of
    trajectory i (None = no reference: the teacher row is the student row and ``has_teacher`` = 0).
    ``min_rows`` / ``min_length`` / ``min_teacher_length`` fix the padded shapes so jit compiles once.
    """
    n = len(trajectories)
    rows = -(-max(n, min_rows, 1) // rows_multiple) * rows_multiple
    teacher_prompts = list(teacher_prompts) if teacher_prompts is not None else [None] * n
    teacher_seqs = []
    for traj, prompt in zip(trajectories, teacher_prompts):
        response = np.asarray(traj.token_ids[traj.prompt_len:], np.int32)
        prompt = np.asarray(traj.token_ids[:traj.prompt_len] if prompt is None else prompt, np.int32)
        teacher_seqs.append((prompt, response))
    length = bucket(max([len(t.token_ids) for t in trajectories] + [2, min_length]), length_multiple)
    t_length = bucket(max([len(p) + len(r) for p, r in teacher_seqs] + [2, min_teacher_length]), length_multiple)
    out = dict(tokens=np.full((rows, length), pad_id, np.int32), token_mask=np.zeros((rows, length), bool),
               target_mask=np.zeros((rows, length - 1), np.float32),
               step_ids=np.full((rows, length - 1), -1, np.int32),
               sampler_logprobs=np.zeros((rows, length - 1), np.float32),
               teacher_tokens=np.full((rows, t_length), pad_id, np.int32),
               teacher_mask=np.zeros((rows, t_length), bool),
               teacher_index=np.zeros((rows, length - 1), np.int32),
               has_teacher=np.zeros((rows,), np.float32), row_valid=np.zeros((rows,), np.float32))
    for i, traj in enumerate(trajectories):
        size = len(traj.token_ids)
        out["tokens"][i, :size] = traj.token_ids
        out["token_mask"][i, :size] = True
        out["target_mask"][i, :size - 1] = traj.loss_mask[1:]
        out["step_ids"][i, :size - 1] = traj.step_ids[1:]
        out["sampler_logprobs"][i, :size - 1] = traj.sampler_logprobs[1:]
        prompt, response = teacher_seqs[i]
        t_size = len(prompt) + len(response)
        out["teacher_tokens"][i, :t_size] = np.concatenate([prompt, response])
        out["teacher_mask"][i, :t_size] = True
        shift = len(prompt) - traj.prompt_len
        positions = np.arange(length - 1)
        aligned = np.where(positions + 1 >= traj.prompt_len, positions + shift, 0)
        out["teacher_index"][i] = np.clip(aligned, 0, t_length - 1)
        out["has_teacher"][i] = float(teacher_prompts[i] is not None)
        out["row_valid"][i] = 1.0
    return PackedBatch(**out)


def _positions(mask: jax.Array) -> jax.Array:
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def forward_hidden(model: nnx.Module, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    hidden, _ = model(tokens, _positions(mask), mask)
    return hidden  # [N, T, D]


def gather_rows(hidden: jax.Array, index: jax.Array) -> jax.Array:
    """hidden [N, Tt, D], index [N, T] → [N, T, D]."""
    return jnp.take_along_axis(hidden, index[:, :, None], axis=1)


@dataclasses.dataclass(frozen=True)
class ScoreSpec:
    """Static choices of the scoring pass (hashable; a jit static argument).

    The teacher forward runs only on rows that have a credit reference (``has_teacher`` = 1), in
    chunks of ``teacher_chunk_rows`` rows, cut to the shortest length of a ladder that holds the
    longest teacher conversation: the packed teacher length shrunk by ``teacher_length_ratio`` up to
    ``teacher_length_steps`` times, in multiples of 64 (960 → 768 → 576 → 448). One compiled teacher
    program per length (≤ steps + 1 of them), however many rows have a reference. The forward's cost
    grows faster than linearly in the length (attention): on the quickstart model (CPU) a 4-row
    chunk takes ~0.12 s at 960 tokens, ~0.09 s at 768, ~0.06 s at 640, while each new length costs
    one compile (1-4 s), so short runs may not earn the steps back (``teacher_length_steps=0``: one
    length). ``teacher_chunk_rows=0``: one teacher forward over all N rows at the packed length
    (rows without a reference included).
    """

    vocab: VocabConfig
    with_teacher: bool
    with_reference: bool
    teacher_chunk_rows: int = 4
    teacher_length_steps: int = 3
    teacher_length_ratio: float = 0.75
    student_micro_rows: int = 0  # student (and reference) pass in strided micro-batches of this many rows; 0 = all


def score_micro_rows(requested: int, rows: int) -> int:
    """Rows per student micro-batch: the largest divisor of ``rows`` up to ``requested`` (0 = all rows, one pass)."""
    if requested <= 0 or requested >= rows:
        return 0
    return max(d for d in range(1, requested + 1) if rows % d == 0)


def teacher_plan(num_teacher_rows: int, longest: int, packed_length: int, spec: ScoreSpec) -> tuple[int, int]:
    """(number of teacher chunks, teacher length) for ``num_teacher_rows`` rows with a reference whose
    longest teacher conversation has ``longest`` tokens, packed at ``packed_length``."""
    chunks = -(-num_teacher_rows // spec.teacher_chunk_rows)
    length = packed_length
    for _ in range(spec.teacher_length_steps):
        shorter = bucket(math.ceil(length * spec.teacher_length_ratio))
        if shorter < longest or shorter >= length:
            break
        length = shorter
    return chunks, length


@jax.jit
def _teacher_need(has_teacher: jax.Array, teacher_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(rows with a reference, longest of their teacher conversations): replicated scalars."""
    has = has_teacher > 0
    return has.sum(), jnp.where(has, teacher_mask.sum(axis=1), 0).max()


def score(model: nnx.Module, ref_model: nnx.Module | None, batch: PackedBatch, spec: ScoreSpec) -> dict[str, jax.Array]:
    """No-grad features per target position ([N, T-1] float32 each): student logprobs and entropy,
    and with a teacher: teacher logprobs, reverse KL(p_S‖q_T); with a reference: ref logprobs.

    Rows without a reference (``has_teacher`` = 0, padding rows included) get teacher = student:
    teacher logprobs = student logprobs, reverse KL = 0. The chunk count and teacher length are read
    from the batch (one small device reduction, the same on every process)."""
    if not spec.with_teacher or spec.teacher_chunk_rows <= 0:
        return _score(model, ref_model, batch, spec, False)
    need = _teacher_need(batch.has_teacher, batch.teacher_mask)  # dispatched first: ready before the student pass ends
    feats, student_hidden = _score(model, ref_model, batch, dataclasses.replace(spec, with_teacher=False), True)
    count, longest = (int(x) for x in need)
    chunks, length = teacher_plan(count, longest, batch.teacher_tokens.shape[1], spec)
    for chunk in range(chunks):
        feats["teacher_logprobs"], feats["reverse_kl"] = _teacher_chunk(
            model, batch, student_hidden, feats["teacher_logprobs"], feats["reverse_kl"], chunk, spec, length)
    return feats


@nnx.jit(static_argnames=("spec", "return_hidden"))
def _score(model: nnx.Module, ref_model: nnx.Module | None, batch: PackedBatch, spec: ScoreSpec,
           return_hidden: bool):
    """The student (and reference) pass; ``spec.with_teacher``: plus a teacher forward over all N rows.
    ``return_hidden``: also the student hidden states [N, T-1, D], with teacher features initialised
    to "no reference" (teacher = student, KL 0) for ``_teacher_chunk`` to fill in."""
    rows = batch.tokens.shape[0]
    if spec.with_teacher:
        targets, mask = batch.tokens[:, 1:], batch.target_mask
        student_hidden = forward_hidden(model, batch.tokens, batch.token_mask)[:, :-1]
        teacher_hidden = forward_hidden(model, batch.teacher_tokens, batch.teacher_mask)
        teacher_hidden = gather_rows(teacher_hidden, batch.teacher_index)
        feats = pair_stats(student_hidden, teacher_hidden, model.lm_head_kernel(), targets, spec.vocab, mask,
                           features=("student_logprobs", "student_entropy", "teacher_logprobs", "reverse_kl"))
        # Rows without a reference: teacher == student, so the log-ratio and KL are exactly 0.
        keep = batch.has_teacher[:, None] > 0
        feats["teacher_logprobs"] = jnp.where(keep, feats["teacher_logprobs"], feats["student_logprobs"])
        feats["reverse_kl"] = jnp.where(keep, feats["reverse_kl"], 0.0)
        if spec.with_reference and ref_model is not None:
            feats["ref_logprobs"] = _reference_logprobs(ref_model, batch.tokens, batch.token_mask, mask, spec)
    elif 0 < spec.student_micro_rows < rows:
        feats, student_hidden = _student_micro_batches(model, ref_model, batch, spec)
    else:
        feats, student_hidden = _student_features(model, ref_model, batch.tokens, batch.token_mask,
                                                  batch.target_mask, spec)
    return _finish(feats, student_hidden, return_hidden)


def _reference_logprobs(ref_model, tokens, token_mask, target_mask, spec: ScoreSpec):
    """The KL reference model's log-probabilities [n, T-1] of the sampled tokens."""
    ref_hidden = forward_hidden(ref_model, tokens, token_mask)[:, :-1]
    return token_stats(ref_hidden, ref_model.lm_head_kernel(), tokens[:, 1:], spec.vocab, target_mask,
                       features=("student_logprobs",))["student_logprobs"]


def _student_features(model, ref_model, tokens, token_mask, target_mask, spec: ScoreSpec):
    """Student (and reference) features and hidden states [n, T-1, D] of n rows."""
    student_hidden = forward_hidden(model, tokens, token_mask)[:, :-1]
    feats = token_stats(student_hidden, model.lm_head_kernel(), tokens[:, 1:], spec.vocab, target_mask)
    if spec.with_reference and ref_model is not None:
        feats["ref_logprobs"] = _reference_logprobs(ref_model, tokens, token_mask, target_mask, spec)
    return feats, student_hidden


def _student_micro_batches(model, ref_model, batch: PackedBatch, spec: ScoreSpec):
    """The student pass as a ``lax.map`` over strided micro-batches of ``spec.student_micro_rows`` rows (micro-batch
    m = rows m, m + R/micro, ...: rows sharded in contiguous blocks keep every device busy, as in the update), so
    XLA's temp memory is one micro-batch's forward, not the whole batch's."""
    rows, micro = batch.tokens.shape[0], spec.student_micro_rows
    if rows % micro:
        raise ValueError(f"score pass: {rows} rows is not a multiple of student_micro_rows={micro}")
    split = lambda x: x.reshape((micro, rows // micro) + x.shape[1:]).swapaxes(0, 1)  # [R/micro, micro, ...]
    merge = lambda x: x.swapaxes(0, 1).reshape((rows,) + x.shape[2:])
    inputs = (split(batch.tokens), split(batch.token_mask), split(batch.target_mask))
    out = jax.lax.map(lambda xs: _student_features(model, ref_model, *xs, spec), inputs)
    return jax.tree.map(merge, out)


def _finish(feats, student_hidden, return_hidden: bool):
    feats = jax.tree.map(jax.lax.stop_gradient, feats)
    if not return_hidden:
        return feats
    feats["teacher_logprobs"] = feats["student_logprobs"]
    feats["reverse_kl"] = jnp.zeros_like(feats["student_logprobs"])
    return feats, jax.lax.stop_gradient(student_hidden)


@nnx.jit(static_argnames=("spec", "length"))
def _teacher_chunk(model: nnx.Module, batch: PackedBatch, student_hidden: jax.Array, teacher_logprobs: jax.Array,
                   reverse_kl: jax.Array, chunk: jax.Array, spec: ScoreSpec, length: int):
    """Teacher forward over the ``chunk``-th group of ``spec.teacher_chunk_rows`` rows that have a
    reference (cut to ``length`` tokens); writes their teacher logprobs and reverse KL into the
    [N, T-1] arrays. Slots past the last such row (index N) are computed on row 0 and dropped."""
    rows, size = batch.tokens.shape[0], spec.teacher_chunk_rows
    slots = -(-rows // size) * size
    (picked,) = jnp.nonzero(batch.has_teacher > 0, size=slots, fill_value=rows)  # [slots] reference rows, then N
    ids = jax.lax.dynamic_slice_in_dim(picked, chunk * size, size)  # [K]
    take = jnp.where(ids < rows, ids, 0)
    tokens, mask = batch.teacher_tokens[take, :length], batch.teacher_mask[take, :length]  # [K, length]
    index = jnp.minimum(batch.teacher_index[take], length - 1)  # [K, T-1]; only masked positions clip
    teacher_hidden = gather_rows(forward_hidden(model, tokens, mask), index)  # [K, T-1, D]
    pair = pair_stats(student_hidden[take], teacher_hidden, model.lm_head_kernel(), batch.tokens[take, 1:],
                      spec.vocab, batch.target_mask[take], features=("teacher_logprobs", "reverse_kl"))
    pair = jax.tree.map(jax.lax.stop_gradient, pair)
    return (teacher_logprobs.at[ids].set(pair["teacher_logprobs"], mode="drop"),
            reverse_kl.at[ids].set(pair["reverse_kl"], mode="drop"))


def to_device(batch: Any) -> Any:
    return jax.tree.map(jnp.asarray, batch)
