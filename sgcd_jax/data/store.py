"""Rollout + credit store: every iteration's trajectories, scores and credit weights, in zarr v3
(tensorstore) under ``<run_dir>/rollouts``, so credit ablations can run on stored rollouts
(``python -m sgcd_jax.rescore``) and reports can show per-token credit after the fact.

Layout (one sub-store per process, so hosts never coordinate writes)::

    rollouts/process_00000/
      manifest.json                  committed row/token counts + per-iteration attributes
      tokens/<field>/                1-D zarr3 arrays, all trajectories' tokens concatenated
      trajectories/<field>/          1-D zarr3 arrays, one entry per trajectory
      strings/<field>/               utf-8 bytes of task ids / group ids, concatenated

A trajectory's tokens are ``tokens/*[token_offset : token_offset + num_tokens]``; all token fields
share one alignment (the trainer's: ``Trajectory.token_ids``). Appends write arrays first and the
manifest last (atomic rename), so a crash mid-append leaves the store at the previous iteration.
Token fields absent in an iteration read back as NaN (floats) or 0 (ints) and are listed in the
iteration's ``fields``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

TOKEN_FIELDS: dict[str, str] = {  # name -> dtype
    "token_ids": "int32",
    "loss_mask": "int8",
    "step_ids": "int32",  # assistant turn on generated tokens, -1 elsewhere
    "sampler_logprobs": "float32",
    "student_logprobs": "float32",
    "teacher_logprobs": "float32",
    "reverse_kl": "float32",  # KL(p_S || q_T) over the full vocabulary
    "entropy": "float32",  # H(p_S)
    "credit_weights": "float32",
    "token_advantages": "float32",
}
REQUIRED_TOKEN_FIELDS = ("token_ids", "loss_mask", "step_ids")
TRAJECTORY_FIELDS: dict[str, str] = {
    "iteration": "int32",
    "reward": "float32",
    "advantage": "float32",
    "prompt_len": "int32",
    "sample_index": "int32",
    "token_offset": "int64",
    "num_tokens": "int32",
    "task_id_offset": "int64",
    "task_id_len": "int32",
    "group_id_offset": "int64",
    "group_id_len": "int32",
}
STRING_FIELDS = ("task_id", "group_id")
_TOKEN_CHUNK, _ROW_CHUNK, _BYTE_CHUNK = 1 << 16, 1 << 12, 1 << 16
MANIFEST = "manifest.json"


def _array_spec(path: Path, dtype: str, chunk: int) -> dict[str, Any]:
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {
            "shape": [0],
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk]}},
            "data_type": dtype,
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                       {"name": "zstd", "configuration": {"level": 3}}],
        },
    }


def _open_column(path: Path, dtype: str, chunk: int, create: bool) -> ts.TensorStore:
    if create and not (path / "zarr.json").exists():
        return ts.open(_array_spec(path, dtype, chunk), create=True).result()
    return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}).result()


def _append(column: ts.TensorStore, start: int, values: np.ndarray) -> ts.TensorStore:
    stop = start + len(values)
    if stop > column.shape[0]:
        column = column.resize(exclusive_max=[stop], resize_metadata_only=True).result()
    if len(values):
        column[start:stop].write(values).result()
    return column


def process_store_dir(root: str | os.PathLike, process_index: int) -> Path:
    return Path(root) / f"process_{process_index:05d}"


@dataclasses.dataclass
class IterationRows:
    """One (process, iteration) segment read back; token fields padded to ``padded_length``."""

    process_index: int
    iteration: int
    attrs: dict[str, Any]  # credit_fn, credit_config, step, padded_length, fields, ...
    task_ids: list[str]
    group_ids: list[str]
    trajectories: dict[str, np.ndarray]  # TRAJECTORY_FIELDS -> [N]
    tokens: dict[str, np.ndarray]  # TOKEN_FIELDS -> [N, T] (0 / NaN past each row's length)

    @property
    def num_trajectories(self) -> int:
        return len(self.task_ids)

    @property
    def lengths(self) -> np.ndarray:
        return self.trajectories["num_tokens"]


class RolloutStore:
    """Append-only writer for one process's sub-store; also the reader of that sub-store."""

    def __init__(self, root: str | os.PathLike, process_index: int = 0, create: bool = True):
        self.path = process_store_dir(root, process_index)
        self.process_index = process_index
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
        elif not (self.path / MANIFEST).exists():
            raise FileNotFoundError(f"no rollout store at {self.path} (missing {MANIFEST}); was the "
                                    "run started with the store enabled?")
        self.manifest = self._read_manifest()
        self._tokens = {n: _open_column(self.path / "tokens" / n, d, _TOKEN_CHUNK, create)
                        for n, d in TOKEN_FIELDS.items()}
        self._rows = {n: _open_column(self.path / "trajectories" / n, d, _ROW_CHUNK, create)
                      for n, d in TRAJECTORY_FIELDS.items()}
        self._strings = {n: _open_column(self.path / "strings" / n, "uint8", _BYTE_CHUNK, create)
                         for n in STRING_FIELDS}
        if create and not (self.path / MANIFEST).exists():
            self._write_manifest()

    # ------------------------------------------------------------------ manifest
    def _read_manifest(self) -> dict[str, Any]:
        path = self.path / MANIFEST
        if not path.exists():
            return {"version": 1, "num_trajectories": 0, "num_tokens": 0,
                    "string_bytes": {n: 0 for n in STRING_FIELDS}, "iterations": []}
        return json.loads(path.read_text())

    def _write_manifest(self) -> None:
        tmp = self.path / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=1, sort_keys=True))
        os.replace(tmp, self.path / MANIFEST)

    @property
    def iterations(self) -> list[int]:
        return [entry["iteration"] for entry in self.manifest["iterations"]]

    @property
    def num_trajectories(self) -> int:
        return self.manifest["num_trajectories"]

    # ------------------------------------------------------------------ write
    def append(self, iteration: int, *, task_ids: Sequence[str], group_ids: Sequence[str],
               lengths: Sequence[int] | np.ndarray, tokens: Mapping[str, Any],
               rewards: Sequence[float] | np.ndarray, advantages: Sequence[float] | np.ndarray | None = None,
               prompt_lens: Sequence[int] | np.ndarray | None = None,
               sample_indices: Sequence[int] | np.ndarray | None = None,
               attrs: Mapping[str, Any] | None = None) -> None:
        """Append one iteration's N trajectories.

        tokens: field -> padded array [N, T_pad] (row i's first ``lengths[i]`` entries are stored)
          or a list of N 1-D arrays of length ``lengths[i]``. Must include REQUIRED_TOKEN_FIELDS.
        attrs: JSON-serialisable facts needed to recompute credit: ``credit_fn`` (registry name),
          ``credit_config`` (dict of CreditConfig fields), ``step`` (for λ schedules) and
          ``padded_length`` (defaults to the padded width given) and ``padded_rows`` (rows of the
          batch the weights were computed on, padding rows included), so rescoring sees the
          shapes training saw.
        """
        if iteration in self.iterations:
            raise ValueError(f"iteration {iteration} is already in {self.path}; a resumed run must "
                             "start after the last stored iteration")
        lengths = np.asarray(lengths, np.int64)
        n = len(lengths)
        for name, value in (("task_ids", task_ids), ("group_ids", group_ids), ("rewards", rewards)):
            if len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for {n} trajectories")
        unknown = sorted(set(tokens) - set(TOKEN_FIELDS))
        missing = [f for f in REQUIRED_TOKEN_FIELDS if f not in tokens]
        if unknown or missing:
            raise ValueError(f"token fields: unknown {unknown}, missing {missing}; "
                             f"known fields are {sorted(TOKEN_FIELDS)}")
        padded_width = max((np.shape(v)[1] for v in tokens.values()
                            if not isinstance(v, (list, tuple))), default=int(lengths.max(initial=0)))
        flat = {name: self._flatten(name, tokens[name], lengths) for name in tokens}
        token_start, row_start = self.manifest["num_tokens"], self.manifest["num_trajectories"]
        total = int(lengths.sum())
        for name, dtype in TOKEN_FIELDS.items():
            values = flat.get(name)
            if values is None:  # absent field: keep columns aligned
                values = np.full(total, np.nan if dtype.startswith("float") else 0, dtype)
            self._tokens[name] = _append(self._tokens[name], token_start, values.astype(dtype))
        rows: dict[str, np.ndarray] = {
            "iteration": np.full(n, iteration),
            "reward": np.asarray(rewards, np.float32),
            "advantage": (np.full(n, np.nan) if advantages is None else np.asarray(advantages)),
            "prompt_len": np.zeros(n) if prompt_lens is None else np.asarray(prompt_lens),
            "sample_index": np.arange(n) if sample_indices is None else np.asarray(sample_indices),
            "token_offset": token_start + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            if n else np.zeros(0, np.int64),
            "num_tokens": lengths,
        }
        for field, strings in (("task_id", task_ids), ("group_id", group_ids)):
            encoded = [s.encode("utf-8") for s in strings]
            sizes = np.asarray([len(b) for b in encoded], np.int64)
            start = self.manifest["string_bytes"][field]
            rows[f"{field}_offset"] = start + np.concatenate([[0], np.cumsum(sizes)[:-1]]) if n else sizes
            rows[f"{field}_len"] = sizes
            blob = np.frombuffer(b"".join(encoded), np.uint8)
            self._strings[field] = _append(self._strings[field], start, blob)
            self.manifest["string_bytes"][field] = start + len(blob)
        for name, dtype in TRAJECTORY_FIELDS.items():
            self._rows[name] = _append(self._rows[name], row_start, np.asarray(rows[name]).astype(dtype))
        entry = {"iteration": int(iteration), "row_start": row_start, "row_stop": row_start + n,
                 "padded_length": int(padded_width), "fields": sorted(tokens)}
        entry.update(_jsonable(dict(attrs or {})))
        self.manifest["iterations"].append(entry)
        self.manifest["num_tokens"] = token_start + total
        self.manifest["num_trajectories"] = row_start + n
        self._write_manifest()

    def append_trajectories(self, iteration: int, trajectories: Sequence[Any],
                            scores: Mapping[str, np.ndarray] | None = None,
                            advantages: Sequence[float] | np.ndarray | None = None,
                            attrs: Mapping[str, Any] | None = None) -> None:
        """Append ``rollout.Trajectory`` objects plus the score pass's padded [N, T] arrays
        (student/teacher logprobs, reverse_kl, entropy, credit_weights, token_advantages), whose
        column t is token t of ``Trajectory.token_ids``."""
        tokens: dict[str, Any] = {
            "token_ids": [t.token_ids for t in trajectories],
            "loss_mask": [t.loss_mask for t in trajectories],
            "step_ids": [t.step_ids for t in trajectories],
            "sampler_logprobs": [t.sampler_logprobs for t in trajectories],
        }
        lengths = np.asarray([len(t.token_ids) for t in trajectories], np.int64)
        for name, value in (scores or {}).items():
            tokens[name] = np.asarray(value)
        self.append(iteration, task_ids=[t.task_id for t in trajectories],
                    group_ids=[t.group_id for t in trajectories], lengths=lengths, tokens=tokens,
                    rewards=[t.reward for t in trajectories], advantages=advantages,
                    prompt_lens=[t.prompt_len for t in trajectories],
                    sample_indices=[t.sample_index for t in trajectories], attrs=attrs)

    @staticmethod
    def _flatten(name: str, value: Any, lengths: np.ndarray) -> np.ndarray:
        if isinstance(value, (list, tuple)):
            if len(value) != len(lengths):
                raise ValueError(f"token field {name!r}: {len(value)} rows for {len(lengths)} trajectories")
            for i, (row, length) in enumerate(zip(value, lengths)):
                if len(row) != length:
                    raise ValueError(f"token field {name!r} row {i} has {len(row)} tokens, expected {length}")
            return np.concatenate([np.asarray(r) for r in value]) if len(value) else np.zeros(0)
        array = np.asarray(value)
        if array.ndim != 2 or array.shape[0] != len(lengths) or array.shape[1] < lengths.max(initial=0):
            raise ValueError(f"token field {name!r} has shape {array.shape}; expected [N={len(lengths)}, "
                             f"T >= {lengths.max(initial=0)}] (padded) or a list of rows")
        keep = np.arange(array.shape[1])[None, :] < lengths[:, None]  # [N, T]
        return array[keep]

    # ------------------------------------------------------------------ read
    def read_iteration(self, iteration: int, fields: Sequence[str] | None = None,
                       pad_to: int | None = None) -> IterationRows:
        """Read one iteration back; token fields as [N, pad_to or the stored padded_length]."""
        entries = [e for e in self.manifest["iterations"] if e["iteration"] == iteration]
        if not entries:
            raise KeyError(f"iteration {iteration} not in {self.path}; stored: {self.iterations}")
        entry = entries[0]
        start, stop = entry["row_start"], entry["row_stop"]
        rows = {n: np.asarray(c[start:stop].read().result()) for n, c in self._rows.items()}
        strings = {}
        for field in STRING_FIELDS:
            offsets, sizes = rows[f"{field}_offset"], rows[f"{field}_len"]
            lo = int(offsets[0]) if len(offsets) else 0
            hi = int(offsets[-1] + sizes[-1]) if len(offsets) else 0
            blob = np.asarray(self._strings[field][lo:hi].read().result()).tobytes()
            strings[field] = [blob[o - lo:o - lo + s].decode("utf-8") for o, s in zip(offsets, sizes)]
        lengths = rows["num_tokens"].astype(np.int64)
        width = pad_to if pad_to is not None else entry["padded_length"]
        if len(lengths) and width < lengths.max():
            raise ValueError(f"pad_to={width} is shorter than the longest trajectory ({lengths.max()})")
        token_lo = int(rows["token_offset"][0]) if len(lengths) else 0
        token_hi = token_lo + int(lengths.sum())
        keep = np.arange(width)[None, :] < lengths[:, None]  # [N, T]
        tokens = {}
        for name in fields or TOKEN_FIELDS:
            dtype = TOKEN_FIELDS[name]
            flat = np.asarray(self._tokens[name][token_lo:token_hi].read().result())
            padded = np.full((len(lengths), width), np.nan if dtype.startswith("float") else 0, dtype)
            padded[keep] = flat
            if name == "step_ids":
                padded[~keep] = -1
            tokens[name] = padded
        attrs = {k: v for k, v in entry.items() if k not in ("row_start", "row_stop")}
        return IterationRows(self.process_index, iteration, attrs, strings["task_id"],
                             strings["group_id"], rows, tokens)


def open_all(root: str | os.PathLike) -> list[RolloutStore]:
    """Every process's sub-store under ``root`` (``<run_dir>/rollouts``), in process order."""
    root = Path(root)
    dirs = sorted(root.glob("process_*"))
    if not dirs:
        raise FileNotFoundError(f"no rollout store under {root}: expected {root}/process_00000/")
    return [RolloutStore(root, int(d.name.split("_")[1]), create=False) for d in dirs]


def iter_segments(root: str | os.PathLike, fields: Sequence[str] | None = None):
    """Yield every stored (process, iteration) segment in order, as ``IterationRows``."""
    for store in open_all(root):
        for iteration in store.iterations:
            yield store.read_iteration(iteration, fields)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
