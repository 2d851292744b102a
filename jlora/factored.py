"""The factored path's arithmetic, shared by every framework wing (`jlora.linen`, `jlora.nnx`).

A wing finds the layer a targeted kernel belongs to and calls `adapted(...)` with the layer's
input `x`, its frozen output `y`, how the layer contracts them with its kernel (a
`jlora.layout.Contraction`, or None for a plain matmul over the last axis) and a getter for
its kernel and bias. `adapted` turns `x` and `y` into the `(..., d_in)` / `(..., d_out)` rows of
the adapter's matrix view, lets the method compute its output there (`Method.output`, which never
forms ΔK), and puts the result back in `y`'s shape.

Inside a scanned layer the layer sees one slice of a stacked kernel; the adapter's leaves are
sliced the same way by the scan itself when they travel in the layer's parameters (`attached`
leaves), and `layer_spec` is the spec of that one matrix (per-layer scale included: GoRA's ranks
differ per layer).

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> from jlora import factored
  >>> K = jnp.ones((4, 3))
  >>> _, ad = jlora.init(jlora.AdapterConfig(method="lora", rank=2), {"q": {"kernel": K}})
  >>> x = jnp.ones((2, 4))
  >>> y = factored.adapted(x, x @ K, None, {"kernel": K}.get, ad["q/kernel"], None, "q")
  >>> y.shape
  (2, 3)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.layout import Contraction, bias_rows
from jlora.methods import METHODS, Adapter, AdapterSpec, Layer

# Name prefix of adapter leaves attached to a layer's parameters (`attach_leaves`).
PREFIX = "jlora_"
# The per-matrix scale of a stacked adapter whose scale differs per matrix (GoRA).
SCALE = PREFIX + "scale"
# The flat index of each matrix in the stack, for methods that regenerate leaves (NOLA).
INDEX = PREFIX + "index"


def attached_leaves(adapter: Adapter) -> dict[str, jax.Array]:
    """What a layer's parameters carry for `adapter` so that a scan over the layers slices it:
    every leaf, the flat matrix indices `jlora_index` for a method that regenerates leaves
    (NOLA: each layer regenerates its own bases) or with adapter dropout (each layer its own
    mask: `layer_key`), and for a
    per-matrix scale (GoRA on stacked kernels) the scales as an array `jlora_scale`."""
    spec = adapter.spec
    leaves = dict(adapter.params)
    out = {PREFIX + n: x for n, x in leaves.items()}
    if spec.stack and (_regenerates(spec) or spec.dropout > 0):
        # Regenerable leaves (NOLA's bases) are regenerated inside each layer, as unrolled
        # layers do: the layer needs its matrices' flat indices in the stack. Adapter dropout
        # folds them into its key, so each layer draws its own mask.
        out[INDEX] = jnp.arange(math.prod(spec.stack), dtype=jnp.int32).reshape(spec.stack)
    if spec.stack and jnp.ndim(spec.scale_array()) > 0:
        out[SCALE] = jnp.asarray(spec.scale_array(), jnp.float32).reshape(spec.stack)
    return out


def _regenerates(spec: AdapterSpec) -> bool:
    """Whether the method regenerates leaves from the spec (NOLA's, VeRA's bases)."""
    return bool(jax.eval_shape(lambda: METHODS[spec.method].regenerate(spec)))


def _nested(a: np.ndarray) -> Any:
    """An array as nested tuples of Python scalars (hashable spec metadata)."""
    return a.item() if a.ndim == 0 else tuple(_nested(x) for x in a)


# Spec info entries that hold one value per stacked matrix (GoRA's allocated ranks).
PER_MATRIX_INFO = ("ranks",)


def unstack(adapter: Adapter) -> list[Adapter]:
    """The adapters of each slice of `adapter`'s first stacked axis (the layers of a scanned
    kernel), each equal to the slice's share of the stacked adapter: the same leaves, the
    slice's scale (GoRA), and for methods that regenerate leaves (NOLA) the slice's matrix
    indices (`info["matrix_index"]`), so it regenerates the very bases the stacked adapter uses.

    GoRA's stacked factors keep the stack's largest rank (zero-padded), so each slice does too.

    Example:
      >>> import jax.numpy as jnp, jlora
      >>> from jlora import factored
      >>> params = {"layers": {"q": {"kernel": jnp.ones((3, 4, 4))}}}
      >>> cfg = jlora.AdapterConfig(method="lora", rank=2)
      >>> _, ad = jlora.init(cfg, params, 0, layouts=jlora.stacked_layouts(params))
      >>> [a.spec.kernel_shape for a in factored.unstack(ad["layers/q/kernel"])]
      [(4, 4), (4, 4), (4, 4)]

    Raises:
      ValueError: the adapter's kernel is not stacked along its first axis.
    """
    spec = adapter.spec
    view = spec.matrix_layout
    if not spec.stack or view.stack[0] != 0:
        raise ValueError(
            f"unstack: the adapter's kernel {tuple(spec.kernel_shape)} has no leading stacked "
            f"axis (stacked axes {view.stack})"
        )
    n, rest = spec.stack[0], spec.stack[1:]
    lay = view.unstacked(1)
    scales = np.asarray(spec.scale_array(), np.float64)
    scales = scales.reshape(spec.stack) if scales.ndim > 0 else None
    regenerates = _regenerates(spec)
    info = dict(spec.info)
    out = []
    for i in range(n):
        one = dict(info)
        for k in PER_MATRIX_INFO:
            if k in one:
                one[k] = _nested(np.asarray(one[k])[i])
        if regenerates:  # flat indices of this slice's matrices in the whole stack
            m = math.prod(rest)
            own = np.arange(i * m, (i + 1) * m).reshape(rest)
            old = one.get("matrix_index")
            one["matrix_index"] = _nested(own if old is None else np.asarray(old)[i])
        one_spec = dataclasses.replace(
            spec,
            kernel_shape=tuple(spec.kernel_shape[1:]),
            layout=None if lay.is_plain else lay,
            scale=spec.scale if scales is None else _nested(scales[i]),
            info=tuple(sorted(one.items())),
        )
        leaves = {k: v[i] for k, v in adapter.params.items()}
        out.append(Adapter(params=leaves, spec=one_spec))
    return out


def layer_params(
    adapter: Adapter,
    attached: Callable[[], Mapping[str, jax.Array]],
    get: Callable[[str], Any],
    inner_shape: tuple[int, ...],
    what: str,
) -> tuple[dict[str, jax.Array], AdapterSpec]:
    """The leaves and spec of the one matrix a layer multiplies by its kernel of `inner_shape`:
    the adapter itself for an unstacked kernel; inside a scan (the kernel is one slice of the
    stacked kernel) the sliced leaves the scan gives the layer (`attached()`: the layer's
    parameters named `jlora_*`; `get(name)` reads one).

    Raises:
      ValueError: the kernel shape fits neither the adapter's kernel nor one of its slices
        (adapters made for another model), or a scanned layer without its attached leaves.
    """
    spec = adapter.spec
    if tuple(inner_shape) == tuple(spec.kernel_shape):
        return dict(adapter.params), spec
    view = spec.matrix_layout
    n = len(spec.kernel_shape) - len(inner_shape)  # axes the scan (or vmap) took off
    scanned = 0 < n <= len(view.stack) and view.stack[:n] == tuple(range(n))
    if not scanned or tuple(inner_shape) != tuple(spec.kernel_shape[n:]):
        raise ValueError(
            f"the adapter of {what!r} is for a kernel of shape {tuple(spec.kernel_shape)}"
            f"{f' (stacked axes {view.stack})' if spec.stack else ''}, but the layer it lands on "
            f"has a kernel of shape {tuple(inner_shape)}: adapters made for another model (or "
            "another config of it)?"
        )
    own = attached()
    leaves = {n.removeprefix(PREFIX): x for n, x in own.items() if n not in (SCALE, INDEX)}
    missing = [name for name in adapter.params if name not in leaves]
    if missing:
        raise ValueError(
            f"{what!r} runs one slice of its stacked kernel {tuple(spec.kernel_shape)} (a "
            "scanned layer): the scan must slice the adapter too, so its leaves must travel in "
            "the layer's parameters. Linen: model.apply(jlora.linen.attach(variables, "
            "adapters), ...) (or jlora.linen.apply); NNX: jlora.nnx.attach(model, adapters)"
        )
    scale: Any = spec.scale
    if jnp.ndim(spec.scale_array()) > 0:
        scale = get(SCALE)  # this layer's scales (an array over any remaining stacked axes)
    lay = view.unstacked(n)
    info = spec.info if INDEX not in own else (*spec.info, ("matrix_index", own[INDEX]))
    one_spec = dataclasses.replace(
        spec,
        kernel_shape=tuple(inner_shape),
        layout=None if lay.is_plain else lay,
        scale=scale,
        info=info,
    )
    return leaves, one_spec


def layer_key(key: jax.Array | None, spec: AdapterSpec) -> jax.Array | None:
    """The dropout key of one layer of a scanned kernel: `key` (the target's) with the layer's
    first matrix index folded in, so that every layer draws its own mask; `key` itself for an
    adapter that is not a slice."""
    index = spec.get("matrix_index")
    if key is None or index is None:
        return key
    return jax.random.fold_in(key, jnp.ravel(jnp.asarray(index))[0].astype(jnp.uint32))


def adapted(
    x: jax.Array,
    y: jax.Array,
    contraction: Contraction | None,
    get: Callable[[str], Any],
    adapter: Adapter,
    key: jax.Array | None,
    what: str,
    *,
    leaves: Mapping[str, jax.Array] | None = None,
    spec: AdapterSpec | None = None,
) -> jax.Array:
    """The adapted output of a layer: `y` plus the adapter's update (the method's `output`).

    Args:
      x, y: the layer's input and frozen output.
      contraction: how the layer contracts `x` with its kernel; None: `y = x @ K (+ b)` over the
        last axis of `x`.
      get: the layer's parameter by name (`"kernel"`, `"bias"`; None if absent).
      adapter: the target's adapter.
      key: dropout key (None: no dropout).
      what: the layer's name, for errors.
      leaves, spec: the leaves and spec of the one matrix the layer multiplies (from
        `layer_params`); default: the adapter's own.
    """
    leaves = dict(adapter.params) if leaves is None else dict(leaves)
    spec = adapter.spec if spec is None else spec
    method = METHODS[spec.method]
    if contraction is None:
        return method.output(x, y, Layer(get), leaves, spec, key)
    view = spec.matrix_layout
    kernel = view.matrix(get("kernel"))
    try:
        bias = bias_rows(get("bias"), contraction, y.shape)
    except ValueError as e:
        raise ValueError(f"{what!r}: {e}") from None
    xr, yr = contraction.x_rows(x), contraction.y_rows(y)
    if not spec.stack:
        layer = Layer({"kernel": kernel, "bias": bias}.get)
        return contraction.y_from_rows(method.output(xr, yr, layer, leaves, spec, key), y.shape)
    return contraction.y_from_rows(_batched(xr, yr, kernel, bias, leaves, spec, key), y.shape)


def _batched(
    x: jax.Array,
    y: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    leaves: dict[str, jax.Array],
    spec: AdapterSpec,
    key: jax.Array | None,
) -> jax.Array:
    """The method's output for a batched kernel (an einsum label in input, kernel and output:
    MoE experts): one matrix and one adapter per index of the leading `spec.stack` axes of the
    rows, the kernel's matrices and the leaves, mapped with `jax.vmap`."""
    method = METHODS[spec.method]
    stack = spec.stack
    for name, v in method.regenerate(spec).items():  # per-matrix bases (NOLA), as merge has
        leaves.setdefault(name, v)
    sc = spec.scale
    if isinstance(sc, jax.Array):  # a scanned layer's scales (GoRA), traced
        scales = jnp.broadcast_to(sc.astype(jnp.float32), stack)
    elif np.ndim(sc) > 0:  # one scale per matrix (GoRA)
        scales = jnp.asarray(np.asarray(sc, np.float32)).reshape(stack)
    else:
        scales = None
    lay = spec.matrix_layout.unstacked()
    one = dataclasses.replace(
        spec,
        kernel_shape=tuple(
            s for i, s in enumerate(spec.kernel_shape) if i not in spec.matrix_layout.stack
        ),
        layout=None if lay.is_plain else lay,
    )

    def f(xb, yb, kb, bb, lb, sb):
        s = one if sb is None else dataclasses.replace(one, scale=sb)
        return method.output(xb, yb, Layer({"kernel": kb, "bias": bb}.get), lb, s, key)

    batched_bias = bias is not None and bias.ndim > 1
    for _ in stack:
        f = jax.vmap(
            f,
            in_axes=(0, 0, 0, 0 if batched_bias else None, 0, None if scales is None else 0),
        )
    return f(x, y, kernel, bias, leaves, scales)
