"""`init`, `merge`, `unmerge` and `delta` over parameter pytrees.

Adapters are a dict `{kernel path: Adapter}`, separate from the frozen base parameters. Inits and
merges run under `jax.jit` in fp32 and are cast back to the kernel's dtype. A kernel laid out on
a device mesh gets its adapter's leaves (and a rewritten kernel) straight in their layouts
(`jlora.sharding.adapter_specs`; the kernel's own), so an init never gathers a whole kernel's
result on one device.

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> params = {"dense": {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)}}
  >>> cfg = jlora.AdapterConfig(method="lora", rank=4, targets=".*")
  >>> base, adapters = jlora.init(cfg, params, jax.random.key(0))
  >>> merged = jlora.merge(base, adapters)  # ΔK = 0 at init for LoRA
  >>> bool(jnp.all(merged["dense"]["kernel"] == params["dense"]["kernel"]))
  True
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jlora import quant, targets
from jlora.config import AdapterConfig
from jlora.layout import KernelLayout
from jlora.methods import METHODS, Adapter, AdapterSpec

log = logging.getLogger("jlora")

Adapters = dict[str, Adapter]


def _as_key(key: jax.Array | int | None, seed: int) -> jax.Array:
    if key is None:
        return jax.random.key(seed)
    if isinstance(key, int):
        return jax.random.key(key)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(key)
    return key


def delta_of(adapter: Adapter) -> jax.Array:
    """ΔK of one adapter in fp32, shaped like its kernel, as its method defines it (traceable)."""
    spec = adapter.spec
    return spec.matrix_layout.kernel(
        METHODS[spec.method].delta(adapter.params, spec), spec.kernel_shape
    )


# Per-target static seeds (NOLA) would make every target a new compilation of the jitted helpers
# below; they travel as a traced argument instead, so targets of one shape share one compilation.
def split_seed(spec: AdapterSpec) -> tuple[AdapterSpec, jax.Array | None]:
    """The spec without its seed (static), and the seed as a traced int32 (or None)."""
    if spec.seed is None:
        return spec, None
    return dataclasses.replace(spec, seed=None), jnp.int32(spec.seed)


def with_seed(spec: AdapterSpec, seed: jax.Array | None) -> AdapterSpec:
    """Inverse of `split_seed` (inside a jitted function: the spec with the traced seed)."""
    return spec if seed is None else dataclasses.replace(spec, seed=seed)


@functools.partial(jax.jit, static_argnames=("spec", "layouts"))
def _init_jit(
    K: jax.Array,
    key: jax.Array,
    grad: jax.Array | None,
    seed: jax.Array | None,
    *,
    spec: AdapterSpec,
    layouts: tuple | None = None,
) -> tuple[dict[str, jax.Array], jax.Array | None]:
    view = spec.matrix_layout  # the method sees `(*stack, d_in, d_out)` matrices
    K32 = view.matrix(K.astype(jnp.float32))
    grad = None if grad is None else view.matrix(grad)
    traced_spec = with_seed(spec, seed)
    method = METHODS[spec.method]
    params = method.init(K32, key, traced_spec, grad)
    new_kernel = None
    if method.residual(spec.options):
        new_kernel = view.kernel(method.unmerge(K32, params, traced_spec), K.shape).astype(K.dtype)
    if layouts is not None:  # the outputs in their final layouts, never whole on one device
        leaves, kernel = dict(layouts[0]), layouts[1]
        params = {n: jax.lax.with_sharding_constraint(x, leaves[n]) for n, x in params.items()}
        if new_kernel is not None:
            new_kernel = jax.lax.with_sharding_constraint(new_kernel, kernel)
    return params, new_kernel


def _layouts(K: Any, spec: AdapterSpec) -> tuple | None:
    """`(((leaf, NamedSharding), ...), kernel's NamedSharding)`: where a kernel laid out on a
    mesh puts its adapter's leaves (`jlora.sharding.adapter_specs`) and its rewritten kernel
    (its own layout); None for a kernel on one device."""
    s = getattr(K, "sharding", None)
    if not isinstance(s, NamedSharding) or s.mesh.size == 1:
        return None
    from jlora import sharding

    leaves = METHODS[spec.method].leaves(spec)
    shapes = {n: jax.ShapeDtypeStruct(leaf.shape(spec), jnp.float32) for n, leaf in leaves.items()}
    specs = sharding.adapter_specs({"k": Adapter(params=shapes, spec=spec)}, {"k": s.spec}, s.mesh)
    named = tuple(sorted((n, NamedSharding(s.mesh, p)) for n, p in specs["k"].params.items()))
    return named, s


def _init_target(
    K: jax.Array, key: jax.Array, grad: jax.Array | None, spec: AdapterSpec
) -> tuple[Adapter, jax.Array | None]:
    static_spec, seed = split_seed(spec)
    layouts = _layouts(K, static_spec)
    params, new_kernel = _init_jit(K, key, grad, seed, spec=static_spec, layouts=layouts)
    _check_leaves(spec, params)
    return Adapter(params=params, spec=spec), new_kernel


def _check_leaves(spec: AdapterSpec, params: dict[str, jax.Array]) -> None:
    """A method's `init` returns exactly the leaves its `leaves(spec)` declares, of those shapes."""
    want = {n: leaf.shape(spec) for n, leaf in METHODS[spec.method].leaves(spec).items()}
    got = {n: tuple(x.shape) for n, x in params.items()}
    if got != want:
        raise ValueError(
            f"method {spec.method!r}: init returned leaves {got}, its leaves() declares {want}"
        )


