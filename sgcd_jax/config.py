"""Typed, frozen, validated training configuration.

Experiments are Python files (``configs/*.py``) whose ``get_config()`` returns an
``ml_collections.ConfigDict``; command-line overrides (``--config.rollout.group_size=8``) are applied by
``ml_collections.config_flags``. ``from_config_dict`` then converts the dict into the dataclasses
below: unknown keys and bad values raise ``ConfigError`` naming the key and the fix, before any
model is built. ``save_resolved`` writes the resolved config (never secrets) into the run dir.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import typing
from typing import Any

SECRET_KEY_MARKERS = ("api_key", "apikey", "token_secret", "password", "secret")


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
    store_rollouts: bool = True  # append tokens/scores/credit weights to run_dir/rollouts (sgcd_jax.store)

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
        _check(self.num_heads % max(self.num_kv_heads, 1) == 0,
               "model.num_heads must be a multiple of model.num_kv_heads")
        for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim"):
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
    user: str = "scripted"  # scripted | gemini | local

    def __post_init__(self):
        _one_of("env.name", self.name, ("airline_lite", "tau3_airline", "appworld"))
        _one_of("env.difficulty", self.difficulty, ("easy", "medium", "hard", "mixed"))
        _check(self.max_turns >= 1, "env.max_turns must be >= 1")
        _check(self.num_tasks >= 1, "env.num_tasks must be >= 1")
        _check(self.tasks_per_db >= 0, "env.tasks_per_db must be >= 0 (0 = one DB per split)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutSpec:
    tasks_per_iteration: int = 4
    group_size: int = 4  # G siblings per task
    max_new_tokens: int = 64  # per assistant turn
    max_total_tokens: int = 1024  # whole conversation
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    env_timeout_s: float = 60.0  # per env reset / step / reward call (a user simulator included); then the episode ends "env_timeout"

    def __post_init__(self):
        _check(self.group_size >= 2, "rollout.group_size (G) must be >= 2 for group advantages")
        _check(self.top_k >= 0, f"rollout.top_k={self.top_k} must be >= 0 (0 = off)")
        _check(math.isfinite(self.env_timeout_s) and self.env_timeout_s > 0,
               "rollout.env_timeout_s must be a finite number > 0")
        _check(self.tasks_per_iteration >= 1, "rollout.tasks_per_iteration must be >= 1")
        _check(self.temperature >= 0, "rollout.temperature must be >= 0")
        _check(0 < self.top_p <= 1, "rollout.top_p must be in (0, 1]")
        _check(self.max_new_tokens >= 1 and self.max_total_tokens > self.max_new_tokens,
               "rollout.max_total_tokens must exceed rollout.max_new_tokens >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CreditSpec:
    """Sibling selection + annotation (the credit reference)."""

    annotator: str = "contrast"  # contrast | gemini | replay | none
    success_threshold: float = 1.0
    non_mixed_groups: str = "grpo"  # drop | grpo (keep, advantage is 0 anyway under GRPO)
    max_oversample_rounds: int = 0  # dynamic sampling: extra rollout rounds per iteration until every task slot holds a mixed group
    gemini_model: str = "gemini-2.5-flash"
    cache_dir: str = ""  # "" = run_dir/annotation_cache
    async_annotation: bool = False  # one-step-delayed credit: annotate iteration k during rollout k+1 (train.py)
    # One timeout for annotation: each Gemini HTTP request and the trainer's wait for a group's
    # reference; a call still running after it is abandoned (daemon thread; sgcd_jax/daemon_pool.py).
    timeout_s: float = 60.0
    gemini_base_url: str = ""  # "" = Google's endpoint; else a Gemini-compatible proxy / server (HttpOptions.base_url)
    reference_tokens: int = 512  # room for the rendered reference in the teacher prompt (static shapes)

    def __post_init__(self):
        _one_of("credit.annotator", self.annotator, ("contrast", "gemini", "replay", "none"))
        _one_of("credit.non_mixed_groups", self.non_mixed_groups, ("drop", "grpo"))
        _check(self.max_oversample_rounds >= 0, "credit.max_oversample_rounds must be >= 0")
        _check(math.isfinite(self.timeout_s) and self.timeout_s > 0, "credit.timeout_s must be a finite number > 0")
        _check(not self.gemini_base_url or self.gemini_base_url.startswith(("http://", "https://")),
               f"credit.gemini_base_url={self.gemini_base_url!r} must start with http:// or https:// ('' = Google's)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossSpec:
    """Which registered functions make the loss, and their knobs (see DESIGN.md credit family)."""

    advantage: str = "grpo"  # grpo | rloo
    norm_by_std: bool = True
    adv_eps: float = 1e-6
    clip_low: float = 0.2
    clip_high: float = 0.28
    aggregation: str = "token-mean"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    dual_clip: float = 3.0  # dual-clip constant for negative advantages; 0 = off
    credit: str = "none"  # none | sgcd | rlsd (rlsd = the sgcd family with RLSD's values, see configs/rlsd.py)
    credit_lambda: float = 1.0  # λ: Ã = A·((1−λ) + λ·w)
    lambda_schedule: str = "constant"  # constant | linear | cosine decay to lambda_final
    lambda_final: float = 0.0
    lambda_decay_steps: int = 1000
    beta_pos: float = 1.0
    beta_neg: float = 1.0
    eps_low_pos: float = 0.5
    eps_high_pos: float = 1.0
    eps_low_neg: float = 0.5
    eps_high_neg: float = 1.0
    bounded: bool = True  # False: bounds widened to [0.01, 100] (the "no bounds" ablation)
    renormalize: bool = True
    granularity: str = "token"  # token | step
    eta: float = 0.1  # η · D_t (reverse KL) in the signed score
    entropy_gate: str = "none"  # none | hard | soft
    entropy_threshold: float = 0.5
    sdpo_coef: float = 0.0  # >0 adds the direct self-distillation actor loss (SDPO baseline)
    sdpo_mode: str = "sampled"  # sampled (token log-ratio surrogate) | full (vocab reverse KL)
    vocab_chunk: int = 128  # sequence chunk for the chunked vocab math

    def __post_init__(self):
        _one_of("loss.advantage", self.advantage, ("grpo", "rloo"))
        _one_of("loss.aggregation", self.aggregation,
                ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"))
        _one_of("loss.kl_estimator", self.kl_estimator, ("k1", "k2", "k3"))
        _one_of("loss.credit", self.credit, ("none", "sgcd", "rlsd"))
        _one_of("loss.granularity", self.granularity, ("token", "step"))
        _one_of("loss.sdpo_mode", self.sdpo_mode, ("sampled", "full"))
        _one_of("loss.lambda_schedule", self.lambda_schedule, ("constant", "linear", "cosine"))
        _one_of("loss.entropy_gate", self.entropy_gate, ("none", "hard", "soft"))
        _check(0.0 <= self.credit_lambda <= 1.0 and 0.0 <= self.lambda_final <= 1.0,
               "loss.credit_lambda and loss.lambda_final must be in [0, 1]")
        _check(self.lambda_decay_steps >= 1, "loss.lambda_decay_steps must be >= 1")
        _check(self.clip_low >= 0 and self.clip_high >= 0, "loss.clip_low/clip_high must be >= 0")
        for key in ("eps_low_pos", "eps_low_neg"):
            _check(0 <= getattr(self, key) < 1, f"loss.{key} must be in [0, 1) (lower bound 1-eps > 0)")
        for key in ("eps_high_pos", "eps_high_neg", "kl_coef", "sdpo_coef", "eta", "dual_clip"):
            _check(getattr(self, key) >= 0, f"loss.{key} must be >= 0")
        _check(self.vocab_chunk >= 1, "loss.vocab_chunk must be >= 1")
        _check(math.isfinite(self.adv_eps) and self.adv_eps > 0,
               f"loss.adv_eps={self.adv_eps!r} must be a finite number > 0 (it keeps A = (r-mean)/(std+eps) finite)")
        for key in ("clip_low", "clip_high", "kl_coef", "entropy_coef", "credit_lambda", "eta", "beta_pos", "beta_neg"):
            _check(math.isfinite(getattr(self, key)), f"loss.{key} must be finite")

    @property
    def needs_teacher(self) -> bool:
        return self.credit != "none" or self.sdpo_coef > 0

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0


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
    updates_per_iteration: int = 1
    # RL updates only parameters whose path (e.g. 'layers/1/mlp/up_proj/kernel') matches this regex;
    # "" = all. The SFT warm-up always trains everything.
    trainable: str = ""

    def __post_init__(self):
        _check(math.isfinite(self.learning_rate) and 0 < self.learning_rate <= 1.0,
               f"optim.learning_rate={self.learning_rate!r} must be finite and in (0, 1] (AdamW moves each "
               "weight by about lr per update)")
        for key in ("b1", "b2", "end_lr_fraction", "weight_decay", "grad_clip"):
            _check(math.isfinite(getattr(self, key)), f"optim.{key} must be finite")
        _one_of("optim.schedule", self.schedule, ("cosine", "constant"))
        _check(self.micro_batch_size >= 1, "optim.micro_batch_size must be >= 1")
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
    cache_dir: str = ""  # "" = off; else reuse an identical earlier warm-up (sgcd_jax/sft_cache.py)
    # An imperfect demonstrator: this airline_lite shortcut policy (envs/airline_lite/oracle.py SHORTCUTS,
    # e.g. "silent") plays a seeded `demo_shortcut_rate` of the demos it applies to; "" = oracle only.
    demo_shortcut: str = ""
    demo_shortcut_rate: float = 0.0

    def __post_init__(self):
        _check(self.steps >= 0 and self.batch_size >= 1 and self.num_demos >= 1,
               "sft.steps >= 0, sft.batch_size >= 1 and sft.num_demos >= 1 required")
        _check(0.0 <= self.demo_shortcut_rate <= 1.0, "sft.demo_shortcut_rate must be in [0, 1]")
        _check(math.isfinite(self.learning_rate) and 0 < self.learning_rate <= 1.0,
               f"sft.learning_rate={self.learning_rate!r} must be finite and in (0, 1]")
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
    credit: CreditSpec = CreditSpec()
    loss: LossSpec = LossSpec()
    optim: OptimSpec = OptimSpec()
    sft: SFTSpec = SFTSpec()
    eval: EvalSpec = EvalSpec()
    mesh: MeshSpec = MeshSpec()

    def __post_init__(self):
        # Keys that only fail deep inside a run (after SFT, eval, checkpoint 0) are checked here.
        oracle_only = "only airline_lite has the oracle demonstrations it is built from"
        _check(not self.sft.enabled or self.env.name == "airline_lite",
               f"sft.enabled=True with env.name={self.env.name!r}: {oracle_only}; set sft.enabled=False")
        _check(not (self.model.source == "tiny" and self.model.tokenizer == "domain-bpe") or self.env.name == "airline_lite",
               f"model.tokenizer='domain-bpe' with env.name={self.env.name!r}: {oracle_only}; set model.tokenizer "
               "to a tokenizer name or path (e.g. 'smollm2-135m-instruct')")
        if self.loss.credit != "none" or self.loss.sdpo_coef > 0:
            _check(self.credit.annotator != "none" or self.loss.sdpo_coef > 0,
                   f"loss.credit={self.loss.credit!r} needs a credit reference: set credit.annotator "
                   "to 'contrast', 'gemini' or 'replay'")

    @property
    def run_dir(self) -> str:
        return os.path.join(self.run.workdir, self.run.name)


def _coerce(path: str, value: Any, annotation: Any) -> Any:
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool:
        _check(isinstance(value, bool), f"{path}={value!r} must be a bool (True/False)")
    elif annotation is int:
        _check(isinstance(value, int) and not isinstance(value, bool), f"{path}={value!r} must be an int")
    elif annotation is float:
        _check(isinstance(value, float), f"{path}={value!r} must be a number")
    elif annotation is str:
        _check(isinstance(value, str), f"{path}={value!r} must be a string")
    return value


def _build(cls: type, values: dict[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"unknown config key(s) {[f'{path}{k}' for k in unknown]}; "
                          f"valid keys under '{path or '<root>'}': {sorted(fields)}")
    kwargs = {}
    for key, value in values.items():
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            _check(isinstance(value, dict), f"{path}{key} must be a section (dict), got {value!r}")
            kwargs[key] = _build(annotation, value, f"{path}{key}.")
        else:
            kwargs[key] = _coerce(f"{path}{key}", value, annotation)
    return cls(**kwargs)


def from_config_dict(config: Any) -> TrainConfig:
    """ConfigDict / nested dict → validated TrainConfig. Raises ConfigError naming the bad key."""
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return _build(TrainConfig, values, "")


def to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_resolved(config: TrainConfig, run_dir: str) -> str:
    """Write the resolved config as JSON; keys that look like secrets are dropped."""
    def scrub(d: dict) -> dict:
        return {k: (scrub(v) if isinstance(v, dict) else v) for k, v in d.items()
                if not any(m in k.lower() for m in SECRET_KEY_MARKERS)}

    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "config.json")
    with open(path, "w") as f:
        json.dump(scrub(to_dict(config)), f, indent=2, sort_keys=True)
    return path


def load_config_file(path: str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Load ``configs/x.py`` (its ``get_config()``), apply dotted ``overrides``, validate."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"sgcd_config_{abs(hash(path))}", path)
    _check(spec is not None and spec.loader is not None, f"cannot load config file {path!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    cd = module.get_config()
    for dotted, value in (overrides or {}).items():
        node = cd
        *parents, leaf = dotted.split(".")
        for p in parents:
            _check(p in node, f"unknown config section {dotted!r}")
            node = node[p]
        _check(leaf in node, f"unknown config key {dotted!r}")
        node[leaf] = value
    return from_config_dict(cd)


def configs_dir() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(here, "configs")




def preflight(config: TrainConfig, environ: dict[str, str] | None = None) -> None:
    """Checks that depend on the environment, run before any model is built (``train`` calls it first):
    an annotator that cannot work fails now, naming its key, not after the SFT warm-up and eval."""
    environ = os.environ if environ is None else environ
    if not config.loss.needs_teacher:
        return
    if config.credit.annotator == "gemini":
        _check(bool(environ.get("GEMINI_API_KEY")),
               "credit.annotator='gemini' needs an API key in the environment variable GEMINI_API_KEY "
               "(keys are never read from config files); or set credit.annotator='contrast'")
    if config.credit.annotator == "replay":
        raise ConfigError("credit.annotator='replay' is not available in the trainer (it needs the identity of the "
                          "annotator that filled the cache); use sgcd_jax.credit.ReplayAnnotator offline, or "
                          "credit.annotator='contrast' / 'gemini' with credit.cache_dir")
