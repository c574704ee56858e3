"""Content-addressed on-disk cache of credit references, and offline replay.

Key = sha256 of (prompt version, annotator identity, canonical group input). A run that sees the
same groups again (rerun, ablation sharing rollouts, offline replay) gets bit-identical references
and issues no annotator calls. Entries are written to a temp file in the same directory and
``os.replace``d into place, so concurrent writers (threads or processes) never expose a partial
file; two writers of one key write the same bytes. Only references are cached: a failed
annotation is retried next time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

import pydantic

from sgcd_jax.credit.annotator import AnnotationResult, Annotator, not_mixed_result
from sgcd_jax.credit.prompt import PROMPT_VERSION, canonical_group_input
from sgcd_jax.credit.schema import CreditReference
from sgcd_jax.credit.selection import SiblingGroup

logger = logging.getLogger(__name__)


def cache_key(group: SiblingGroup, annotator_identity: str,
              prompt_version: str = PROMPT_VERSION) -> str:
    payload = {"prompt_version": prompt_version, "annotator": annotator_identity,
               "input": canonical_group_input(group)}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _reference_digest(reference_json) -> str:
    blob = json.dumps(reference_json, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ReferenceCache:
    """The store: ``get(key)`` / ``put(key, reference, meta)`` under ``root/<key[:2]>/<key>.json``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.rejected = 0

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> CreditReference | None:
        """The reference stored under ``key``, or None. An entry is used only if it names ``key``
        (an entry moved or copied to another key's file is rejected) and its reference hashes to
        the ``reference_sha256`` it stores; unreadable, mismatched or absurdly nested entries are
        counted in ``rejected``, treated as misses and rewritten."""
        path = self.path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(entry, dict) or entry.get("key") != key:
                raise KeyError("entry names another key")
            if "reference_sha256" in entry and entry["reference_sha256"] != _reference_digest(entry["reference"]):
                raise ValueError("reference does not match its stored hash")
            return CreditReference.model_validate(entry["reference"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, RecursionError, pydantic.ValidationError) as err:
            logger.warning("ignoring unreadable cache entry %s (%s: %s); it will be rewritten",
                           path, type(err).__name__, str(err)[:80])
            with self._lock:
                self.rejected += 1
            return None

    def put(self, key: str, reference: CreditReference, meta: dict[str, str]) -> None:
        dumped = reference.model_dump(mode="json")
        entry = {"key": key, **meta, "reference": dumped, "reference_sha256": _reference_digest(dumped)}
        atomic_write_text(self.path(key),
                          json.dumps(entry, sort_keys=True, indent=1, ensure_ascii=False) + "\n")


class CachingAnnotator:
    """Serve references from the cache, calling ``inner`` only on a miss. With
    ``replay_only=True`` a miss returns ``reason='replay_miss'`` and no call is made (offline
    reruns); ``inner`` may then be None if ``identity`` names the annotator that filled the cache."""

    def __init__(self, inner: Annotator | None, cache_dir: str | os.PathLike, *,
                 replay_only: bool = False, identity: str | None = None):
        if inner is None and (identity is None or not replay_only):
            raise ValueError("CachingAnnotator without an inner annotator must be replay_only and "
                             "given the identity() of the annotator that filled the cache")
        self.inner = inner
        self.replay_only = replay_only
        self._identity = identity if identity is not None else inner.identity()
        self.cache = ReferenceCache(cache_dir)
        self.name = f"cache({inner.name if inner else 'replay'})"
        self._lock = threading.Lock()
        self.hits = self.misses = self.writes = 0

    def identity(self) -> str:
        return self._identity

    def annotate(self, group: SiblingGroup) -> AnnotationResult:
        start = time.monotonic()
        if not group.is_mixed:
            return not_mixed_result(group, self.name)
        key = cache_key(group, self._identity)
        cached = self.cache.get(key)
        if cached is not None:
            with self._lock:
                self.hits += 1
            return AnnotationResult(group.group_id, cached, "cache_hit",
                                    latency_s=time.monotonic() - start, source=self.name)
        with self._lock:
            self.misses += 1
        if self.replay_only or self.inner is None:
            return AnnotationResult(group.group_id, None, "replay_miss",
                                    latency_s=time.monotonic() - start, source=self.name)
        result = self.inner.annotate(group)
        if result.reference is not None:
            # A fallback's reference (e.g. contrast after a Gemini failure) is stored under the
            # fallback's identity: the Gemini key stays a miss, so a later run asks Gemini again.
            producer = result.identity or self._identity
            if producer != self._identity:
                key = cache_key(group, producer)
            try:
                self.cache.put(key, result.reference, {"prompt_version": PROMPT_VERSION,
                                                       "annotator": producer,
                                                       "task_id": group.task_id})
                with self._lock:
                    self.writes += 1
            except OSError as err:  # a full disk must not stop training
                logger.warning("could not write credit cache entry %s: %s", key, err)
        return result

    def as_metrics(self, prefix: str = "credit_cache/") -> dict[str, float]:
        with self._lock:
            return {f"{prefix}hits": float(self.hits), f"{prefix}misses": float(self.misses),
                    f"{prefix}writes": float(self.writes), f"{prefix}rejected": float(self.cache.rejected)}


def ReplayAnnotator(cache_dir: str | os.PathLike, identity: str) -> CachingAnnotator:  # noqa: N802
    """Offline replay of a cache filled by the annotator whose ``identity()`` is given."""
    return CachingAnnotator(None, cache_dir, replay_only=True, identity=identity)