def _seeded(fn: Any) -> Any:
    """`fn(*arrays, adapter)` jitted once per shape and spec, whatever the adapter's seed."""

    @jax.jit
    def traced(args: tuple, adapter: Adapter, seed: jax.Array | None) -> jax.Array:
        return fn(*args, adapter.replace(spec=with_seed(adapter.spec, seed)))

    def call(*args: Any) -> jax.Array:
        *arrays, adapter = args
        spec, seed = split_seed(adapter.spec)
        return traced(tuple(arrays), adapter.replace(spec=spec), seed)

    return call


def _grads_for(grads: Any, tgts: list[targets.Target]) -> dict[str, jax.Array]:
    flat = dict(grads) if isinstance(grads, Mapping) and all("/" in k for k in grads) else None
    if flat is None:
        flat = targets.flatten(grads)
    missing = [t.path for t in tgts if t.path not in flat]
    if missing:
        raise ValueError(f"grads has no gradient for targets {missing[:5]}")
    for t in tgts:
        if tuple(flat[t.path].shape) != t.shape:
            raise ValueError(
                f"grads[{t.path!r}] has shape {tuple(flat[t.path].shape)}, its kernel {t.shape}"
            )
    return {t.path: flat[t.path] for t in tgts}


def _spec(config: AdapterConfig, t: targets.Target) -> AdapterSpec:
    """The generic spec of a target, before the method's `plan`."""
    return AdapterSpec(
        method=config.method,
        rank=t.rank,
        alpha=t.alpha,
        scale=config.scale(t.rank, t.alpha),
        kernel_shape=t.shape,
        kernel_dtype=t.dtype.name,
        options=config.options,
        dropout=float(config.dropout),
        layout=None if t.layout.is_plain else t.layout,
    )


class _Matrices(Mapping):
    """The target kernels a method's `plan` reads (GoRA's importance |K ⊙ G|) as the matrices
    of their layouts, each quantized one dequantized when it is read: one at a time, never all
    in full precision at once."""

    def __init__(self, flat: Mapping[str, Any], views: dict[str, KernelLayout]) -> None:
        self._flat, self._paths = flat, views

    def __getitem__(self, path: str) -> Any:
        if path not in self._paths:
            raise KeyError(path)
        k = self._flat[path]
        if quant.is_quantized(k):
            k = k.dequantize()
        return k if isinstance(k, jax.ShapeDtypeStruct) else self._paths[path].matrix(k)

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


