"""Adapters inside an NNX model: the factored path for `nnx.Linear`, `nnx.LinearGeneral` and
`nnx.Einsum`, with the adapter leaves as variables of the layers they adapt.

Design (compared with qwix's `LoraProvider` and flax's `nnx.LoRA`, README "Design notes"):
flax's `nnx.LoRA` / `nnx.LoRALinear` are layers a model must be written with; qwix intercepts
`dot_general` / `einsum` inside every module call and creates its LoRA variables on the first
call. jlora's adapters are pytrees made by `jlora.init` (any method: Nyström middle matrices,
NOLA bases, GoRA ranks), so `attach` only places them: each targeted layer gets its leaves as
variables named `jlora_<leaf>` (trainable ones as `nnx.LoRAParam`, frozen ones as `Frozen`) and
becomes an instance of an adapted subclass of its own class (`AdaptedLinear`, ...) whose
`__call__` adds the method's output to the layer's. Paths do not change (`.../q/kernel` stays
where it was), a `nnx.vmap`-stacked layer's leaves are stacked too, so `nnx.scan` slices them with
the layer, and `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)` trains exactly the trainable leaves.
`detach` takes them out again (optionally merged into the kernels).

Adapter dropout (adapters made with `dropout > 0`) runs only inside `with
jlora.nnx.dropout(key):`, as `jlora.inject(adapters, rng=key)` does on the Linen path: each
layer folds its path (and, inside `nnx.scan`, its layer index) into the key, so every layer and
step draws its own mask; calls outside the block (evaluation) apply no dropout. A key rather
than an `nnx.Rngs` stream keeps the layers stateless, so the same code runs under `nnx.jit`,
`nnx.scan` and a pure-function loop (pass a fresh key each step, e.g. `fold_in(key, step)`).

Example:
  >>> import jax.numpy as jnp, optax, jlora
  >>> from flax import nnx
  >>> rngs = nnx.Rngs(0)
  >>> model = nnx.Sequential(nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 4, rngs=rngs))
  >>> ad = jlora.nnx.adapt(model, jlora.AdapterConfig(method="slora", rank=2), 0)
  >>> type(model.layers[0]).__name__, sorted(ad)
  ('AdaptedLinear', ['layers/0/kernel', 'layers/1/kernel'])
  >>> opt = nnx.Optimizer(model, jlora.nnx.optimizer(model, optax.adam(1e-3)), wrt=nnx.LoRAParam)
  >>> model(jnp.ones((2, 8))).shape
  (2, 4)
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import jax
import optax
from flax import nnx

from jlora import factored, optim, targets
from jlora.adapters import Adapters, _merge_one, init
from jlora.config import AdapterConfig
from jlora.methods import Adapter, AdapterSpec
from jlora.nnx.layers import contraction, layouts, modules

_SPEC, _PATH, _NAMES = "jlora_spec", "jlora_path", "jlora_names"


# The key of `dropout(key)`, read by every adapted layer's call (None: no adapter dropout).
_DROPOUT_KEY: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar(
    "jlora_nnx_dropout", default=None
)


@contextlib.contextmanager
def dropout(key: jax.Array | int | None) -> Iterator[None]:
    """Adapter dropout for the adapted layers called inside the block (see the module
    docstring); `key` may be traced (the jitted step's `fold_in(key, step)`), None turns it off.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> from flax import nnx
      >>> model = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
      >>> _ = jlora.nnx.adapt(model, jlora.AdapterConfig(rank=2, dropout=0.5), 0)
      >>> x = jnp.ones((2, 8))
      >>> with jlora.nnx.dropout(jax.random.key(1)):
      ...     y = model(x)
      >>> y.shape
      (2, 8)
    """
    if key is not None and not isinstance(key, jax.Array):
        key = jax.random.key(key)
    token = _DROPOUT_KEY.set(key)
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)


class Frozen(nnx.Variable):
    """A frozen adapter leaf (IntTune's A and B, NOLA's cached bases, GoRA's per-layer scales)."""


def _call(self: nnx.Module, base_call: Any, inputs: jax.Array, args: Any, kwargs: Any) -> Any:
    """The layer's own `__call__`, plus its adapter's output."""
    y = base_call(self, inputs, *args, **kwargs)
    spec: AdapterSpec = getattr(self, _SPEC)
    path: str = getattr(self, _PATH)
    own = _attached(self)
    adapter = Adapter({n: own[factored.PREFIX + n] for n in getattr(self, _NAMES)}, spec)

    def get(name: str) -> Any:
        v = getattr(self, name, None)
        return None if v is None else v[...]

    view = contraction(self, inputs.ndim, kwargs)
    if view is not None and (reason := view.unsupported()) is not None:
        raise ValueError(f"jlora.nnx: {type(self).__name__} at {path!r}: {reason}")
    kernel_shape = tuple(self.kernel[...].shape)
    leaves, one = factored.layer_params(adapter, lambda: own, get, kernel_shape, path)
    key = _DROPOUT_KEY.get() if spec.dropout > 0 else None
    if key is not None:  # per target, and per layer inside a scan
        key = factored.layer_key(jax.random.fold_in(key, targets.stable_hash(path)), one)
    return factored.adapted(inputs, y, view, get, adapter, key, path, leaves=leaves, spec=one)


def _attached(module: nnx.Module) -> dict[str, jax.Array]:
    return {
        n: v[...]
        for n, v in vars(module).items()
        if n.startswith(factored.PREFIX) and isinstance(v, nnx.Variable)
    }


# Subclasses of the layers, with their instance layout (so `attach` can swap `__class__`).
class AdaptedLinear(nnx.Linear):
    """An `nnx.Linear` carrying an adapter (see the module docstring)."""

    def __call__(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        return _call(self, nnx.Linear.__call__, inputs, args, kwargs)


class AdaptedLinearGeneral(nnx.LinearGeneral):
    """An `nnx.LinearGeneral` carrying an adapter."""

    def __call__(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        return _call(self, nnx.LinearGeneral.__call__, inputs, args, kwargs)


class AdaptedEinsum(nnx.Einsum):
    """An `nnx.Einsum` carrying an adapter."""

    def __call__(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        return _call(self, nnx.Einsum.__call__, inputs, args, kwargs)


_ADAPTED = {
    nnx.Linear: AdaptedLinear,
    nnx.LinearGeneral: AdaptedLinearGeneral,
    nnx.Einsum: AdaptedEinsum,
}
_BASE = {v: k for k, v in _ADAPTED.items()}


def attach(model: nnx.Module, adapters: Adapters) -> None:
    """Places `adapters` (from `jlora.init` on `nnx.state(model, nnx.Param)`) in `model`, in
    place: every targeted layer runs its adapter from now on (see the module docstring).

    Raises:
      ValueError: an adapter whose kernel is not a Linear / LinearGeneral / Einsum of `model`
        (named, with the layer's type), or of another shape.
    """
    layers = modules(model)
    for path, adapter in adapters.items():
        spec = adapter.spec
        module = layers.get(path) or layers.get(path.removeprefix("params/"))
        if module is None:
            raise ValueError(
                f"jlora.nnx.attach: {path!r} is not the kernel of an nnx.Linear, LinearGeneral "
                f"or Einsum of the model (those are: {sorted(layers)[:5]}...); a custom layer "
                "reading its own kernel needs the merged path (jlora.merge)"
            )
        if type(module) not in _ADAPTED and type(module) not in _BASE:
            raise ValueError(
                f"jlora.nnx.attach: {path!r} belongs to a {type(module).__name__}, a subclass the "
                "factored path cannot run (its __call__ may differ); use the merged path"
            )
        if tuple(module.kernel[...].shape) != tuple(spec.kernel_shape):
            raise ValueError(
                f"jlora.nnx.attach: {path!r} has a kernel of shape "
                f"{tuple(module.kernel[...].shape)}, the adapter is for {spec.kernel_shape}"
            )
        _remove(module)
        trainable = set(spec.trainable)
        for name, x in factored.attached_leaves(adapter).items():
            kind = nnx.LoRAParam if name.removeprefix(factored.PREFIX) in trainable else Frozen
            setattr(module, name, kind(x))
        setattr(module, _SPEC, spec)
        setattr(module, _PATH, path)
        setattr(module, _NAMES, tuple(adapter.params))
        module.__class__ = _ADAPTED.get(type(module), type(module))


def _remove(module: nnx.Module) -> None:
    for n in [n for n in vars(module) if n.startswith(factored.PREFIX)]:
        delattr(module, n)


def adapters(model: nnx.Module) -> Adapters:
    """The adapters `model` carries now (trained values), keyed by kernel path."""
    out = {}
    for module in modules(model).values():
        if type(module) in _BASE:
            own = _attached(module)
            names = getattr(module, _NAMES)
            spec = getattr(module, _SPEC)
            out[getattr(module, _PATH)] = Adapter(
                {n: own[factored.PREFIX + n] for n in names}, spec
            )
    return out


def detach(model: nnx.Module, *, merge: bool = False) -> Adapters:
    """Takes the adapters out of `model` (in place) and returns them; with `merge=True` each
    kernel becomes its merged kernel `K + ΔK` first (the model then runs the adapted function
    with plain layers)."""
    out = adapters(model)
    for module in modules(model).values():
        if type(module) in _BASE:
            adapter = out[getattr(module, _PATH)]
            if merge:
                module.kernel[...] = _merge_one(module.kernel[...], adapter)
            _remove(module)
            module.__class__ = _BASE[type(module)]
    return out


def adapt(
    model: nnx.Module,
    config: AdapterConfig,
    key: jax.Array | int | None = None,
    *,
    grads: Any = None,
) -> Adapters:
    """`jlora.init` on the model's `nnx.Param` state (its layouts from its layers), the frozen
    kernels a method rewrites (PiSSA, residual NLoRA) updated in place, and the adapters
    `attach`ed. Returns the adapters as made.

    `grads`: for GoRA / LoRA-GA, `jlora.gradient_stats(loss_fn, nnx.state(model, nnx.Param),
    batches, config)` with `loss_fn(params, batch)` calling `nnx.merge(graphdef, params, rest)`.
    """
    params = nnx.state(model, nnx.Param)
    base, ad = init(config, params, key, grads=grads, layouts=layouts(model))
    if base is not params:
        nnx.update(model, base)
    attach(model, ad)
    return ad


def optimizer(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    *,
    weight_decay: float = 0.0,
    learning_rate: optax.ScalarOrSchedule | None = None,
    decay: Callable[[str, str], bool] | None = None,
) -> optax.GradientTransformation:
    """`jlora.optimizer` for `nnx.Optimizer(model, ..., wrt=nnx.LoRAParam)`: the trainable
    leaves `model` carries, grouped by their specs' learning-rate ratios (GoRA's B) and weight
    decay (arguments as in `jlora.optimizer`)."""
    if weight_decay and learning_rate is None:
        raise ValueError("optimizer(weight_decay=...) needs learning_rate= (the lr of tx)")
    ad = adapters(model)
    lab = optim.labels(ad, decay if weight_decay else (lambda p, n: False))
    by_leaf = {
        f"{p.removesuffix('kernel')}{factored.PREFIX}{n}": g
        for p, a in lab.items()
        for n, g in a.params.items()
    }

    def label_of(path: Any, _: Any) -> str:
        name = targets.path_str(path)
        hit = next((g for k, g in by_leaf.items() if name.endswith(k)), None)
        return hit if hit is not None else optim.FROZEN

    def labels(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(label_of, params)

    return optim.partitioned(labels, set(by_leaf.values()), tx, weight_decay, learning_rate)
