"""The factored path for Linen: adapters inside any Flax Linen model, without forming ΔK.

`jlora.inject(adapters)` intercepts the calls of `nn.Dense`, `nn.DenseGeneral` and `nn.Einsum`
(through `flax.linen.intercept_methods`) whose kernel path has an adapter, and replaces their
output `y` by the method's `output` (for low-rank methods `y + s · ((drop(x) @ A) @ M) @ B`, never
forming ΔK). A multi-axis `DenseGeneral` or `Einsum` is adapted as the matrix that flattens its
contracted and its free kernel axes (`jlora.layout`): `x` and `y` are rearranged into rows of
that matrix around the low-rank product. A dense layer whose kernel is kept quantized
(`jlora.quant.QuantizedKernel`) runs on it, targeted or not, dequantizing inside the call
(`jlora.linen.quant.dense`). The model's code is not touched, so it works for third-party Linen
models too. The adapter of a module at `module.path == ("enc", "q")` is the one keyed
`"enc/q/kernel"` (or `"params/enc/q/kernel"` if the adapters were made from a whole variables
dict).

Scanned layers (`nn.scan`): a layer inside the scan sees one slice of its stacked kernel, and the
interceptor cannot know which. The scan itself slices the adapter when its leaves travel in the
layer's parameters: `model.apply(jlora.linen.attach(variables, adapters), x)` inside the context
(`jlora.linen.apply` does both). Attached leaves are named `jlora_<leaf>` next to the kernel.

Enter the context *inside* the function you jit or differentiate: the adapters are read while
tracing, so a jitted function called inside the context would keep the adapters of its first trace.

Every adapter must land somewhere: by default (`strict=True`) leaving the context raises a
ValueError if an adapter matched no module that ran inside it (a wrong path, or a jitted function
traced before the context), naming the closest module paths that did run; `strict=False` is for
running only part of a model (an encoder without its head), and only warns when nothing matched.
A targeted module the factored path cannot run raises a ValueError naming it, never silently
skipped: an adapter whose kernel shape differs from its module's (adapters made for another
model), a module type other than the three above (e.g. a custom `nn.Module` reading its
`kernel` directly; use the merged path, `model.apply({"params": jlora.merge(base, adapters)}, x)`).
An einsum whose kernel shares a label with both input and output (MoE experts) has one adapter
per index of that axis (`jlora.factored`).

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

from jlora import factored, quant, targets
from jlora.adapters import Adapters
from jlora.layout import Contraction
from jlora.linen import quant as linen_quant

_SHOWN = 3  # unmatched adapters named in the strict-mode error


LAYERS = (nn.Dense, nn.DenseGeneral, nn.Einsum)


def last_axis_matmul(module: nn.Module) -> bool:
    """Whether the module's kernel is a (d_in, d_out) matmul over its input's last axis (every
    `nn.Dense`; an `nn.DenseGeneral` with one input axis, -1, one feature axis, no batch dims)."""
    if isinstance(module, nn.Einsum):
        return False
    if not isinstance(module, nn.DenseGeneral):
        return True
    axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    feats = module.features if isinstance(module.features, tuple) else (module.features,)
    return axis == (-1,) and len(feats) == 1 and not module.batch_dims


def contraction(module: nn.Module, x: jax.Array, kwargs: Any = None) -> Contraction | None:
    """How a Dense / DenseGeneral / Einsum module contracts its input `x` with its kernel
    (None: a plain matmul over the last axis)."""
    what = "/".join(module.path)
    if last_axis_matmul(module):
        return None
    if isinstance(module, nn.Einsum):
        eq = (kwargs or {}).get("einsum_str") or module.einsum_str
        return Contraction.parse(eq, x.ndim, what)
    axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    feats = module.features if isinstance(module.features, tuple) else (module.features,)
    batch = module.batch_dims if isinstance(module.batch_dims, tuple) else (module.batch_dims,)
    return Contraction.dense(x.ndim, axis, len(feats), what, batch=batch)


def _check_module(module: nn.Module, path: str) -> None:
    if not isinstance(module, LAYERS):
        raise ValueError(
            f"jlora.inject: the targeted kernel {path!r} belongs to a {type(module).__name__}, "
            "which the factored path cannot run (it handles nn.Dense, nn.DenseGeneral and "
            "nn.Einsum); use the merged path: model.apply({'params': jlora.merge(base, "
            "adapters)}, ...)"
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
        `spec.kernel_shape` (or one slice of it, in a scan), that the factored path cannot run
        (see the module docstring), or that runs a slice of a stacked kernel without the
        adapter attached to its parameters (`attach`); and at exit as described for `strict`.
        Nothing is raised at exit when the body itself raised: its exception propagates
        unchanged.
    """
    by_module = {m: (p, adapters[p]) for m, p in targets.module_index(adapters).items()}
    used: set[str] = set()
    ran: dict[str, None] = {}  # kernel paths of every dense module that ran, in order

    def interceptor(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        hit = by_module.get("/".join(module.path))
        if not isinstance(module, LAYERS):
            if hit is not None and module.has_variable("params", "kernel"):
                _check_module(module, hit[0])
            return next_fun(*args, **kwargs)
        ran["/".join((*module.path, "kernel"))] = None
        quantized = linen_quant.quantized_kernel_of(module)  # a frozen base kept quantized
        if hit is None:
            if quantized is not None:
                return linen_quant.dense(module, args[0] if args else kwargs["inputs"], quantized)
            return next_fun(*args, **kwargs)
        path, adapter = hit
        x = args[0] if args else kwargs["inputs"]
        view = contraction(module, x, kwargs)
        if view is not None and (reason := view.unsupported()) is not None:
            raise ValueError(
                f"jlora.inject: {type(module).__name__} at {path!r}: {reason}; the factored "
                "path cannot run it. Use the merged path (jlora.merge)"
            )
        y = (
            next_fun(*args, **kwargs)
            if quantized is None
            else linen_quant.dense(module, x, quantized)
        )
        key = None if rng is None else jax.random.fold_in(rng, targets.stable_hash(path))
        used.add(path)

        def get(name: str) -> Any:  # what the method reads of the layer, dequantized
            if not module.has_variable("params", name):
                return None
            v = nn.meta.unbox(module.get_variable("params", name))
            return v.dequantize() if quant.is_quantized(v) else v

        def attached() -> dict[str, Any]:  # adapter leaves the scan sliced for this layer
            own = module.variables.get("params", {})
            return {n: v for n, v in own.items() if n.startswith(factored.PREFIX)}

        inner = tuple(nn.meta.unbox(module.get_variable("params", "kernel")).shape)
        try:
            leaves, spec = factored.layer_params(adapter, attached, get, inner, path)
        except ValueError as e:
            raise ValueError(f"jlora.inject: {e}") from None
        key = factored.layer_key(key, spec)
        return factored.adapted(x, y, view, get, adapter, key, path, leaves=leaves, spec=spec)

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
