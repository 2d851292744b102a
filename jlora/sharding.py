"""Device meshes and parameter layouts: the base by path rules, adapters derived from their kernel.

A mesh has three axes (`MESH_AXES`): `data` (batch only), `fsdp` (batch, and large kernels
sharded along one axis, gathered per layer in the step) and `tensor` (Megatron-style: attention
heads and the MLP hidden axis split, one all-reduce per block). The batch is sharded over
(`data`, `fsdp`).

- The frozen base takes its layout from `Rule`s: a regex over the '/'-joined parameter path
  (`re.fullmatch`) and the mesh axes of the parameter's last axes. Each model family provides its
  rules (`jlora.models.<family>.SHARDING`); the first matching rule wins, an unmatched parameter
  is replicated, and a mesh axis that does not divide its array axis is dropped for that
  parameter (replicated along it, as a small kernel should be).
- Adapters derive their layout from their kernel's, for every method alike, through the axis
  roles each method declares (`jlora.methods.Leaf.axes`): an `IN` axis takes the sharding of
  the kernel's input axis, an `OUT` axis that of its output axis, stacked axes those of the
  kernel's stacked axes; the rank axis and sizes that follow no kernel axis (middle matrices,
  NOLA's and VeRA's coefficients and vectors) are replicated.

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> from jlora import sharding
  >>> rules = (sharding.Rule(r"(.*/)?up/kernel", ("fsdp", "tensor")),)
  >>> params = {"up": {"kernel": jnp.ones((8, 16))}, "norm": {"scale": jnp.ones(8)}}
  >>> sharding.param_specs(params, rules, {"data": 1, "fsdp": 2, "tensor": 4})["up"]["kernel"]
  P('fsdp', 'tensor')
  >>> _, ad = jlora.init(jlora.AdapterConfig(rank=2, targets=r"up/kernel"), params, 0)
  >>> kernels = {"up/kernel": sharding.P("fsdp", "tensor")}
  >>> specs = sharding.adapter_specs(ad, kernels, {"data": 1, "fsdp": 2, "tensor": 4})
  >>> specs["up/kernel"].params["A"], specs["up/kernel"].params["B"]
  (P('fsdp', None), P(None, 'tensor'))
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jlora import quant
from jlora.methods import IN, METHODS, OUT, Adapter

__all__ = [
    "BATCH",
    "MESH_AXES",
    "MeshShape",
    "P",
    "Rule",
    "adapter_specs",
    "kernel_specs",
    "make_mesh",
    "named",
    "param_specs",
    "placer",
    "quantized_specs",
    "spec_of",
]

MESH_AXES = ("data", "fsdp", "tensor")
# The batch axis of every input: split over data and fsdp.
BATCH = ("data", "fsdp")

Axis = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshShape:
    """Sizes of the mesh axes; their product is the device count, one of them may be -1 for
    "the devices the others leave"."""

    # Pure data parallelism: each group holds the whole (non-fsdp) model.
    data: int = -1
    # Data parallelism with large kernels sharded over it (gathered per layer in the step).
    fsdp: int = 1
    # Tensor parallelism: heads and the MLP hidden axis split (Megatron-style).
    tensor: int = 1

    def resolve(self, devices: int) -> dict[str, int]:
        """`{axis: size}` with -1 filled in; ValueError naming the field when it cannot fit."""
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        for a, n in sizes.items():
            if not (isinstance(n, int) and not isinstance(n, bool) and (n >= 1 or n == -1)):
                raise ValueError(f"mesh.{a}={n!r} is invalid: expected an integer >= 1 or -1")
        free = [a for a, n in sizes.items() if n == -1]
        if len(free) > 1:
            raise ValueError(f"mesh: {free} are all -1; at most one axis may be -1")
        known = math.prod(n for n in sizes.values() if n != -1)
        if free:
            if devices % known:
                raise ValueError(
                    f"mesh: the other axes ({known} devices) do not divide the {devices} devices, "
                    f"so mesh.{free[0]}=-1 has no size"
                )
            sizes[free[0]] = devices // known
        if math.prod(sizes.values()) != devices:
            raise ValueError(
                f"mesh: data × fsdp × tensor = {' × '.join(map(str, sizes.values()))} = "
                f"{math.prod(sizes.values())} is invalid: expected the device count {devices}"
            )
        return sizes


def make_mesh(shape: MeshShape, devices: Sequence[Any] | None = None) -> Mesh:
    """A `jax.sharding.Mesh` with axes `MESH_AXES` over `devices` (default: all).

    Example:
      >>> dict(make_mesh(MeshShape(), jax.devices()[:1]).shape)
      {'data': 1, 'fsdp': 1, 'tensor': 1}
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = shape.resolve(len(devices))
    grid = np.asarray(devices, dtype=object).reshape(tuple(sizes.values()))
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


