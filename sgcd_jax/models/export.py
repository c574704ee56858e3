"""Export trained params to an HF safetensors directory that transformers' from_pretrained loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from sgcd_jax.models.decoder import Decoder
from sgcd_jax.models.hf_format import adapter_for, hf_tensor_name
from sgcd_jax.parallel.sharding import path_to_str


def _to_host(array: jax.Array) -> np.ndarray:
    if not array.is_fully_addressable:  # multi-host: gather the global array on every process
        from jax.experimental import multihost_utils
        array = multihost_utils.process_allgather(array, tiled=True)
    return np.asarray(jax.device_get(array))


def export_hf(model: Decoder, out_dir: str, tokenizer: Any = None, dtype: Any = None,
              max_shard_bytes: int = 2 << 30) -> Path:
    """Write config.json + model*.safetensors (+ index when sharded) + tokenizer files; returns the dir.

    Tensors are converted one at a time; on multi-host only process 0 writes.
    """
    cfg = model.cfg
    adapter = adapter_for(cfg.architecture, "export_hf")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _, state = nnx.split(model)
    shards: list[dict[str, np.ndarray]] = [{}]
    shard_bytes = 0
    for path, value in jax.tree_util.tree_leaves_with_path(state):
        name, transposed = hf_tensor_name(path_to_str(path), adapter)
        tensor = _to_host(value)
        tensor = np.ascontiguousarray(tensor.T if transposed else tensor)
        if dtype is not None:
            tensor = tensor.astype(dtype)
        if shard_bytes and shard_bytes + tensor.nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += tensor.nbytes
    if jax.process_index() != 0:
        return out
    hf_config = adapter.config_to_hf(cfg)
    if dtype is not None:
        hf_config["torch_dtype"] = np.dtype(dtype).name
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / file), metadata={"format": "pt"})
            weight_map.update({name: file for name in shard})
        total = sum(t.nbytes for shard in shards for t in shard.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
