"""Memory plan: per-device bytes of an SGCD run for a model on an accelerator slice, from the config.

    python -m sgcd_jax.memory_plan                 # writes docs/memory_plan.md and prints it
    python -m sgcd_jax.memory_plan --recipe configs/tau3_airline_qwen3_4b.py --out /tmp/plan.md
                                                   # dtypes, lengths, batch, remat from the recipe

Per device, for the recommended mesh (data, fsdp, tp):
- params: P × bytes(param_dtype) / (fsdp·tp) — one copy serves rollout, scoring and training
- optimizer: AdamW μ, ν, the fp32 gradient accumulator and, when params are stored in bf16, the
  fp32 master weights (optim.master_dtype='float32', the default) / (fsdp·tp)
- activations: one micro-batch row of ``seq_len`` tokens under the remat policy
  ("full": block inputs only + one block's working set; "dots": every matmul output; "none"),
  attention through a flash kernel (cuDNN / Splash) or the naive XLA path that materialises
  [H, T, T] scores; logits are never materialised beyond one vocabulary chunk
- rollout: the KV cache, rollout batch × ``max_total_tokens`` (2·L·S·Hkv·Dh in the compute dtype or
  ``kv_bytes``) / (data·fsdp rows,
  tp heads) — with unsharded rows (data·fsdp = 1) and rollout.share_prefixes, the siblings' prompt
  (``prompt_len`` tokens) is one prefix store entry per task and each row holds only the rest of its
  budget (models/cache.py) — plus the prefill working set of one ``prefill_chunk`` (sampling.Sampler appends prompts and
  observations in chunks: activations [rows, chunk, ·] of one layer and one [chunk, attention_block] fp32
  score block per head of attention.blockwise_attention, never [T, S]) and the next-token logits [rows, V]
Peak = params + optimizer + max(activations, rollout): the cache is freed before the train step.
The plan is the mesh with the smallest tp, then the largest data axis, that stays under 75% of HBM
(else under 90%); if none fits, the rollout batch is halved (decoded in waves), then bf16-only state
(optim.master_dtype='param': bf16 params and moments, stochastic rounding, no master copy).

Also home of two accelerator knobs whose names configs use: ``remat_policy(name)`` (→ a
``jax.checkpoint`` policy for ``nnx.remat(..., policy=...)``) and ``attention_implementation(name)``
(→ ``jax.nn.dot_product_attention(implementation=...)``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from sgcd_jax.models.config import ModelConfig

GIB = 1024**3
HBM_HEADROOM = 0.9  # leave 10% for XLA scratch, fragmentation and the runtime
COMFORT = 0.75  # prefer meshes that stay under this fraction (the activation model is approximate)

# The accelerator knobs live beside the model code (models/accel.py); re-exported here for existing callers.
from sgcd_jax.models.accel import ATTENTION_IMPLS, REMAT_POLICY_NAMES, attention_implementation, remat_policy  # noqa: E402,F401


# ----------------------------------------------------------------------------- models and hardware

# Public HF config.json values (Qwen/Qwen3-4B, Qwen/Qwen3-8B), mapped by the Qwen3 adapter. Qwen3.5-4B
# comes from sgcd_jax.models.qwen3_5.QWEN3_5_4B (its engineer's transcription of the public config).
HF_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen3-4B": dict(architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=2560,
                     intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, rope_theta=1000000, rms_norm_eps=1e-6,
                     tie_word_embeddings=True, max_position_embeddings=40960, hidden_act="silu"),
    "Qwen3-8B": dict(architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=4096,
                     intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, rope_theta=1000000, rms_norm_eps=1e-6,
                     tie_word_embeddings=False, max_position_embeddings=40960, hidden_act="silu"),
}


HYBRID_MODELS = ("Qwen3.5-4B",)  # configs from sgcd_jax.models.qwen3_5 (public Qwen3.5-4B values)
MODELS = tuple(HF_CONFIGS) + HYBRID_MODELS


def model_config(name: str) -> ModelConfig:
    if name == "Qwen3.5-4B":
        from sgcd_jax.models import qwen3_5

        return qwen3_5.qwen3_5_config(**qwen3_5.QWEN3_5_4B, attention_bias=False)
    if name not in HF_CONFIGS:
        raise KeyError(f"unknown model {name!r}; the plan knows {MODELS}")
    from sgcd_jax.models import hf_format

    hf = HF_CONFIGS[name]
    adapter = hf_format.adapter_for(hf["architectures"][0], name)
    return ModelConfig(**adapter.config_from_hf(hf))


def _is_hybrid(cfg: ModelConfig) -> bool:
    return "linear_attention" in cfg.layer_types


def num_params(cfg: ModelConfig) -> int:
    if _is_hybrid(cfg):
        from sgcd_jax.models import qwen3_5

        return qwen3_5.num_params(cfg)
    return cfg.num_params()


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    devices: int  # JAX devices (TPU chips / GPUs)
    hbm_gib: float  # per device
    note: str


HARDWARE = (
    Hardware("v5e-8", 8, 16.0, "8 chips × 16 GiB"),
    Hardware("v5p-8", 4, 95.0, "4 chips (8 TensorCores) × 95 GiB"),
    Hardware("8×H100", 8, 80.0, "8 GPUs × 80 GiB"),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Workload:
    seq_len: int = 16384  # rollout.max_total_tokens: multi-turn tool-use conversations
    rollout_batch: int = 64  # trajectories decoded together (e.g. 8 tasks × G=8 siblings)
    group_size: int = 8  # rollout.group_size: siblings per task
    share_prefixes: bool = True  # rollout.share_prefixes: one prompt store entry per task (unsharded rows only)
    prompt_len: int = 4400  # the siblings' shared prompt (τ³ airline: system prompt + tool schemas, ~4.4k)
    micro_batch_rows: int = 1  # training rows per device per micro-step (grad accumulation)
    param_bytes: int = 4  # bytes of model.param_dtype (the copy the forward reads)
    optimizer_bytes: int = 4  # AdamW μ and ν dtype (4; 2 with optim.master_dtype='param')
    master_bytes: int = 0  # fp32 master copy: 4 when param_bytes < 4 and optim.master_dtype='float32'
    grad_bytes: int = 4  # the gradient accumulator (fp32 for every param dtype)
    compute_bytes: int = 2  # bf16 activations / KV cache
    kv_bytes: int = 0  # KV cache bytes per value (0: compute_bytes; Sampler(cache_dtype=bf16): 2)
    vocab_chunk: int = 128  # tokens per chunk of the vocabulary math
    remat: str = "full"
    attention: str = "flash"  # flash (cuDNN / Splash) | blockwise (XLA online softmax) | naive ([T, T] scores)
    prefill_chunk: int = 512  # rollout.prefill_chunk: tokens per append call
    attention_block: int = 512  # model.attention_block: key/query block of attention.blockwise_attention


@dataclasses.dataclass(frozen=True)
class Plan:
    model: str
    hardware: Hardware
    mesh: tuple[int, int, int]  # (data, fsdp, tp)
    work: Workload
    params: float  # GiB per device
    optimizer: float
    activations: float
    kv_cache: float
    fits: bool
    note: str = ""
    prefill: float = 0.0  # GiB: chunked-prefill working set beside the cache (rollout = kv_cache + prefill)

    @property
    def rollout(self) -> float:
        return self.kv_cache + self.prefill

    @property
    def peak(self) -> float:
        """Params and optimizer state stay resident; the rollout KV cache is freed before the train
        step allocates activations, so only the larger of the two counts."""
        return self.params + self.optimizer + max(self.activations, self.rollout)


# ----------------------------------------------------------------------------- the arithmetic

def param_bytes(cfg: ModelConfig, dtype_bytes: int) -> int:
    return num_params(cfg) * dtype_bytes


def optimizer_bytes(cfg: ModelConfig, work: Workload) -> int:
    """AdamW μ and ν, the gradient accumulator and the fp32 master weights (if any)."""
    return num_params(cfg) * (2 * work.optimizer_bytes + work.grad_bytes + work.master_bytes)


def kv_cache_bytes(cfg: ModelConfig, batch: int, max_len: int, dtype_bytes: int) -> int:
    """k and v [L, B, S, Hkv, Dh], plus the valid mask [B, S] and end [B]; for a hybrid, k/v of the
    full-attention layers and the DeltaNet states (constant in S)."""
    if _is_hybrid(cfg):
        from sgcd_jax.models import qwen3_5

        kv = sum(qwen3_5.cache_bytes(cfg, batch, max_len, dtype_bytes).values())
    else:
        kv = 2 * cfg.num_layers * batch * max_len * cfg.num_kv_heads * cfg.head_dim * dtype_bytes
    return kv + batch * max_len + 4 * batch


def activation_bytes(cfg: ModelConfig, work: Workload, tp: int = 1) -> int:
    """Peak activation bytes of one device's micro-batch in the backward pass."""
    tokens = work.micro_batch_rows * work.seq_len
    b = work.compute_bytes
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    matmul_outs = tokens * (q + 2 * kv + d + 2 * f + d) * b // tp  # q,k,v,o, gate,up, down
    elementwise = tokens * (2 * f + 4 * d + q + 2 * kv) * b // tp  # act(gate)·up, norms, rope
    if work.attention == "naive":  # [H, T, T] fp32 scores + probabilities
        scores = 2 * work.micro_batch_rows * cfg.num_heads * work.seq_len ** 2 * 4 // tp
    elif work.attention == "blockwise":  # one [block, block] score block + probs; plus, for the backward pass,
        # lax.scan's saved carries (m, l, acc fp32) per key block: nblocks × T × H × (Dh + 2)
        blocks = -(-work.seq_len // work.attention_block)
        scores = (2 * work.micro_batch_rows * cfg.num_heads * work.attention_block ** 2 * 4
                  + blocks * work.micro_batch_rows * work.seq_len * cfg.num_heads * (cfg.head_dim + 2) * 4) // tp
    else:  # flash: softmax statistics only
        scores = work.micro_batch_rows * cfg.num_heads * work.seq_len * 4 * 2 // tp
    block_working_set = matmul_outs + elementwise + scores
    block_input = tokens * d * b
    saved = {"full": block_input, "save_attention_out": block_input + tokens * q * b // tp,
             "dots": block_input + matmul_outs, "dots_no_batch": block_input + matmul_outs,
             "none": block_input + matmul_outs + elementwise + scores}
    if work.remat not in saved:
        raise ValueError(f"remat={work.remat!r}; use one of {sorted(saved)}")
    # Vocabulary math in chunks: logits [chunk, V] fp32 for forward + backward.
    vocab = 2 * work.micro_batch_rows * work.vocab_chunk * cfg.vocab_size * 4 // tp
    residual_stream = 2 * tokens * d * 4  # fp32 hidden + its gradient
    return L * saved[work.remat] + block_working_set + vocab + residual_stream


def prefill_bytes(cfg: ModelConfig, work: Workload, rows: int, tp: int = 1) -> int:
    """Working set of one chunked-prefill call beside the cache: the chunk's residual stream (fp32) and one
    layer's activations, one blockwise-attention score block per head ([chunk, attention_block] fp32,
    scores + probabilities), and the next-token logits [rows, V] fp32. Independent of max_total_tokens."""
    chunk = min(work.prefill_chunk, work.seq_len)
    tokens = rows * chunk
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer = tokens * (q + 2 * kv + 2 * d + 3 * f) * work.compute_bytes // tp
    scores = 2 * rows * cfg.num_heads * chunk * min(work.attention_block, work.seq_len) * 4 // tp
    return 2 * tokens * d * 4 + layer + scores + rows * cfg.vocab_size * 4


def candidate_meshes(devices: int, cfg: ModelConfig) -> list[tuple[int, int, int]]:
    meshes = []
    for tp in (1, 2, 4, 8):
        if devices % tp or cfg.num_kv_heads % tp:
            continue
        rest = devices // tp
        for data in range(rest, 0, -1):
            if rest % data == 0:
                meshes.append((data, rest // data, tp))
    return meshes  # smallest tp first, then most data parallel


def _plan_for_mesh(model: str, cfg: ModelConfig, hardware: Hardware, work: Workload,
                   mesh: tuple[int, int, int]) -> Plan:
    data, fsdp, tp = mesh
    shard, rows = fsdp * tp, data * fsdp
    rollout_rows = math.ceil(work.rollout_batch / rows)
    # the sampler's prefix store (sampling.Sampler share_prefixes): one prompt entry per task, replicated, so
    # only when rows are not split over devices; each row then holds what follows the prompt
    store_entries = math.ceil(rollout_rows / work.group_size) if work.share_prefixes and rows == 1 else 0
    prompt = min(work.prompt_len, work.seq_len) if store_entries else 0
    p = Plan(model, hardware, mesh, work,
             params=param_bytes(cfg, work.param_bytes) / shard / GIB,
             optimizer=optimizer_bytes(cfg, work) / shard / GIB,
             activations=activation_bytes(cfg, work, tp) / GIB,
             kv_cache=(kv_cache_bytes(cfg, rollout_rows, work.seq_len - prompt, work.kv_bytes or work.compute_bytes)
                       + kv_cache_bytes(cfg, store_entries, prompt, work.kv_bytes or work.compute_bytes)) / tp / GIB,
             prefill=prefill_bytes(cfg, work, rollout_rows, tp) / GIB,
             fits=False)
    return dataclasses.replace(p, fits=p.peak <= HBM_HEADROOM * hardware.hbm_gib)


def plan(model: str, hardware: Hardware, work: Workload = Workload()) -> Plan:
    """First fitting (mesh, workload): the asked workload; else a smaller rollout batch (decoded in
    waves, down to 8); else bf16 params + AdamW moments; else the smallest non-fitting plan."""
    cfg = model_config(model)
    best = None
    variants = [(work, "")]
    if work.param_bytes > 2 or work.optimizer_bytes > 2 or work.master_bytes:
        variants.append((dataclasses.replace(work, param_bytes=2, optimizer_bytes=2, master_bytes=0),
                         "bf16-only params + AdamW moments (optim.master_dtype='param')"))
    for variant, why in variants:
        batch = variant.rollout_batch
        while True:
            shrunk = dataclasses.replace(variant, rollout_batch=batch)
            options = [_plan_for_mesh(model, cfg, hardware, shrunk, mesh)
                       for mesh in candidate_meshes(hardware.devices, cfg)]
            # Most data parallelism that leaves comfortable headroom, else any mesh that fits.
            chosen = next((p for p in options if p.peak <= COMFORT * hardware.hbm_gib), None) or \
                next((p for p in options if p.fits), None)
            if chosen is not None:
                notes = [why] if why else []
                if batch < work.rollout_batch:
                    notes.append(f"rollout batch {batch} (of {work.rollout_batch}: "
                                 f"{math.ceil(work.rollout_batch / batch)} decode waves)")
                return dataclasses.replace(chosen, note="; ".join(notes))
            smallest = min(options, key=lambda p: p.peak)
            if best is None or smallest.peak < best.peak:
                best = smallest
            if batch <= 8:
                break
            batch = max(8, batch // 2)
    assert best is not None
    return dataclasses.replace(best, note="does not fit at rollout batch 8 even with bf16 state: "
                                          "use a larger slice or shorter max_total_tokens")


def _dtype_name(nbytes: int) -> str:
    return {2: "bf16", 4: "fp32"}.get(nbytes, f"{8 * nbytes}-bit")


def describe_state(work: Workload) -> str:
    """The text of the workload's state dtypes (the header follows the arguments)."""
    master = f" + {_dtype_name(work.master_bytes)} master weights" if work.master_bytes else ""
    return (f"{_dtype_name(work.param_bytes)} params{master} + AdamW ({_dtype_name(work.optimizer_bytes)} μ, ν; "
            f"{_dtype_name(work.grad_bytes)} gradient)")


def workload_from_recipe(path: str, base: Workload = Workload()) -> Workload:
    """The recipe's dtypes and sizes: model.param_dtype / model.dtype, optim.master_dtype,
    rollout.max_total_tokens, the rollout batch (tasks_per_iteration × group_size), remat, attention."""
    from sgcd_jax.config_files import load_config_file

    config = load_config_file(path)
    param = 2 if config.model.param_dtype == "bfloat16" else 4
    bf16_only = config.optim.master_dtype == "param"
    return dataclasses.replace(
        base, param_bytes=param, optimizer_bytes=param if bf16_only else 4,
        master_bytes=4 if param < 4 and not bf16_only else 0,
        compute_bytes=2 if config.model.dtype == "bfloat16" else 4,
        seq_len=config.rollout.max_total_tokens,
        rollout_batch=config.rollout.tasks_per_iteration * config.rollout.group_size,
        group_size=config.rollout.group_size, share_prefixes=config.rollout.share_prefixes,
        remat=config.model.remat_policy if config.model.remat_policy in REMAT_POLICY_NAMES else base.remat,
        attention="naive" if config.model.attention_impl == "xla" else "flash")


def render(plans: Sequence[Plan], work: Workload) -> str:
    lines = [
        "# Memory plan",
        "",
        "Generated by `python -m sgcd_jax.memory_plan` from the models' config.json values "
        "(sgcd_jax/memory_plan.py: HF_CONFIGS); do not edit by hand.",
        "",
        f"Workload asked: rollout batch {work.rollout_batch} trajectories × {work.seq_len} tokens "
        f"(KV cache; " + (f"where rows are not split over devices, the {work.prompt_len}-token prompt of each task's "
                          f"{work.group_size} siblings is stored once and rows hold the rest" if work.share_prefixes
                          else "every row holds its whole conversation") + f"), training micro-batch {work.micro_batch_rows} row × {work.seq_len} tokens per "
        f"device, {describe_state(work)}, "
        f"{_dtype_name(work.compute_bytes)} activations, {_dtype_name(work.kv_bytes or work.compute_bytes)} KV cache, "
        f"remat={work.remat!r}, attention={work.attention!r}, vocab chunk {work.vocab_chunk}, rollout prefill in "
        f"chunks of {work.prefill_chunk} tokens with attention blocks of {work.attention_block}. "
        "GiB per device; mesh = (data, fsdp, tp); rollout = KV cache + chunked-prefill working set; "
        "peak = params + optimizer + max(activations, rollout).",
        "",
        "| model | params (B) | hardware | mesh (data, fsdp, tp) | params | optimizer+grad | "
        "activations | rollout KV cache | prefill chunk | peak | HBM | fits | adjustments |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in plans:
        billions = num_params(model_config(p.model)) / 1e9
        lines.append(
            f"| {p.model} | {billions:.2f} | {p.hardware.name} | {p.mesh} | {p.params:.1f} | "
            f"{p.optimizer:.1f} | {p.activations:.1f} | {p.kv_cache:.1f} | {p.prefill:.2f} | {p.peak:.1f} | "
            f"{p.hardware.hbm_gib:.0f} | {'yes' if p.fits else 'no'} | {p.note or '—'} |")
    lines += [
        "",
        "Hardware: " + "; ".join(f"{h.name}: {h.note}" for h in HARDWARE) + ".",
        "",
        "Notes: the same sharded params serve rollout (decode), the score pass and the train step, so "
        "there is no second copy for the sampler. With `attention='naive'` the [H, T, T] scores of "
        "one 16k-token row alone take ~64 GiB: long-horizon runs need the flash path "
        "(`attention_implementation('cudnn')` on GPU, `model.attention_impl='splash'` on TPU: JAX's Pallas "
        "splash kernel). Rollout never builds [T, S] scores: the cache path is `models/attention.blockwise_attention` "
        "(online softmax over key blocks), so a 4.4k-token τ³ prompt costs one prefill chunk's working set "
        "(the 'prefill chunk' column) on top of the cache, not a [chunk, max_total_tokens] score matrix per "
        "head; the XLA no-cache path beyond attention_block is blockwise too, but its backward keeps one "
        "(m, l, acc) carry per key block (`--attention blockwise`): train long rows with cuDNN / splash. "
        "Qwen3.5-4B keeps k/v only "
        "for its full-attention layers (1 in 4) plus fixed-size DeltaNet states; its activations use "
        "the attention-layer formula for every layer (an approximation for the DeltaNet layers).",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m sgcd_jax.memory_plan",
                                     description="per-device memory table → docs/memory_plan.md")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "memory_plan.md"))
    parser.add_argument("--recipe", default="", help="a config file: its dtypes/lengths/batch set the workload "
                        "(explicit --flags below still override)")
    def flag(text: str) -> bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1")

    for field in dataclasses.fields(Workload):
        kind = flag if isinstance(field.default, bool) else type(field.default)
        parser.add_argument(f"--{field.name}", type=kind, default=None)
    args = parser.parse_args(argv)
    work = workload_from_recipe(args.recipe) if args.recipe else Workload()
    work = dataclasses.replace(work, **{f.name: getattr(args, f.name) for f in dataclasses.fields(Workload)
                                        if getattr(args, f.name) is not None})
    plans = [plan(model, hw, work) for model in MODELS for hw in HARDWARE]
    text = render(plans, work)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