def _planned(
    config: AdapterConfig,
    tgts: list[targets.Target],
    flat: dict[str, Any],
    gflat: dict[str, jax.Array] | None,
    key: jax.Array,
) -> tuple[dict[str, jax.Array], dict[str, AdapterSpec]]:
    """Each target's PRNG key and final spec (the method's whole-model `plan`)."""
    keys = {t.path: jax.random.fold_in(key, targets.stable_hash(t.path)) for t in tgts}
    views = {t.path: t.layout for t in tgts}
    specs = METHODS[config.method].plan(
        {t.path: _spec(config, t) for t in tgts},
        _Matrices(flat, views),
        None if gflat is None else {p: views[p].matrix(g) for p, g in gflat.items()},
        keys,
    )
    return keys, specs


def init(
    config: AdapterConfig,
    params: Any,
    key: jax.Array | int | None = None,
    *,
    grads: Any = None,
    layouts: Mapping[str, KernelLayout] | None = None,
) -> tuple[Any, Adapters]:
    """Selects the targets of `config` in `params` and initialises their adapters.

    Args:
      config: the method, rank, scale and target rules.
      params: a parameter pytree (e.g. a Linen `params` collection).
      key: a PRNG key (typed or raw) or an int seed; None uses `config.seed`.
      grads: methods with `needs_grads` (`gora`, `loraga`) only: the pre-pass gradients from
        `jlora.gradient_stats`, as `{path: G}` or a pytree shaped like `params`.
      layouts: `{kernel path: jlora.KernelLayout}` for kernels that are not plain 2-D
        matrices: stacked layers, multi-axis `DenseGeneral` / `Einsum` kernels (from the
        modules: `jlora.linen.layouts(model, x)`, `jlora.nnx.layouts(model)`). A targeted
        kernel with more than two axes and no layout is a ValueError.

    Returns:
      `(base_params, adapters)`: the frozen parameters (a new pytree where `pissa` and the
      residual `nlora`/`inttune` variants rewrote targeted kernels to `K − ΔK_init`; otherwise
      `params` itself) and `{kernel path: Adapter}`.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"q": {"kernel": jnp.eye(8)}}
      >>> base, ad = jlora.init(jlora.AdapterConfig(method="nlora", rank=2), params)
      >>> ad["q/kernel"].params["M"].shape
      (2, 2)
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be a jlora.AdapterConfig, got {type(config).__name__}")
    tgts = targets.select(params, config.targets, config.rank, config.alpha, layouts)
    key = _as_key(key, config.seed)
    flat = targets.flatten(params)
    method = METHODS[config.method]
    gflat: dict[str, jax.Array] | None = None
    if method.needs_grads:
        if grads is None:
            raise ValueError(
                f"method {config.method!r} needs gradients: jlora.init(config, params, key, "
                "grads=jlora.gradient_stats(loss_fn, params, batches, config))"
            )
        gflat = _grads_for(grads, tgts)
    elif grads is not None:
        needing = [n for n, m in METHODS.items() if m.needs_grads]
        raise ValueError(f"grads is only used by methods {needing}, not {config.method!r}")

    start = time.perf_counter()
    keys, specs = _planned(config, tgts, flat, gflat, key)
    adapters: Adapters = {}
    new_kernels: dict[str, Any] = {}
    for t in tgts:
        spec = specs[t.path]
        grad = None if gflat is None else gflat[t.path]
        kernel = flat[t.path]
        # A kernel kept quantized: the init reads its dequantized values, and a kernel the
        # method rewrites (a residual) is stored quantized the same way.
        stored = kernel if quant.is_quantized(kernel) else None
        if stored is not None:
            kernel = stored.dequantize()
        adapter, new_kernel = _init_target(kernel, keys[t.path], grad, spec)
        adapters[t.path] = adapter
        if new_kernel is not None:
            new_kernels[t.path] = (
                new_kernel if stored is None else quant.quantize_like(stored, new_kernel)
            )
        log.debug("jlora.init: %s %s rank %d", config.method, t.path, spec.rank)
    base = targets.replace(params, new_kernels) if new_kernels else params
    n_train = sum(trainable_leaf_sizes(adapters).values())
    log.info(
        "jlora.init: %s on %d targets, %d trainable parameters (%.2fs)",
        config.method,
        len(adapters),
        n_train,
        time.perf_counter() - start,
    )
    return base, adapters


def abstract_init(
    config: AdapterConfig,
    params: Any,
    key: jax.Array | int | None = None,
    *,
    layouts: Mapping[str, KernelLayout] | None = None,
) -> Adapters:
    """The adapters `init(config, params, key)` would make, with `jax.ShapeDtypeStruct` leaves.

    Nothing is computed or allocated: `params` may itself hold `jax.ShapeDtypeStruct`s (an
    8B model's shapes), so a run can be sized before any weight is read (`train.py plan`).
    The specs are the ones `init` would give, except for methods with `needs_grads` whose plan
    reads the gradients (GoRA): without a pre-pass every target counts as equally important,
    the allocation that spends the budget (uniform LoRA's parameter count at `config.rank`).
    The frozen base keeps its shapes under every method.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"q": {"kernel": jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)}}
      >>> ad = jlora.abstract_init(jlora.AdapterConfig(method="slora", rank=16), params)
      >>> {k: v.shape for k, v in ad["q/kernel"].params.items()}
      {'A': (4096, 16), 'M': (16, 16), 'B': (16, 4096)}
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be a jlora.AdapterConfig, got {type(config).__name__}")
    tgts = targets.select(params, config.targets, config.rank, config.alpha, layouts)
    key = _as_key(key, config.seed)
    flat = targets.flatten(params)
    method = METHODS[config.method]
    _, specs = _planned(config, tgts, flat, None, key)
    out: Adapters = {}
    for t in tgts:
        spec = specs[t.path]
        leaves = method.leaves(spec)
        out[t.path] = Adapter(
            params={n: jax.ShapeDtypeStruct(x.shape(spec), jnp.float32) for n, x in leaves.items()},
            spec=spec,
        )
    return out


