"""Test-wide setup: 8 simulated CPU devices so sharding tests run on any machine, and one persistent
XLA compilation cache per test session.

Must run before jax is imported anywhere; pytest imports conftest first.

The compilation cache: many tests build the same tiny models and compile the same programs again
(a fresh ``Learner`` retraces its update; subprocess tests — multi-process, kill -9/resume, CLI —
start cold). With ``JAX_COMPILATION_CACHE_DIR`` set, an identical program (same HLO, devices, flags,
jax version) is loaded from disk instead of recompiled: the same executable, so runs that tests
compare stay bitwise identical. The directory is a fresh temp dir per session (removed at exit), so
a stale cache can never leak between sessions; set ``JAX_COMPILATION_CACHE_DIR`` yourself to keep one.
Subprocesses inherit it through the environment.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="sgcd_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # default 1 s: most of ours are less
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop the compiled programs of a finished test module (jax's in-memory caches; the disk cache above
    keeps them for reuse). Every XLA CPU executable holds its own memory mappings; one process running the
    whole suite kept ~700 tests' executables alive and segfaulted inside XLA while compiling or loading an
    executable in tests/test_train_step.py, twice, ~660 tests in, on an AMD EPYC machine; that file alone
    passes (vm.max_map_count is 65,530 here)."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()