@dataclasses.dataclass(frozen=True)
class Rule:
    """The layout of the parameters whose '/'-joined path fully matches `pattern`."""

    # Regex over the parameter path, e.g. r".*/self_attn/(q|k|v)_proj/kernel".
    pattern: str
    # Mesh axes of the parameter's LAST axes (leading, e.g. stacked-layer, axes are not split):
    # for a Linen kernel (d_in, d_out), ("fsdp", "tensor") splits d_in over fsdp and d_out over
    # tensor. None leaves an axis whole.
    axes: tuple[Axis, ...]


def _size(axis: Axis, mesh_sizes: Mapping[str, int]) -> int:
    names = () if axis is None else (axis,) if isinstance(axis, str) else axis
    return math.prod(mesh_sizes[n] for n in names)


def _fit(shape: tuple[int, ...], axes: Sequence[Axis], mesh_sizes: Mapping[str, int]) -> P:
    """`axes` (for the last axes of `shape`) as a full PartitionSpec, dropping any mesh axis that
    does not divide its array axis."""
    last = tuple(axes)[-len(shape) :] if shape else ()
    full = (None,) * (len(shape) - len(last)) + last
    return P(
        *(a if n % _size(a, mesh_sizes) == 0 else None for a, n in zip(full, shape, strict=True))
    )


def _sizes(mesh: Mesh | Mapping[str, int]) -> Mapping[str, int]:
    return dict(mesh.shape) if isinstance(mesh, Mesh) else mesh


def spec_of(
    path: str, shape: tuple[int, ...], rules: Sequence[Rule], mesh: Mesh | Mapping[str, int]
) -> P:
    """The `PartitionSpec` of one parameter: the first rule whose pattern fully matches its
    '/'-joined `path`, else replicated (see the module docstring)."""
    axes = next((r.axes for r in rules if re.fullmatch(r.pattern, path)), ())
    return _fit(tuple(shape), axes, _sizes(mesh))


def quantized_specs(q: Any, kernel_spec: P, mesh: Mesh | Mapping[str, int]) -> Any:
    """`q` (a `jlora.quant.QuantizedKernel`) with a `PartitionSpec` in place of each array of its
    storage, derived from the kernel's spec through the format's axis roles
    (`jlora.quant.data_roles`): the codes and scales shard along the output axis with the
    kernel, along the input axis by whole blocks, each where its mesh axes divide it."""
    k_in, k_out = tuple(kernel_spec) if len(kernel_spec) == 2 else (None, None)
    axes = {IN: k_in, OUT: k_out, None: None}
    specs = {
        name: _fit(np.shape(getattr(q.data, name)), [axes[r] for r in roles], _sizes(mesh))
        for name, roles in quant.data_roles(q).items()
    }
    return dataclasses.replace(q, data=dataclasses.replace(q.data, **specs))


def param_specs(params: Any, rules: Sequence[Rule], mesh: Mesh | Mapping[str, int]) -> Any:
    """A pytree like `params` of `PartitionSpec`s: the first rule whose pattern fully matches
    the leaf's '/'-joined path, else replicated (see the module docstring). A quantized kernel
    gets its kernel's spec turned into its storage's (`quantized_specs`)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    out = {
        path: quantized_specs(leaf, spec_of(path, leaf.shape, rules, mesh), mesh)
        if quant.is_quantized(leaf)
        else spec_of(path, np.shape(leaf), rules, mesh)
        for path, leaf in flat.items()
    }
    return traverse_util.unflatten_dict(out, sep="/")


def kernel_specs(
    params: Any, paths: Sequence[str], rules: Sequence[Rule], mesh: Mesh | Mapping[str, int]
) -> dict[str, P]:
    """`{path: the kernel's PartitionSpec}` for `paths` of `params` (kept quantized or not)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    return {p: spec_of(p, tuple(flat[p].shape), rules, mesh) for p in paths if p in flat}