def trainable_leaf_sizes(adapters: Adapters) -> dict[str, int]:
    """Number of trainable numbers per target path."""
    return {
        p: sum(int(np.prod(a.params[n].shape)) for n in a.spec.trainable)
        for p, a in adapters.items()
    }


def delta(adapters: Adapters) -> dict[str, jax.Array]:
    """`{path: ΔK}` in fp32, shaped like each targeted kernel."""
    return {p: _delta_jit(a) for p, a in adapters.items()}


_delta_jit = _seeded(delta_of)


def _on_matrix(fn_name: str) -> Any:
    """`K -> method.<fn_name>(K)` on the kernel's matrix view, back in the kernel's shape and
    dtype (fp32 arithmetic)."""

    @_seeded
    def one(K: jax.Array, adapter: Adapter) -> jax.Array:
        spec = adapter.spec
        view = spec.matrix_layout
        fn = getattr(METHODS[spec.method], fn_name)
        out = fn(view.matrix(K.astype(jnp.float32)), adapter.params, spec)
        return view.kernel(out, K.shape).astype(K.dtype)

    return one


_merge_one = _on_matrix("merge")
_unmerge_one = _on_matrix("unmerge")


def _kernels(params: Any, adapters: Adapters, fn_name: str) -> dict[str, jax.Array]:
    flat = targets.flatten(params)
    for p, a in adapters.items():
        if p not in flat:
            near = [q for q in flat if q.endswith("kernel")][:5]
            raise KeyError(f"{fn_name}: adapter target {p!r} is not in params (kernels: {near}…)")
        if tuple(flat[p].shape) != a.spec.kernel_shape:
            raise ValueError(
                f"{fn_name}: params[{p!r}] has shape {tuple(flat[p].shape)}, the adapter was "
                f"made for {a.spec.kernel_shape}"
            )
    return flat


