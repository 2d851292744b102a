"""What a method is: the `Method` interface, its `Options`, its `Leaf` layout, and the registry.

A method is one file: a frozen `Options` dataclass (validated on construction, flat names
`<prefix>_<field>` in `AdapterConfig` and YAML), and a `Method` subclass that says

- `leaves(spec)`: every leaf an adapter holds, with the role of each axis (`IN`, `OUT`, `RANK`
  or a fixed size), whether it trains, and whether it is regenerable from `spec.seed`;
- `init(K, key, spec, grad)`: those leaves for one (possibly stacked) fp32 kernel;
- `factors(params, spec)`: `(A, M or None, B)` with `ΔK = s · A @ M @ B`, or its own
  `delta` / `merge` / `output` where the update is not a plain low-rank product (DoRA);
- `plan(specs, kernels, grads, keys)`: an optional whole-model step before the per-target init
  (GoRA's rank allocation, NOLA's per-target seeds, VeRA's shared matrices);
- `needs_grads`, `residual(options)`, `lr_ratios(options)`, `scale(rank, alpha, config)` and
  `regenerate(spec)`.

`register(MyMethod())` adds a method to `METHODS` (the one registry: `jlora.METHODS` is the same
object); everything else (init, inject, merge, the optimizer, split/combine, export, the trainer)
reads the method from there and has no per-method branch.

An `Adapter` holds one target's floating-point leaves (`params`) and its static `AdapterSpec`
(pytree metadata); `jax.grad`, `jax.tree.map` and optax see only the leaves, `jit` caches on
the spec.

Example:
  >>> import jax.numpy as jnp
  >>> from jlora.methods import METHODS
  >>> spec = AdapterSpec(method="slora", rank=2, alpha=2.0, scale=1.0, kernel_shape=(5, 3),
  ...                    kernel_dtype="float32", options=METHODS["slora"].options_class())
  >>> {n: leaf.shape(spec) for n, leaf in METHODS["slora"].leaves(spec).items()}
  {'A': (5, 2), 'M': (2, 2), 'B': (2, 3)}
  >>> spec.trainable
  ('A', 'M', 'B')
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jlora import linalg
from jlora.layout import KernelLayout
from jlora.lowrank import lowrank

if TYPE_CHECKING:
    from jlora.config import AdapterConfig

Leaves = dict[str, jax.Array]

# Axis roles of a leaf (see `Leaf`): the axis follows the kernel's input axis, its output axis, or
# the adapter rank. Later work (sharding, quantized bases) derives per-leaf layouts from them.
IN, OUT, RANK = "in", "out", "rank"
ROLES = (IN, OUT, RANK)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One leaf of a method's adapter: its axes, and how the optimizer and exports treat it."""

    # The leaf's axes after the stacked ones (a stacked kernel's leading axes come first):
    # IN (size d_in), OUT (size d_out), RANK (size spec.rank), or an int, a size that follows no
    # kernel axis (NOLA's number of bases).
    axes: tuple[str | int, ...]
    # Whether the optimizer updates it (frozen leaves get no gradient and no optimizer state).
    trainable: bool = True
    # Whether `Method.regenerate(spec)` recomputes it from the spec's seed, so that exports need
    # not store it (NOLA's cached bases).
    regenerable: bool = False

    def shape(self, spec: AdapterSpec) -> tuple[int, ...]:
        """The leaf's full shape for `spec`, stacked axes included."""
        size = {IN: spec.d_in, OUT: spec.d_out, RANK: spec.rank}
        return (*spec.stack, *(a if isinstance(a, int) else size[a] for a in self.axes))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    """Base of a method's options: a frozen, keyword-only dataclass validated in `__post_init__`.

    Subclasses set `prefix`; `AdapterConfig(**flat)` and the YAML `adapter` section name each
    field `<prefix>_<field>` (e.g. `nola_num_basis`), so a flat config stays readable and a
    misplaced option (another method's) fails naming it.
    """

    prefix: ClassVar[str] = ""

    @classmethod
    def flat_names(cls) -> dict[str, str]:
        """`{flat name: field name}` of this options class."""
        return {f"{cls.prefix}_{f.name}": f.name for f in dataclasses.fields(cls)}

    def to_flat(self) -> dict[str, Any]:
        """The options as `{flat name: value}`."""
        return {flat: getattr(self, name) for flat, name in self.flat_names().items()}

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> Options:
        """Options from `{flat name: value}` (every name must be one of `flat_names()`)."""
        names = cls.flat_names()
        return cls(**{names[k]: v for k, v in flat.items()})

    def _set(self, field: str, value: Any) -> None:
        """Stores a normalised value (e.g. a list as a tuple) on the frozen instance."""
        object.__setattr__(self, field, value)

    def _flat(self, field: str) -> str:
        return f"{self.prefix}_{field}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoOptions(Options):
    """Options of a method that has none."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterSpec:
    """Static description of one target's adapter (hashable; pytree metadata).

    What the optimizer, exports and the trainer need beyond it (`trainable`, `lr_ratios`,
    `residual`) the spec's method derives from its options.
    """

    # Method name, a key of `jlora.METHODS`.
    method: str
    # Rank of the stored factors (GoRA on stacked kernels: the largest rank of the stack).
    rank: int
    # LoRA alpha of the target (s = alpha / r, or alpha / √r with rsLoRA and GoRA).
    alpha: float
    # Scale s: a float, or (GoRA on stacked kernels) nested tuples over the stacked axes.
    scale: Any
    # Shape and dtype name of the targeted kernel (as stored: its matrix is `layout`'s view).
    kernel_shape: tuple[int, ...]
    kernel_dtype: str
    # The method's options (an instance of its `options_class`).
    options: Options
    # Dropout probability on the adapter input in the factored path.
    dropout: float = 0.0
    # Seed of the target's regenerable leaves (NOLA's bases), set by the method's `plan`.
    seed: int | None = None
    # Per-target results of the method's whole-model step, as sorted `(name, value)` pairs of
    # hashable values (GoRA: "ranks" per stacked matrix and the parameter "budget").
    info: tuple[tuple[str, Any], ...] = ()
    # Which kernel axes are stacked layers, inputs and outputs (`jlora.layout`); None: the
    # default, the last two axes are (d_in, d_out) and leading ones stacked. Methods see only
    # the matrices `(*stack, d_in, d_out)`; `jlora.init` / `merge` convert.
    layout: KernelLayout | None = None

    @property
    def matrix_layout(self) -> KernelLayout:
        """`layout`, or the default layout of `kernel_shape`."""
        return self.layout or KernelLayout.default(len(self.kernel_shape))

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        """`(*stack, d_in, d_out)`: the shape of the matrices the method adapts."""
        return self.matrix_layout.matrix_shape(self.kernel_shape)

    @property
    def stack(self) -> tuple[int, ...]:
        return self.matrix_shape[:-2]

    @property
    def d_in(self) -> int:
        return self.matrix_shape[-2]

    @property
    def d_out(self) -> int:
        return self.matrix_shape[-1]

    def get(self, name: str, default: Any = None) -> Any:
        """A value of `info`."""
        return dict(self.info).get(name, default)

    def scale_array(self) -> np.ndarray:
        """The scale broadcastable against stacked `(*stack, d_in, d_out)` matrices."""
        s = np.asarray(self.scale, np.float32)
        return s.reshape((*s.shape, 1, 1)) if s.ndim else s

    @property
    def method_impl(self) -> Method:
        """The registered `Method` of this spec."""
        return METHODS[self.method]

    @property
    def trainable(self) -> tuple[str, ...]:
        """Names of the leaves the optimizer updates."""
        return tuple(n for n, leaf in self.method_impl.leaves(self).items() if leaf.trainable)

    @property
    def lr_ratios(self) -> tuple[tuple[str, float], ...]:
        """Learning-rate multipliers of trainable leaves, e.g. (("B", 16.0),) for GoRA's LoRA+."""
        return self.method_impl.lr_ratios(self.options)

    @property
    def residual(self) -> bool:
        """Whether init rewrote the frozen kernel to K − ΔK_init."""
        return self.method_impl.residual(self.options)