def placer(mesh: Mesh, rules: Sequence[Rule]) -> Callable[..., jax.Array]:
    """`place(path, x, dtype=None)`: the host array `x` (cast to `dtype`) as a `jax.Array` laid
    out on `mesh` by `rules`, each device receiving only its own slice
    (`jax.make_array_from_callback`), so a model read one tensor at a time is never whole on any
    device (`jlora.models.load(..., mesh=)`). `x` may be a `jlora.models.lazy.Lazy`: then only
    the slices of this process's devices are read, each distinct slice once; or a
    `jlora.quant.QuantizedKernel`: its arrays are laid out with the kernel's spec.

    Example:
      >>> mesh = make_mesh(MeshShape(), jax.devices()[:1])
      >>> placer(mesh, (Rule("w", ("fsdp", None)),))("w", np.ones((4, 2))).sharding.spec
      P('fsdp', None)
    """

    def put(x: Any, where: NamedSharding) -> jax.Array:
        if isinstance(x, jax.Array):  # e.g. just quantized on the mesh
            return jax.device_put(x, where)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, where, lambda index: host[index])

    def place(path: str, x: Any, dtype: Any = None) -> Any:
        shape = tuple(x.shape)
        spec = spec_of(path, shape, rules, mesh)
        if quant.is_quantized(x):  # its storage laid out with the kernel (`quantized_specs`)
            return jax.tree.map(put, x, named(mesh, quantized_specs(x, spec, mesh)))
        if not hasattr(x, "slicer"):  # an array: already in memory
            host = np.asarray(x) if dtype is None else np.asarray(x).astype(dtype)
            return jax.make_array_from_callback(
                shape, NamedSharding(mesh, spec), lambda index: host[index]
            )
        read: dict[tuple, np.ndarray] = {}  # replicas of a slice are read once

        def piece(index: tuple) -> np.ndarray:
            k = tuple((s.start, s.stop, s.step) for s in index)
            if k not in read:
                read[k] = x[index] if dtype is None else x[index].astype(dtype)
            return read[k]

        return jax.make_array_from_callback(shape, NamedSharding(mesh, spec), piece)

    return place


def adapter_specs(
    adapters: Mapping[str, Adapter],
    kernel_specs: Mapping[str, P],
    mesh: Mesh | Mapping[str, int],
) -> dict[str, Adapter]:
    """The adapters with a `PartitionSpec` in place of each leaf, derived from the kernel's
    spec (`kernel_specs[path]`, a missing path: replicated) through the method's axis roles."""
    sizes = _sizes(mesh)
    out = {}
    for path, adapter in adapters.items():
        spec = adapter.spec
        ndim = len(spec.kernel_shape)
        kernel = tuple(kernel_specs.get(path, P()))
        kernel = (None,) * (ndim - len(kernel)) + kernel[-ndim:] if ndim else ()
        # A flattened input (output) axis follows the kernel's first input (output) axis.
        view = spec.matrix_layout
        stack = tuple(kernel[a] for a in view.stack)
        k_in, k_out = kernel[view.inputs[0]], kernel[view.outputs[0]]
        leaves = METHODS[spec.method].leaves(spec)
        specs = {}
        for name, x in adapter.params.items():
            roles = leaves[name].axes if name in leaves else ()
            role_axes = [k_in if r == IN else k_out if r == OUT else None for r in roles]
            specs[name] = _fit(tuple(np.shape(x)), (*stack, *role_axes), sizes)
        out[path] = adapter.replace(params=specs)
    return out


def named(mesh: Mesh, specs: Any) -> Any:
    """`NamedSharding(mesh, spec)` for every `PartitionSpec` leaf of `specs`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
