"""Benchmarks: `python -m sgcd_jax.bench <name>` runs sgcd_jax/bench/<name>.py's main(argv) and prints JSON.

Each benchmark reports our figure and a peer's (e.g. transformers+torch) measured in the same run.
"""

import pkgutil


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
