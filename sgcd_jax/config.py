"""Typed, frozen, validated training configuration: one dataclass per concept; the loss sections are the
loss library's own config types. ``from_config_dict`` turns a ConfigDict (``config_files``) into them:
unknown keys and bad values raise ``ConfigError`` naming the key, before any model is built."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from typing import Any

from sgcd_jax.config_io import SECRET_KEY_MARKERS, save_resolved, scrub_secrets, to_dict  # noqa: F401
from sgcd_jax.losses import AdvantageConfig, CreditConfig, DistillConfig, PolicyLossConfig


class ConfigError(ValueError):
    """A config key is unknown or a value is invalid."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _one_of(name: str, value: str, options: tuple[str, ...]) -> None:
    _check(value in options, f"{name}={value!r} is not one of {options}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    name: str = "run"
    workdir: str = "runs"  # run dir = workdir/name
    seed: int = 0
    num_iterations: int = 10
    log_every: int = 1
    eval_every: int = 5  # iterations; 0 = only at the end
    checkpoint_every: int = 5  # iterations; 0 = only at the end
    keep_checkpoints: int = 2
    resume: bool = True  # resume from the latest checkpoint in the run dir if any
    export_hf: bool = False  # export the final policy to workdir/name/export (HF safetensors)
    progress: bool = True
    tensorboard: bool = True
    report: bool = True
    stop_after_iterations: int = 0  # >0: exit (as if preempted) after this many iterations; tests
    store_rollouts: bool = True  # append tokens/scores/credit weights to run_dir/rollouts (sgcd_jax.data.store)

    def __post_init__(self):
        _check(self.num_iterations >= 0, "run.num_iterations must be >= 0")
        _check(self.keep_checkpoints >= 1, "run.keep_checkpoints must be >= 1")
        _check(self.log_every >= 1, "run.log_every must be >= 1")
        for key in ("eval_every", "checkpoint_every", "stop_after_iterations"):
            _check(getattr(self, key) >= 0, f"run.{key} must be >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """``source='tiny'`` builds a random-init Decoder with the dims below on ``tokenizer``'s vocab;
    otherwise ``source`` goes to ``load_model`` (short name, HF dir or .gguf)."""

    source: str = "tiny"
    source_env: str = ""  # the env var a recipe reads ``source`` from (named in the error when it is missing)
    tokenizer: str = "smollm2-135m-instruct"  # tiny models: a tokenizer name/path, or "domain-bpe"
    domain_vocab_size: int = 1024  # "domain-bpe": BPE trained on the env's text, SmolLM2 specials/template
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    max_position_embeddings: int = 4096
    param_dtype: str = "float32"
    dtype: str = "float32"
    attention_impl: str = "xla"  # ModelConfig.attention_impl: xla | dot_product_attention | cudnn (GPU) | auto
    remat_policy: str = "none"  # ModelConfig.remat_policy: none | full | dots | dots_no_batch | save_attention_out

    def __post_init__(self):
        from sgcd_jax.models.config import ATTENTION_IMPLS, REMAT_POLICIES  # lazy: keeps this module jax-free

        _check(bool(self.source), "model.source must be 'tiny', a short name, an HF dir or a .gguf path")
        _one_of("model.param_dtype", self.param_dtype, ("float32", "bfloat16"))
        _one_of("model.dtype", self.dtype, ("float32", "bfloat16"))
        _one_of("model.attention_impl", self.attention_impl, ATTENTION_IMPLS)
        _one_of("model.remat_policy", self.remat_policy, REMAT_POLICIES)
        _check(self.attention_impl != "cudnn" or self.dtype == "bfloat16",
               "model.attention_impl='cudnn' needs model.dtype='bfloat16' (cuDNN attention has no float32 kernel); "
               "in float32 use 'dot_product_attention' or 'xla'")
        _check(self.num_heads % max(self.num_kv_heads, 1) == 0, "model.num_heads must be a multiple of model.num_kv_heads")
        for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            _check(getattr(self, key) > 0, f"model.{key} must be > 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EnvSpec:
    name: str = "airline_lite"
    seed: int = 0  # task generation seed (fixed across training seeds so runs compare on the same tasks)
    difficulty: str = "easy"
    train_split: str = "train"
    eval_split: str = "test"
    num_tasks: int = 64  # airline_lite: tasks generated per split
    tasks_per_db: int = 0  # airline_lite: 0 = one DB per split; k = a fresh DB (users, ids) every k tasks
    max_turns: int = 8
    user: str = "scripted"  # scripted | gemini (GEMINI_API_KEY); 'local' only from Python (envs/users.py)

    def __post_init__(self):
        _one_of("env.name", self.name, ("airline_lite", "tau3_airline", "appworld"))
        _one_of("env.difficulty", self.difficulty, ("easy", "medium", "hard", "mixed"))
        _check(self.max_turns >= 1, "env.max_turns must be >= 1")
        _check(self.num_tasks >= 1, "env.num_tasks must be >= 1")
        _check(self.tasks_per_db >= 0, "env.tasks_per_db must be >= 0 (0 = one DB per split)")
        _check(self.user != "local", "env.user='local' needs a generate(messages) callable, which a config cannot "
               "hold: use 'scripted' | 'gemini', or envs.users.make_user_factory('local', generate=...) in Python")
        _one_of("env.user", self.user, ("scripted", "gemini"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutSpec:
    tasks_per_iteration: int = 4
    group_size: int = 4  # G siblings per task
    max_new_tokens: int = 64  # per assistant turn
    max_total_tokens: int = 1024  # whole conversation
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    prefill_chunk: int = 512  # prompts/observations appended in chunks of this many tokens (power of two >= 16)
    decode_slots: int = 0  # > 0: continuous batching over this many decode rows; 0: synchronous turns
    share_prefixes: bool = True  # siblings' prompt kept once in the KV cache (prefix store), not copied per row
    reserve_kv_budget: bool = True  # rows get KV slots for the whole budget at once; False: grown in powers of two
    env_timeout_s: float = 60.0  # per env reset / step / reward call (a user simulator included); then the episode ends "env_timeout"

    def __post_init__(self):
        _check(self.prefill_chunk >= 16 and self.prefill_chunk.bit_count() == 1, "rollout.prefill_chunk: a power of two >= 16")
        _check(self.decode_slots >= 0, "rollout.decode_slots must be >= 0 (0 = synchronous turns)")
        _check(self.group_size >= 2, "rollout.group_size (G) must be >= 2 for group advantages")
        _check(self.top_k >= 0, f"rollout.top_k={self.top_k} must be >= 0 (0 = off)")
        _check(0 < self.env_timeout_s < math.inf, "rollout.env_timeout_s must be a finite number > 0")
        _check(self.tasks_per_iteration >= 1, "rollout.tasks_per_iteration must be >= 1")
        _check(self.temperature >= 0 and 0 < self.top_p <= 1, "rollout.temperature must be >= 0, rollout.top_p in (0, 1]")
        _check(self.max_new_tokens >= 1 and self.max_total_tokens > self.max_new_tokens,
               "rollout.max_total_tokens must exceed rollout.max_new_tokens >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AnnotationSpec:
    """Sibling selection + the annotator that writes the credit reference (``annotation.*``)."""

    name: str = "contrast"  # contrast | gemini | replay | none
    success_threshold: float = 1.0
    non_mixed_groups: str = "grpo"  # drop | grpo (keep, advantage is 0 anyway under GRPO)
    max_oversample_rounds: int = 0  # dynamic sampling: extra rollout rounds per iteration until every task slot holds a mixed group
    model: str = "gemini-2.5-flash"  # the Gemini annotator's model
    cache_dir: str = ""  # "" = run_dir/annotation_cache
    asynchronous: bool = False  # one-step-delayed credit: annotate iteration k during rollout k+1
    timeout_s: float = 60.0  # bounds each Gemini HTTP request and the wait for a group's reference (then abandoned)
    base_url: str = ""  # the Gemini annotator's endpoint: "" = Google's; else a Gemini-compatible proxy / server
    reference_tokens: int = 512  # room for the rendered reference in the teacher prompt (static shapes)
    reference_format: str = "full"  # full: summary + verdicts + reasons | compact: one "step k verdict" line per step | compact_quotes: + "success: <a sibling's action>" lines
    reference_control: str = "none"  # rotated: each step gets its next step's verdict | foreign_quotes: quotes from another group (does the teacher read?)

    def __post_init__(self):
        _one_of("annotation.name", self.name, ("contrast", "gemini", "replay", "none"))
        _one_of("annotation.reference_format", self.reference_format, ("full", "compact", "compact_quotes"))
        _one_of("annotation.reference_control", self.reference_control, ("none", "rotated", "foreign_quotes"))
        _one_of("annotation.non_mixed_groups", self.non_mixed_groups, ("drop", "grpo"))
        _check(self.max_oversample_rounds >= 0, "annotation.max_oversample_rounds must be >= 0")
        _check(0 < self.timeout_s < math.inf, "annotation.timeout_s must be a finite number > 0")
        _check(not self.base_url or self.base_url.startswith(("http://", "https://")),
               f"annotation.base_url={self.base_url!r} must start with http:// or https:// ('' = Google's endpoint)")


def _registered_one(key: str, kind: str, name: str) -> None:
    from sgcd_jax.losses import registered

    names = registered(kind)
    _check(name in names, f"{key}={name!r} is not a registered {kind}; registered: {names} "
                          f"(add one with @sgcd_jax.losses.register('{kind}/<name>'), e.g. in your config file)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossSpec:
    """Which registered functions make the loss (``sgcd_jax.losses.registered(kind)``); their knobs are
    the library's own config sections: ``advantage.*``, ``policy.*``, ``credit.*``, ``distill.*``."""

    advantage: str = "grpo"  # advantage/<name>: grpo | rloo | loop
    policy: str = "ppo"  # policy_loss/<name>: called with (PolicyBatch, policy.*)
    credit: str = "none"  # credit/<name>: none | sgcd (rlsd = sgcd with CreditConfig.preset("rlsd"))
    aux: tuple[str, ...] = ()  # aux_loss/<name>s added to the policy loss, e.g. ("sdpo",), with distill.*
    vocab_chunk: int = 128  # sequence chunk for the chunked vocab math

    def __post_init__(self):
        _registered_one("loss.advantage", "advantage", self.advantage)
        _registered_one("loss.policy", "policy_loss", self.policy)
        _check(self.policy != "sgcd", "loss.policy='sgcd' is the standalone SGCD loss (credit inside it); the "
                                      "trainer applies credit by loss.credit: set loss.credit='sgcd', loss.policy='ppo'")
        _registered_one("loss.credit", "credit", self.credit)
        for name in self.aux:
            _registered_one("loss.aux", "aux_loss", name)
        _check(len(set(self.aux)) == len(self.aux), f"loss.aux={self.aux!r} names a loss twice")
        _check(self.vocab_chunk >= 1, "loss.vocab_chunk must be >= 1")

    @property
    def needs_teacher(self) -> bool:
        return self.credit != "none" or bool(self.aux)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimSpec:
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | constant
    end_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    grad_clip: float = 1.0
    micro_batch_size: int = 8  # trajectories per micro-batch (grad accumulation across them)
    score_micro_batch_size: int = 0  # rows per forward of the no-grad student scoring pass (strided); 0 = all rows at once
    updates_per_iteration: int = 1
    # RL updates only parameters whose path (e.g. 'layers/1/mlp/up_proj/kernel') matches this regex; "" = all (SFT: all)
    trainable: str = ""
    master_dtype: str = "float32"  # fp32 master + moments when params are bf16 | "param": bf16-only, stochastic rounding

    def __post_init__(self):
        _check(0 < self.learning_rate <= 1.0, f"optim.learning_rate={self.learning_rate!r} must be in (0, 1] "
                                              "(AdamW moves each weight by about lr per update)")
        _one_of("optim.master_dtype", self.master_dtype, ("float32", "param"))
        _one_of("optim.schedule", self.schedule, ("cosine", "constant"))
        _check(self.micro_batch_size >= 1 and self.score_micro_batch_size >= 0, "optim.micro_batch_size must be >= 1 and optim.score_micro_batch_size >= 0")
        _check(self.updates_per_iteration >= 1, "optim.updates_per_iteration must be >= 1")
        try:
            re.compile(self.trainable)
        except re.error as error:
            raise ConfigError(f"optim.trainable={self.trainable!r} is not a regex: {error}") from None
        _check(self.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 = off)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTSpec:
    """Optional warm-up on oracle demonstrations (airline_lite) before RL."""

    enabled: bool = False
    num_demos: int = 64
    steps: int = 100
    batch_size: int = 8
    learning_rate: float = 3e-3
    cache_dir: str = ""  # "" = off; else reuse an identical earlier warm-up (sgcd_jax/trainer/sft_cache.py)
    # An imperfect demonstrator: this airline_lite shortcut policy (envs/airline_lite/oracle.py SHORTCUTS,
    # e.g. "silent") plays a seeded `demo_shortcut_rate` of the demos it applies to; "" = oracle only.
    demo_shortcut: str = ""
    demo_shortcut_rate: float = 0.0
    reference_rate: float = 0.0  # rows per batch that teach the teacher to read a reference (trainer/reading_demos.py)

    def __post_init__(self):
        _check(self.steps >= 0 and self.batch_size >= 1 and self.num_demos >= 1,
               "sft.steps >= 0, sft.batch_size >= 1 and sft.num_demos >= 1 required")
        for key in ("demo_shortcut_rate", "reference_rate"):
            _check(0.0 <= getattr(self, key) <= 1.0, f"sft.{key} must be in [0, 1]")
        _check(0 < self.learning_rate <= 1.0, f"sft.learning_rate={self.learning_rate!r} must be in (0, 1]")
        from sgcd_jax.envs.airline_lite.oracle import SHORTCUTS

        _check(self.demo_shortcut in ("",) + SHORTCUTS,
               f"sft.demo_shortcut {self.demo_shortcut!r}: choose '' or one of {SHORTCUTS}")
        _check(bool(self.demo_shortcut) or self.demo_shortcut_rate == 0.0,
               "sft.demo_shortcut_rate > 0 needs sft.demo_shortcut (which shortcut the demonstrator takes)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSpec:
    num_tasks: int = 16
    trials: int = 1
    temperature: float = 0.0
    at_start: bool = False  # also evaluate the fresh (post-SFT) policy as the step-0 baseline

    def __post_init__(self):
        _check(self.num_tasks >= 1 and self.trials >= 1, "eval.num_tasks and eval.trials must be >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshSpec:
    data: int = -1
    fsdp: int = 1
    tp: int = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    run: RunConfig = RunConfig()
    model: ModelSpec = ModelSpec()
    env: EnvSpec = EnvSpec()
    rollout: RolloutSpec = RolloutSpec()
    annotation: AnnotationSpec = AnnotationSpec()
    loss: LossSpec = LossSpec()
    advantage: AdvantageConfig = AdvantageConfig()
    policy: PolicyLossConfig = PolicyLossConfig()
    credit: CreditConfig = CreditConfig()
    distill: DistillConfig = DistillConfig()
    optim: OptimSpec = OptimSpec()
    sft: SFTSpec = SFTSpec()
    eval: EvalSpec = EvalSpec()
    mesh: MeshSpec = MeshSpec()

    def __post_init__(self):
        # Keys that would only fail deep inside a run (after SFT, eval, checkpoint 0) are checked here.
        oracle = f"with env.name={self.env.name!r}: only airline_lite has the oracle demos it needs"
        _check(not self.sft.enabled or self.env.name == "airline_lite", f"sft.enabled=True {oracle}; set it False")
        _check(self.model.source != "tiny" or self.model.tokenizer != "domain-bpe" or self.env.name == "airline_lite",
               f"model.tokenizer='domain-bpe' {oracle}; use a tokenizer name, e.g. 'smollm2-135m-instruct'")
        if self.loss.credit != "none" and not self.loss.aux:
            _check(self.annotation.name != "none",
                   f"loss.credit={self.loss.credit!r} needs a credit reference: set annotation.name "
                   "to 'contrast', 'gemini' or 'replay'")

    needs_reference = property(lambda self: self.policy.kl_coef > 0)
    run_dir = property(lambda self: os.path.join(self.run.workdir, self.run.name))


def _coerce(path: str, value: Any, annotation: Any) -> Any:
    args = typing.get_args(annotation)
    if type(None) in args:  # `float | None`: None switches the knob off
        if value is None:
            return None
        annotation = next(a for a in args if a is not type(None))
    if typing.get_origin(annotation) is tuple:  # tuple[str, ...]: a list or tuple of names
        if isinstance(value, str):
            value = tuple(v.strip() for v in value.split(",") if v.strip())
        _check(isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value),
               f"{path}={value!r} must be a list of names, e.g. ['sdpo'] (or [] for none)")
        return tuple(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool:
        _check(isinstance(value, bool), f"{path}={value!r} must be a bool (True/False)")
    elif annotation is int:
        _check(isinstance(value, int) and not isinstance(value, bool), f"{path}={value!r} must be an int")
    elif annotation is float:  # inf / nan never make a sensible knob; they would only fail mid-run
        _check(isinstance(value, float) and math.isfinite(value), f"{path}={value!r} must be a finite number")
    elif annotation is str:
        _check(isinstance(value, str), f"{path}={value!r} must be a string")
    return value


def all_keys(cls: type = None, path: str = "") -> list[str]:
    """Every dotted config key (``loss.credit``, ``credit.beta_pos``, …)."""
    cls = TrainConfig if cls is None else cls
    hints = typing.get_type_hints(cls)
    keys = []
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            keys += all_keys(hints[field.name], f"{path}{field.name}.")
        else:
            keys.append(f"{path}{field.name}")
    return keys


def unknown_key_message(key: str) -> str:
    """``unknown config key 'credit.beta'; closest valid keys: ['credit.beta_pos', …]``."""
    import difflib

    valid = all_keys()
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    if not close:  # a right leaf under a wrong section: match on the last part
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in valid if k.rsplit(".", 1)[-1] == leaf][:3] or \
            difflib.get_close_matches(key, valid, n=3, cutoff=0.3)
    section = key.split(".")[0]
    sections = sorted({k.split(".")[0] for k in valid})
    hint = f"; closest valid keys: {close}" if close else f"; sections: {sections}"
    if section not in sections:
        hint += f" (no section {section!r})"
    return f"unknown config key {key!r}{hint}. All keys and defaults: python -m sgcd_jax.train --help"


def _build(cls: type, values: dict[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(unknown_key_message(f"{path}{unknown[0]}"))
    kwargs = {}
    for key, value in values.items():
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            _check(isinstance(value, dict), f"{path}{key} must be a section (dict), got {value!r}")
            kwargs[key] = _build(annotation, value, f"{path}{key}.")
        else:
            kwargs[key] = _coerce(f"{path}{key}", value, annotation)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, KeyError) as error:  # the loss library's own checks: name the section
        message = str(error).strip("'\"")
        raise ConfigError(f"{path.rstrip('.') or 'config'}: {message}") from None


def from_config_dict(config: Any) -> TrainConfig:
    """ConfigDict / nested dict → validated TrainConfig. Raises ConfigError naming the bad key."""
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return _build(TrainConfig, values, "")
