"""Device mesh (data, fsdp, tp), regex partition rules for every parameter, sharded jitted forward.

Axis meaning: `data` replicates params and splits the batch; `fsdp` splits the batch *and* shards params
(gathered per layer by XLA); `tp` shards matmul inner dims (heads, MLP width, vocab). Batch arrays are
sharded over (data, fsdp). A rule's axis that does not divide the dimension is dropped (replicated) so
tiny test models and odd head counts still shard.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tp")
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Mesh axis sizes; exactly one may be -1 ("all remaining devices")."""

    data: int = 1
    fsdp: int = -1
    tp: int = 1
    # Joining a multi-host job is sgcd_jax.parallel.distributed.initialize()'s job (timeouts, SLURM/TPU discovery).

    def __post_init__(self) -> None:
        sizes = (self.data, self.fsdp, self.tp)
        if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh sizes (data, fsdp, tp)={sizes}: each must be >= 1, at most one may be -1")

    def resolved_shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tp]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"{num_devices} devices are not divisible by the fixed mesh axes {sizes}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(f"mesh (data, fsdp, tp)={tuple(sizes)} needs {math.prod(sizes)} devices, "
                             f"but {num_devices} are available; use -1 for one axis to take the rest")
        return tuple(sizes)


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tp) mesh over all (global) devices, or the given ones.

    Devices are laid out process-major, so with ``data`` = number of processes (or a multiple) each
    process owns whole rows of the data axis: params (replicated over data) are complete on every
    process and the rollout samples on local devices only (distributed.process_local_view)."""
    cfg = cfg or MeshConfig()
    if devices is None:
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    devices = list(devices)
    shape = cfg.resolved_shape(len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


# Kernels are [in, out]; embeddings [V, D]. First matching rule wins.
DEFAULT_RULES: tuple[tuple[str, P], ...] = (
    (r"^embed_tokens$", P("tp", "fsdp")),
    (r"^lm_head/kernel$", P("fsdp", "tp")),
    (r"/attn/(q|k|v)_proj/kernel$", P("fsdp", "tp")),
    (r"/attn/(q|k|v)_proj/bias$", P("tp")),
    (r"/attn/o_proj/kernel$", P("tp", "fsdp")),
    (r"/mlp/(gate|up)_proj/kernel$", P("fsdp", "tp")),
    (r"/mlp/down_proj/kernel$", P("tp", "fsdp")),
    (r"(norm|_norm)/scale$", P()),
)


def path_to_str(path: Sequence[Any]) -> str:
    """Tree path of an nnx.State leaf → 'layers/0/attn/q_proj/kernel' (the Variable's '.value' is dropped)."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey):
            if key.name == "value":
                continue
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        else:
            parts.append(str(key))
    return "/".join(parts)


def partition_spec(path: str, shape: Sequence[int], mesh: Mesh, rules: Sequence[tuple[str, P]] = DEFAULT_RULES) -> P:
    for pattern, spec in rules:
        if re.search(pattern, path):
            if len(spec) > len(shape):
                raise ValueError(f"partition rule {pattern!r} → {spec} has more axes than parameter {path} {tuple(shape)}")
            axes = []
            for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
                size = 1 if axis is None else math.prod(mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis))
                axes.append(axis if size > 1 and dim % size == 0 else None)
            return P(*axes)
    raise ValueError(f"no partition rule matches parameter {path!r}; add (regex, PartitionSpec) to the rules "
                     "passed to sgcd_jax.parallel.sharding (e.g. extra_rules=[(r'/my_param$', P())])")


def state_shardings(state: Any, mesh: Mesh, extra_rules: Sequence[tuple[str, P]] = ()) -> Any:
    """NamedSharding pytree matching `state` (an nnx.State of arrays or ShapeDtypeStructs)."""
    rules = tuple(extra_rules) + DEFAULT_RULES
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, partition_spec(path_to_str(path), leaf.shape, mesh, rules)), state)


def shard_model(model: nnx.Module, mesh: Mesh, extra_rules: Sequence[tuple[str, P]] = ()) -> nnx.Module:
    """Place every parameter of `model` per the rules (in place) and return it."""
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, state_shardings(state, mesh, extra_rules))
    nnx.update(model, state)
    return model


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def jit_sharded_forward(model: nnx.Module, mesh: Mesh, extra_rules: Sequence[tuple[str, P]] = ()
                        ) -> tuple[Callable[..., jax.Array], Any]:
    """(forward, state): forward(state, tokens, positions, token_mask) → hidden [B,T,D], jitted with explicit
    in/out shardings (params per rules, batch over (data, fsdp)). The batch size must divide data*fsdp."""
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh, extra_rules)
    state = jax.device_put(state, shardings)
    batch2 = batch_sharding(mesh, 2)

    def forward(state, tokens, positions, token_mask):
        hidden, _ = nnx.merge(graphdef, state)(tokens, positions, token_mask)
        return hidden

    jitted = jax.jit(forward, in_shardings=(shardings, batch2, batch2, batch2), out_shardings=batch_sharding(mesh, 3))
    return jitted, state


def place(array: np.ndarray, leaf: jax.ShapeDtypeStruct, sharding: NamedSharding | SingleDeviceSharding,
          source: str) -> jax.Array:
    """Host array → device array with `sharding`, checking shape against the model's parameter."""
    if tuple(array.shape) != tuple(leaf.shape):
        raise ValueError(f"{source}: shape {tuple(array.shape)} does not match the model's {tuple(leaf.shape)}")
    array = array.astype(leaf.dtype)
    return jax.make_array_from_callback(leaf.shape, sharding, lambda index: array[index])