def _full_precision(params: Any) -> Any:
    """`params` with any quantized kernel (`jlora.quant.QuantizedKernel`) dequantized."""
    if not any(quant.is_quantized(x) for x in jax.tree.leaves(params, is_leaf=quant.is_quantized)):
        return params
    return quant.dequantize_params(params)


def _is_traced(tree: Any) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def merge(base_params: Any, adapters: Adapters, *, check: bool = True) -> Any:
    """Base parameters with every adapter folded in: `K + ΔK` (fp32 arithmetic, cast back).

    Traceable, so `model.apply(jlora.merge(base, adapters), x)` inside a jitted loss is the
    universal (merged) path. Outside tracing, with `check=True`, raises `FloatingPointError` if
    a merged kernel holds NaN or Inf. A base with quantized kernels (`jlora.quant`) merges into
    their dequantized values: the result is full precision throughout, never requantized.
    """
    base_params = _full_precision(base_params)
    flat = _kernels(base_params, adapters, "merge")
    merged = {p: _merge_one(flat[p], a) for p, a in adapters.items()}
    if check and not _is_traced((merged, adapters)):
        bad = [p for p, k in merged.items() if not bool(jnp.all(jnp.isfinite(k)))]
        if bad:
            culprits = [
                p
                for p in bad
                if not all(bool(jnp.all(jnp.isfinite(v))) for v in adapters[p].params.values())
            ]
            raise FloatingPointError(
                f"merge produced NaN/Inf in {len(bad)} kernel(s): {bad[:5]}; adapters with "
                f"non-finite leaves: {culprits[:5]}"
            )
    return targets.replace(base_params, merged)


def unmerge(params: Any, adapters: Adapters) -> Any:
    """Inverse of `merge`: `K − ΔK` for every adapted kernel (recovers `base_params`)."""
    params = _full_precision(params)
    flat = _kernels(params, adapters, "unmerge")
    return targets.replace(params, {p: _unmerge_one(flat[p], a) for p, a in adapters.items()})


def split(adapters: Adapters) -> tuple[Adapters, Adapters]:
    """`(trainable, frozen)`: the same targets and specs, each holding one part of the leaves.

    Differentiate with respect to `trainable` only, so the gradients of frozen leaves (IntTune's
    A and B, NOLA's cached bases) are never computed; `combine` puts the halves back together.

    Example:
      >>> import jax.numpy as jnp, jlora
      >>> _, ad = jlora.init(jlora.AdapterConfig(method="inttune", rank=2),
      ...                    {"q": {"kernel": jnp.eye(4)}})
      >>> t, f = jlora.split(ad)
      >>> sorted(t["q/kernel"].params), sorted(f["q/kernel"].params)
      (['M'], ['A', 'B'])
      >>> jlora.combine(t, f)["q/kernel"].params.keys() == ad["q/kernel"].params.keys()
      True
    """
    trainable, frozen = {}, {}
    for path, a in adapters.items():
        names = set(a.spec.trainable)
        trainable[path] = Adapter({n: v for n, v in a.params.items() if n in names}, a.spec)
        frozen[path] = Adapter({n: v for n, v in a.params.items() if n not in names}, a.spec)
    return trainable, frozen


def combine(trainable: Adapters, frozen: Adapters) -> Adapters:
    """Inverse of `split`."""
    return {p: Adapter({**a.params, **frozen[p].params}, a.spec) for p, a in trainable.items()}
