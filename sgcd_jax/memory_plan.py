"""Memory plan: per-device bytes of an SGCD run for a model on an accelerator slice, from the config.

    python -m sgcd_jax.memory_plan                 # writes docs/memory_plan.md and prints it

Per device, for the recommended mesh (data, fsdp, tp):
- params: P × bytes(param_dtype) / (fsdp·tp) — one copy serves rollout, scoring and training
- optimizer: AdamW μ, ν (and the fp32 gradient buffer) / (fsdp·tp)
- activations: one micro-batch row of ``seq_len`` tokens under the remat policy
  ("full": block inputs only + one block's working set; "dots": every matmul output; "none"),
  attention through a flash kernel (cuDNN / Splash) or the naive XLA path that materialises
  [H, T, T] scores; logits are never materialised beyond one vocabulary chunk
- KV cache: the rollout batch × ``max_total_tokens`` (2·L·S·Hkv·Dh in bf16) / (data·fsdp rows, tp heads)
Peak = params + optimizer + max(activations, KV cache): the cache is freed before the train step.
The plan is the mesh with the smallest tp, then the largest data axis, that stays under 75% of HBM
(else under 90%);
if none fits, the rollout batch is halved (decoded in waves), then bf16 params + AdamW moments.

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

# ----------------------------------------------------------------------------- accelerator knobs

# The knobs live beside the model code (models/accel.py); re-exported here for existing callers.
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
    micro_batch_rows: int = 1  # training rows per device per micro-step (grad accumulation)
    param_bytes: int = 4  # fp32 master params
    optimizer_bytes: int = 4  # AdamW μ and ν dtype
    compute_bytes: int = 2  # bf16 activations / KV cache
    vocab_chunk: int = 128  # tokens per chunk of the vocabulary math
    remat: str = "full"
    attention: str = "flash"  # flash (cuDNN / Splash) | naive


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

    @property
    def peak(self) -> float:
        """Params and optimizer state stay resident; the rollout KV cache is freed before the train
        step allocates activations, so only the larger of the two counts."""
        return self.params + self.optimizer + max(self.activations, self.kv_cache)


# ----------------------------------------------------------------------------- the arithmetic

def param_bytes(cfg: ModelConfig, dtype_bytes: int) -> int:
    return num_params(cfg) * dtype_bytes


def optimizer_bytes(cfg: ModelConfig, work: Workload) -> int:
    """AdamW μ and ν plus one gradient buffer in the param dtype."""
    return num_params(cfg) * (2 * work.optimizer_bytes + work.param_bytes)


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
    p = Plan(model, hardware, mesh, work,
             params=param_bytes(cfg, work.param_bytes) / shard / GIB,
             optimizer=optimizer_bytes(cfg, work) / shard / GIB,
             activations=activation_bytes(cfg, work, tp) / GIB,
             kv_cache=kv_cache_bytes(cfg, rollout_rows, work.seq_len, work.compute_bytes) / tp / GIB,
             fits=False)
    return dataclasses.replace(p, fits=p.peak <= HBM_HEADROOM * hardware.hbm_gib)


def plan(model: str, hardware: Hardware, work: Workload = Workload()) -> Plan:
    """First fitting (mesh, workload): the asked workload; else a smaller rollout batch (decoded in
    waves, down to 8); else bf16 params + AdamW moments; else the smallest non-fitting plan."""
    cfg = model_config(model)
    best = None
    variants = [(work, "")]
    if work.param_bytes > 2 or work.optimizer_bytes > 2:
        variants.append((dataclasses.replace(work, param_bytes=2, optimizer_bytes=2),
                         "bf16 params + AdamW moments"))
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


def render(plans: Sequence[Plan], work: Workload) -> str:
    lines = [
        "# Memory plan",
        "",
        "Generated by `python -m sgcd_jax.memory_plan` from the models' config.json values "
        "(sgcd_jax/memory_plan.py: HF_CONFIGS); do not edit by hand.",
        "",
        f"Workload asked: rollout batch {work.rollout_batch} trajectories × {work.seq_len} tokens "
        f"(KV cache), training micro-batch {work.micro_batch_rows} row × {work.seq_len} tokens per "
        f"device, fp32 params + AdamW (fp32 μ, ν, gradient), bf16 activations and KV cache, "
        f"remat={work.remat!r}, attention={work.attention!r}, vocab chunk {work.vocab_chunk}. "
        "GiB per device; mesh = (data, fsdp, tp); peak = params + optimizer + max(activations, KV).",
        "",
        "| model | params (B) | hardware | mesh (data, fsdp, tp) | params | optimizer+grad | "
        "activations | rollout KV cache | peak | HBM | fits | adjustments |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in plans:
        billions = num_params(model_config(p.model)) / 1e9
        lines.append(
            f"| {p.model} | {billions:.2f} | {p.hardware.name} | {p.mesh} | {p.params:.1f} | "
            f"{p.optimizer:.1f} | {p.activations:.1f} | {p.kv_cache:.1f} | {p.peak:.1f} | "
            f"{p.hardware.hbm_gib:.0f} | {'yes' if p.fits else 'no'} | {p.note or '—'} |")
    lines += [
        "",
        "Hardware: " + "; ".join(f"{h.name}: {h.note}" for h in HARDWARE) + ".",
        "",
        "Notes: the same sharded params serve rollout (decode), the score pass and the train step, so "
        "there is no second copy for the sampler. With `attention='naive'` the [H, T, T] scores of "
        "one 16k-token row alone take ~64 GiB: long-horizon runs need the flash path "
        "(`attention_implementation('cudnn')` on GPU, a Splash kernel on TPU). Qwen3.5-4B keeps k/v only "
        "for its full-attention layers (1 in 4) plus fixed-size DeltaNet states; its activations use "
        "the attention-layer formula for every layer (an approximation for the DeltaNet layers).",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m sgcd_jax.memory_plan",
                                     description="per-device memory table → docs/memory_plan.md")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "memory_plan.md"))
    for field in dataclasses.fields(Workload):
        parser.add_argument(f"--{field.name}", type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    work = Workload(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Workload)})
    plans = [plan(model, hw, work) for model in MODELS for hw in HARDWARE]
    text = render(plans, work)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