@flax.struct.dataclass
class Adapter:
    """One target's adapter: floating leaves plus static metadata."""

    params: Leaves
    spec: AdapterSpec = flax.struct.field(pytree_node=False)


class Layer:
    """What `Method.output` may read of the dense layer being adapted (looked up on demand).

    `kernel` and `bias` are the module's parameters (the frozen base, `None` for no bias).
    """

    def __init__(self, get: Callable[[str], jax.Array | None]) -> None:
        self._get = get

    @property
    def kernel(self) -> jax.Array:
        kernel = self._get("kernel")
        assert kernel is not None
        return kernel

    @property
    def bias(self) -> jax.Array | None:
        return self._get("bias")


class Method(abc.ABC):
    """An adaptation method (see the module docstring). Subclass, set `name`, define `init`."""

    # Registry key and `AdapterConfig.method` value.
    name: ClassVar[str]
    # The method's options; `NoOptions` if it has none.
    options_class: ClassVar[type[Options]] = NoOptions
    # Whether `init` reads the mean gradient of each target kernel from a pre-pass
    # (`jlora.gradient_stats`); `jlora.init(..., grads=...)` then requires them.
    needs_grads: ClassVar[bool] = False

    # -- whole model ----------------------------------------------------------------------

    def scale(self, rank: int, alpha: float, config: AdapterConfig) -> float:
        """The scale s of a target of this rank and alpha: alpha / r, or alpha / √r (rsLoRA)."""
        return alpha / math.sqrt(rank) if config.rslora else alpha / rank

    def plan(
        self,
        specs: Mapping[str, AdapterSpec],
        kernels: Mapping[str, jax.Array],
        grads: Mapping[str, jax.Array] | None,
        keys: Mapping[str, jax.Array],
    ) -> dict[str, AdapterSpec]:
        """The whole-model step before the per-target init: the final spec of every target.

        `specs` are the generic specs (rank and scale from the config), `kernels` the target
        kernels, `grads` the pre-pass gradients (methods with `needs_grads`), `keys` each
        target's PRNG key (the one its `init` gets). Default: no change. `jlora.abstract_init`
        calls it with `grads=None` and abstract kernels, to size a run before any weight is
        read: a method that reads the gradients then plans the budget-neutral shapes.
        """
        return dict(specs)

    # -- one target -----------------------------------------------------------------------

    def leaves(self, spec: AdapterSpec) -> dict[str, Leaf]:
        """Every leaf of an adapter of `spec`. Default: LoRA's trainable `A (d_in, r)` and
        `B (r, d_out)`."""
        return {"A": Leaf((IN, RANK)), "B": Leaf((RANK, OUT))}

    @abc.abstractmethod
    def init(
        self, K: jax.Array, key: jax.Array, spec: AdapterSpec, grad: jax.Array | None
    ) -> Leaves:
        """The leaves for the fp32 kernel `K` (traced under `jax.jit`; `spec.seed` may be traced).

        `grad` is the kernel's pre-pass gradient for methods with `needs_grads`, else None.
        """

    def factors(
        self, params: Leaves, spec: AdapterSpec
    ) -> tuple[jax.Array, jax.Array | None, jax.Array]:
        """`(A, M or None, B)` with `ΔK = s · A @ M @ B`. Default: the leaves A, M (if any), B."""
        return params["A"], params.get("M"), params["B"]

    def regenerate(self, spec: AdapterSpec) -> Leaves:
        """The leaves `leaves(spec)` marks regenerable, recomputed from `spec.seed` (traceable).
        Default: none."""
        return {}

    def residual(self, options: Options) -> bool:
        """Whether init rewrites the frozen kernel to `K − ΔK_init` (PiSSA). Default: False."""
        return False

    def lr_ratios(self, options: Options) -> tuple[tuple[str, float], ...]:
        """Learning-rate multipliers of trainable leaves (GoRA's LoRA+). Default: none."""
        return ()

    # -- the adapted function ---------------------------------------------------------------

    def delta(self, params: Leaves, spec: AdapterSpec) -> jax.Array:
        """ΔK in fp32 (traceable). Default: `s · A @ M @ B` from `factors`."""
        A, M, B = self.factors(params, spec)
        if M is not None:
            A = linalg.mm(A, M)
        return jnp.asarray(spec.scale_array()) * linalg.mm(A, B)

    def merge(self, K: jax.Array, params: Leaves, spec: AdapterSpec) -> jax.Array:
        """The adapted fp32 kernel. Default: `K + ΔK`."""
        return K + self.delta(params, spec)

    def unmerge(self, K: jax.Array, params: Leaves, spec: AdapterSpec) -> jax.Array:
        """Inverse of `merge`. Default: `K − ΔK`."""
        return K - self.delta(params, spec)

    def output(
        self,
        x: jax.Array,
        y: jax.Array,
        layer: Layer,
        params: Leaves,
        spec: AdapterSpec,
        key: jax.Array | None,
    ) -> jax.Array:
        """The adapted output of a dense layer with input `x` and frozen output `y = x @ K + b`
        (the factored path). Default: `y + s · ((drop(x) @ A) @ M) @ B` without forming ΔK,
        computed in `y.dtype`; dropout only when `key` is given."""
        A, M, B = self.factors(params, spec)
        x = dropout(x, spec.dropout, key)
        dtype = y.dtype
        M = None if M is None else M.astype(dtype)
        return y + lowrank(x.astype(dtype), A.astype(dtype), M, B.astype(dtype), spec.scale)

    # -- export ---------------------------------------------------------------------------------

    def peft_extra(self, params: Leaves, spec: AdapterSpec) -> tuple[dict[str, Any], Leaves]:
        """What a PEFT LoRA export (`jlora.interop.peft.to_peft`) writes beyond `lora_A` / `lora_B`
        (from `factors`): `(config, tensors)`, the `adapter_config.json` fields this method sets
        (every target must give the same) and per-module tensors keyed by the name PEFT stores
        after the module name, in PyTorch layout (DoRA: `({"use_dora": True},
        {"lora_magnitude_vector": m})`). Default: `({}, {})`, a plain LoRA."""
        return {}, {}


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout of `x` at `rate` (the identity when `key` is None or `rate` is 0)."""
    if key is None or rate <= 0:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, x.shape)
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


class Registry(Mapping[str, Method]):
    """Methods by name; iterating gives the names in registration order.

    Example:
      >>> from jlora.methods import METHODS
      >>> list(METHODS)[:3]
      ['lora', 'pissa', 'dora']
    """

    def __init__(self) -> None:
        self._methods: dict[str, Method] = {}

    def __getitem__(self, name: str) -> Method:
        try:
            return self._methods[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name (a list from YAML)
            raise KeyError(f"unknown method {name!r}; registered: {', '.join(self)}") from None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._methods

    def __iter__(self) -> Iterator[str]:
        return iter(self._methods)

    def __len__(self) -> int:
        return len(self._methods)

    def __repr__(self) -> str:
        return f"Registry({', '.join(self)})"

    def register(self, method: Method, *, replace: bool = False) -> Method:
        """Adds `method` under `method.name`; a taken name needs `replace=True`."""
        if not isinstance(method, Method):
            raise TypeError(
                f"register() takes a jlora Method instance, got {type(method).__name__}"
            )
        name = getattr(type(method), "name", None)
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{type(method).__name__}.name={name!r}: expected an identifier")
        if not (
            isinstance(method.options_class, type) and issubclass(method.options_class, Options)
        ):
            raise TypeError(f"{type(method).__name__}.options_class must subclass Options")
        if name in self._methods and not replace:
            raise ValueError(f"method {name!r} is already registered (pass replace=True)")
        self._methods[name] = method
        option_names.cache_clear()
        return method

    def unregister(self, name: str) -> None:
        """Removes a method (e.g. one a test registered)."""
        del self._methods[name]
        option_names.cache_clear()


METHODS = Registry()
register = METHODS.register


@functools.cache
def option_names() -> dict[str, tuple[str, ...]]:
    """`{flat option name: names of the methods that take it}` over the registry."""
    out: dict[str, tuple[str, ...]] = {}
    for name, method in METHODS.items():
        for flat in method.options_class.flat_names():
            out[flat] = (*out.get(flat, ()), name)
    return out


def per_matrix(fn: Callable[..., Any], stack: tuple[int, ...], key: jax.Array, *arrays: Any) -> Any:
    """Applies `fn(key, *matrices)` to every matrix of stacked arrays, with independent keys.

    `arrays` have the leading `stack` axes (or are None); `fn` sees one matrix each.
    """
    n = math.prod(stack)
    keys = jax.random.split(key, n).reshape(stack) if stack else key
    for _ in stack:
        fn = jax.vmap(fn)
    return fn(keys, *arrays)


def kaiming_uniform(key: jax.Array, d_in: int, r: int) -> jax.Array:
    """Kaiming-uniform(a=√5) on a (d_in, r) matrix: U(−1/√d_in, 1/√d_in), as PyTorch's Linear."""
    bound = 1.0 / math.sqrt(d_in)
    return jax.random.uniform(key, (d_in, r), jnp.float32, -bound, bound)


def amb_factors(params: Leaves, spec: AdapterSpec) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """Factors stored as leaves A, M (optional) and B."""
    return params["A"], params.get("M"), params["B"]
