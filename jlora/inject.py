"""The factored path: adapters inside any Flax Linen model, without forming ΔK.

`jlora.inject(adapters)` intercepts `nn.Dense` / `nn.DenseGeneral` calls (through
`flax.linen.intercept_methods`) whose kernel path has an adapter, and replaces
their output `y` by the method's `output` (for low-rank methods `y + s · ((drop(x) @ A) @ M) @ B`,
never forming ΔK). A dense layer whose kernel is kept quantized (`jlora.quant.QuantizedKernel`)
runs on it, targeted or not, dequantizing inside the call (`jlora.quant.dense`). The model's
code is not touched, so it works for third-party Linen models too. The adapter of a module at
`module.path == ("enc", "q")` is the one keyed `"enc/q/kernel"` (or `"params/enc/q/kernel"` if
the adapters were made from a whole variables dict).

Enter the context *inside* the function you jit or differentiate: the adapters are read while
tracing, so a jitted function called inside the context would keep the adapters of its first trace.

Every adapter must land somewhere: by default (`strict=True`) leaving the context raises a
ValueError if an adapter matched no module that ran inside it (a wrong path, or a jitted function
traced before the context), naming the closest module paths that did run; `strict=False` is for
running only part of a model (an encoder without its head), and only warns when nothing matched.
An adapter whose `spec.kernel_shape` differs from the kernel of its module (adapters made for
another model) is a ValueError at that module's call.

Not covered (use the merged path, `model.apply({"params": jlora.merge(base, adapters)}, x)`):
adapters of stacked kernels (`nn.scan` layers: the interceptor cannot know the layer index),
`nn.DenseGeneral` with several input or output axes, and `nn.Einsum`.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora
  >>> model = nn.Dense(4)
  >>> params = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
  >>> base, ad = jlora.init(jlora.AdapterConfig(method="slora", rank=2), {"params": params})
  >>> with jlora.inject(ad):
  ...     y = model.apply(base, jnp.ones((1, 8)))
  >>> y.shape
  (1, 4)
"""

from __future__ import annotations

import contextlib
import difflib
import warnings
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax

from jlora import quant, targets
from jlora.adapters import Adapters
from jlora.methods import METHODS, Adapter, Layer

_SHOWN = 3  # unmatched adapters named in the strict-mode error


def last_axis_matmul(module: nn.Dense | nn.DenseGeneral) -> bool:
    """Whether the module's kernel is a (d_in, d_out) matmul over its input's last axis (every
    `nn.Dense`; an `nn.DenseGeneral` with one input axis, -1, one feature axis, no batch dims)."""
    if not isinstance(module, nn.DenseGeneral):
        return True
    axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    feats = module.features if isinstance(module.features, tuple) else (module.features,)
    return axis == (-1,) and len(feats) == 1 and not module.batch_dims


def _check_module(module: nn.Module, path: str, adapter: Adapter) -> None:
    spec = adapter.spec
    if spec.stack:
        raise ValueError(
            f"jlora.inject: the adapter of {path!r} is for a stacked kernel {spec.kernel_shape}; "
            "the factored path handles 2-D kernels only. Use the merged path: "
            "model.apply({'params': jlora.merge(base, adapters)}, ...)"
        )
    if not last_axis_matmul(module):
        raise ValueError(
            f"jlora.inject: nn.DenseGeneral at {path!r} (axis={module.axis}, "
            f"features={module.features}, batch_dims={module.batch_dims}) is not a plain "
            "matmul over the last axis; use the merged path (jlora.merge)"
        )


def _kernel_shape(module: nn.Dense | nn.DenseGeneral, x: jax.Array) -> tuple[int, int]:
    """The (d_in, d_out) kernel of a last-axis matmul module applied to `x` (what Flax creates or
    reads: `nn.Dense` and such an `nn.DenseGeneral` make their kernel `(x.shape[-1], features)`).
    """
    features = module.features
    return x.shape[-1], features if isinstance(features, int) else features[0]


def _check_shape(
    module: nn.Dense | nn.DenseGeneral, x: jax.Array, path: str, adapter: Adapter
) -> None:
    """The adapter was made for this module's kernel shape (not for another model's)."""
    kernel = _kernel_shape(module, x)
    if tuple(adapter.spec.kernel_shape) != kernel:
        raise ValueError(
            f"jlora.inject: the adapter of {path!r} is for a kernel of shape "
            f"{tuple(adapter.spec.kernel_shape)}, but the module it lands on has a kernel of "
            f"shape {kernel}: adapters made for another model (or another config of it)?"
        )


