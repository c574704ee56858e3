"""Config checks that depend on the process environment, run first thing in ``train`` (before any model is
built): an annotator that cannot work fails now, naming its key, not after the SFT warm-up and eval.
The config's own checks (ranges, key combinations) live in ``sgcd_jax.config`` and run at parse time."""

from __future__ import annotations

import os

from sgcd_jax.config import ConfigError, TrainConfig


def check_environment(config: TrainConfig, environ: dict[str, str] | None = None) -> None:
    """Raise ``ConfigError`` naming the key whose setting this environment cannot run."""
    environ = os.environ if environ is None else environ
    if not config.loss.needs_teacher:
        return
    if config.annotation.name == "gemini" and not environ.get("GEMINI_API_KEY"):
        raise ConfigError("annotation.name='gemini' needs an API key in the environment variable GEMINI_API_KEY "
                          "(keys are never read from config files); or set annotation.name='contrast'")
    if config.annotation.name == "replay":
        raise ConfigError("annotation.name='replay' is not available in the trainer (it needs the identity of the "
                          "annotator that filled the cache); use sgcd_jax.credit.ReplayAnnotator offline, or "
                          "annotation.name='contrast' / 'gemini' with annotation.cache_dir")