def _strict_error(adapters: Adapters, used: set[str], ran: list[str]) -> ValueError:
    """The strict-mode error: the first few unmatched adapters, each with the closest kernel
    paths of modules that ran."""
    unmatched = [p for p in adapters if p not in used]
    shown = []
    for path in unmatched[:_SHOWN]:
        close = difflib.get_close_matches(path.removeprefix("params/"), ran, n=3, cutoff=0.5)
        hint = ", ".join(map(repr, close)) if close else "none"
        shown.append(f"{path!r} (closest modules that ran: {hint})")
    more = f", and {len(unmatched) - _SHOWN} more" if len(unmatched) > _SHOWN else ""
    if used:
        what = f"{len(unmatched)} of {len(adapters)} adapters matched no module that ran"
    else:  # a wrong prefix, or a jitted function traced before the context
        what = (
            "no targeted module ran inside the context (enter it inside the jitted function, "
            f"not around a call of it); the {len(adapters)} adapters matched no module that ran"
        )
    return ValueError(
        f"jlora.inject: {what}: {'; '.join(shown)}{more}. Fix the adapter paths (module.path "
        "joined by '/' plus '/kernel'), or pass strict=False if only part of the model runs "
        "inside the context"
    )


@contextlib.contextmanager
def inject(
    adapters: Adapters, *, rng: jax.Array | None = None, strict: bool = True
) -> Iterator[None]:
    """Within this context, Linen `model.apply` runs every targeted dense layer factored.

    Args:
      adapters: `{kernel path: Adapter}` from `jlora.init`.
      rng: a PRNG key enabling adapter dropout (each target folds in its path); None = no
        dropout (evaluation).
      strict: if True (default), raise a ValueError at the exit of the context when an adapter
        matched no module that ran inside it (a wrong path, adapters of another model, or a
        jitted function traced before the context was entered); the message names the unmatched
        paths and the closest module paths that ran. False, for running only part of a model
        (an encoder without its head, ...): only warn when no targeted module ran at all.

    Raises:
      ValueError: at the call of a targeted module whose kernel shape differs from the adapter's
        `spec.kernel_shape`, or that the factored path cannot handle (stacked kernels,
        multi-axis `nn.DenseGeneral`); and at exit as described for `strict`. Nothing is raised
        at exit when the body itself raised: its exception propagates unchanged.
    """
    by_module = {m: (p, adapters[p]) for m, p in targets.module_index(adapters).items()}
    used: set[str] = set()
    ran: dict[str, None] = {}  # kernel paths of every dense module that ran, in order

    def interceptor(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense | nn.DenseGeneral):
            return next_fun(*args, **kwargs)
        ran["/".join((*module.path, "kernel"))] = None
        hit = by_module.get("/".join(module.path))
        quantized = quant.kernel.quantized_kernel_of(module)  # a frozen base kept quantized
        if hit is None:
            if quantized is not None:
                return quant.dense(module, args[0] if args else kwargs["inputs"], quantized)
            return next_fun(*args, **kwargs)
        path, adapter = hit
        _check_module(module, path, adapter)
        x = args[0] if args else kwargs["inputs"]
        _check_shape(module, x, path, adapter)
        y = next_fun(*args, **kwargs) if quantized is None else quant.dense(module, x, quantized)
        key = None if rng is None else jax.random.fold_in(rng, targets.stable_hash(path))
        used.add(path)

        def get(name: str) -> Any:  # what the method reads of the layer, dequantized
            v = module.get_variable("params", name)
            return v.dequantize() if quant.is_quantized(v) else v

        layer = Layer(get)
        return METHODS[adapter.spec.method].output(x, y, layer, adapter.params, adapter.spec, key)

    # An exception of the body propagates out of `yield`, so the checks below never mask it.
    with nn.intercept_methods(interceptor):
        yield
    if strict and len(used) < len(adapters):
        raise _strict_error(adapters, used, list(ran))
    if adapters and not used:
        warnings.warn(
            "jlora.inject: no targeted module ran inside the context. Check that adapter paths "
            f"(e.g. {next(iter(adapters))!r}) match module paths, and enter the context inside "
            "the jitted function, not around a call of it.",
            stacklevel=3,
        )
