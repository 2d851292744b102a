"""The matrix an adapter adapts: which kernel axes are stacked layers, inputs and outputs.

A rank-r update is an update of a *matrix*. A plain dense kernel `(d_in, d_out)` is that matrix;
other kernels are not, and which axes mean what depends on the module, not on the number of axes:

- `nn.scan` / `nnx.scan` layers stack a `(d_in, d_out)` kernel to `(layers, d_in, d_out)`: one
  matrix per layer, each with its own adapter (the *stacked* axes);
- `DenseGeneral((heads, head_dim))` has a kernel `(d_model, heads, head_dim)`: one
  `d_model × (heads·head_dim)` matrix, as PEFT sees the fused `nn.Linear` of a PyTorch model;
- an `Einsum("BTD,NDH->BTNH")` kernel `(heads, d_model, head_dim)`: the same matrix with its
  axes in another order.

A `KernelLayout` names the kernel axes of each role; `matrix(K)` is the view every init, merge
and export works on (the kernel transposed to `(*stacked, *inputs, *outputs)` and reshaped to
`(*stacked, d_in, d_out)`; input and output axes flatten in kernel order, row-major, so a
`(d_model, heads, head_dim)` kernel's matrix has the columns of PyTorch's fused `(heads·head_dim,
d_model)` weight in its row order), `kernel(matrix)` its inverse. `Contraction` is the same for
a layer's *input and output*: it turns `x` and `y` of an einsum into the `(..., d_in)` and
`(..., d_out)` rows the factored path multiplies, and back.

Layouts come from the modules (`jlora.linen.layouts(model, x)`, `jlora.nnx.layouts(model)`);
`KernelLayout.default(ndim)` (every leading axis stacked) is what a 2-D kernel gets without one.

Example:
  >>> import jax.numpy as jnp
  >>> from jlora.layout import KernelLayout
  >>> lay = KernelLayout(stack=(), inputs=(1,), outputs=(0, 2))  # Einsum "BTD,NDH->BTNH"
  >>> K = jnp.arange(2 * 3 * 4.0).reshape(2, 3, 4)  # (heads, d_model, head_dim)
  >>> lay.matrix(K).shape
  (3, 8)
  >>> bool(jnp.all(lay.kernel(lay.matrix(K), K.shape) == K))
  True
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """Roles of a kernel's axes (axis indices into the kernel; together a permutation of them)."""

    # Stacked axes: one matrix (and one adapter) per index, e.g. the layer axis of nn.scan.
    stack: tuple[int, ...] = ()
    # Axes contracted with the layer's input, flattened in this order into d_in.
    inputs: tuple[int, ...] = (0,)
    # Axes of the layer's output, flattened in this order into d_out.
    outputs: tuple[int, ...] = (1,)

    def __post_init__(self) -> None:
        for name in ("stack", "inputs", "outputs"):
            object.__setattr__(self, name, tuple(int(a) for a in getattr(self, name)))
        axes = (*self.stack, *self.inputs, *self.outputs)
        if not self.inputs or not self.outputs or sorted(axes) != list(range(len(axes))):
            raise ValueError(
                f"KernelLayout(stack={self.stack}, inputs={self.inputs}, outputs={self.outputs}):"
                " expected non-empty inputs and outputs that, with stack, name every kernel axis"
                " 0..ndim-1 exactly once"
            )

    @classmethod
    def default(cls, ndim: int) -> KernelLayout:
        """`(*stacked, d_in, d_out)`: the last two axes are the matrix, leading ones stacked."""
        if ndim < 2:
            raise ValueError(f"a kernel to adapt has at least 2 axes, not {ndim}")
        return cls(stack=tuple(range(ndim - 2)), inputs=(ndim - 2,), outputs=(ndim - 1,))

    @property
    def ndim(self) -> int:
        return len(self.stack) + len(self.inputs) + len(self.outputs)

    @property
    def order(self) -> tuple[int, ...]:
        """The kernel axes in matrix order: stacked, inputs, outputs."""
        return (*self.stack, *self.inputs, *self.outputs)

    @property
    def is_plain(self) -> bool:
        """Whether the kernel already is `(*stacked, d_in, d_out)` (no transpose or reshape)."""
        return self == KernelLayout.default(self.ndim)

    def check(self, shape: Sequence[int], what: str) -> None:
        """Raises a ValueError unless the layout fits a kernel of `shape`."""
        if len(shape) != self.ndim:
            raise ValueError(
                f"{what}: layout {self} names {self.ndim} axes, the kernel has shape {tuple(shape)}"
            )

    def matrix_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """`(*stack sizes, d_in, d_out)` of a kernel of `shape`."""
        return (
            *(shape[a] for a in self.stack),
            math.prod(shape[a] for a in self.inputs),
            math.prod(shape[a] for a in self.outputs),
        )

    def matrix(self, K: jax.Array) -> jax.Array:
        """The kernel as `(*stacked, d_in, d_out)` matrices."""
        if self.is_plain:
            return K
        return jnp.transpose(K, self.order).reshape(self.matrix_shape(K.shape))

    def kernel(self, m: jax.Array, shape: Sequence[int]) -> jax.Array:
        """Inverse of `matrix`: matrices back to a kernel of `shape`."""
        if self.is_plain:
            return m.reshape(tuple(shape))
        permuted = tuple(shape[a] for a in self.order)
        inverse = sorted(range(self.ndim), key=lambda i: self.order[i])
        return jnp.transpose(m.reshape(permuted), inverse)

    def unstacked(self, n: int | None = None) -> KernelLayout:
        """The layout of one matrix's kernel without its first `n` stacked axes (default: all;
        the rest renumbered): what a layer inside `nn.scan` sees (`n`: the scanned axes)."""
        n = len(self.stack) if n is None else n
        keep = sorted((*self.stack[n:], *self.inputs, *self.outputs))
        new = {a: i for i, a in enumerate(keep)}
        return KernelLayout(
            tuple(new[a] for a in self.stack[n:]),
            tuple(new[a] for a in self.inputs),
            tuple(new[a] for a in self.outputs),
        )

    def stacked(self, n: int) -> KernelLayout:
        """This layout under `n` new leading stacked axes (a layer scanned `n` times)."""
        return KernelLayout(
            (*range(n), *(a + n for a in self.stack)),
            tuple(a + n for a in self.inputs),
            tuple(a + n for a in self.outputs),
        )

    def to_json(self) -> dict[str, list[int]]:
        return {
            "stack": list(self.stack),
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
        }


@dataclasses.dataclass(frozen=True)
class Contraction:
    """A layer `y = einsum(x, K)` seen as `rows(y) = rows(x) @ matrix(K)`.

    Labels are single letters (ellipses expanded). The kernel's labels split into inputs (in `x`,
    not in `y`), outputs (in `y`, not in `x`) and batch labels (in both: a per-index kernel,
    e.g. MoE experts); `rows` puts x's other axes first, in `y`'s order.
    """

    x: str
    k: str
    y: str

    @classmethod
    def parse(cls, equation: str, x_ndim: int, what: str) -> Contraction:
        """From an einsum `equation` "x,k->y" applied to an `x` of `x_ndim` axes."""
        eq = equation.replace(" ", "")
        if "->" not in eq or eq.count(",") != 1:
            raise ValueError(f"{what}: einsum {equation!r} is not of the form 'x,kernel->y'")
        lhs, y = eq.split("->")
        x, k = lhs.split(",")
        if "..." in k:
            raise ValueError(f"{what}: einsum {equation!r} has an ellipsis in the kernel's labels")
        used = set((x + k + y).replace(".", ""))
        fresh = [c for c in string.ascii_letters if c not in used]
        if "..." in x:
            ellipsis = "".join(fresh[: x_ndim - (len(x) - 3)])
            x, y = x.replace("...", ellipsis), y.replace("...", ellipsis)
        if len(x) != x_ndim or "." in y:
            raise ValueError(f"{what}: einsum {equation!r} does not fit an input of {x_ndim} axes")
        return cls(x=x, k=k, y=y)

    @classmethod
    def dense(
        cls, x_ndim: int, axes: Sequence[int], n_out: int, what: str, batch: Sequence[int] = ()
    ) -> Contraction:
        """A `DenseGeneral`-style contraction: x's `axes` with a kernel
        `(*x.shape[batch], *x.shape[axes], *features)` of `n_out` feature axes; y = x's `batch`
        axes, its other axes, then the features (`jax.lax.dot_general`'s order)."""
        letters = iter(string.ascii_letters)
        xl = [next(letters) for _ in range(x_ndim)]
        axes = tuple(a % x_ndim for a in axes)
        batch = tuple(a % x_ndim for a in batch)
        if len(set(axes + batch)) != len(axes + batch) or not axes:
            raise ValueError(
                f"{what}: contracting axes {axes} and batch axes {batch} of an input with "
                f"{x_ndim} axes"
            )
        feats = [next(letters) for _ in range(n_out)]
        rest = [c for i, c in enumerate(xl) if i not in axes and i not in batch]
        b = [xl[a] for a in batch]
        return cls(
            x="".join(xl),
            k="".join(b + [xl[a] for a in axes] + feats),
            y="".join(b + rest + feats),
        )

    @property
    def inputs(self) -> str:
        return "".join(c for c in self.k if c in self.x and c not in self.y)

    @property
    def outputs(self) -> str:
        return "".join(c for c in self.k if c in self.y and c not in self.x)

    @property
    def batch(self) -> str:
        return "".join(c for c in self.k if c in self.x and c in self.y)

    @property
    def layout(self) -> KernelLayout:
        """The kernel's layout: batch labels stacked, inputs and outputs in kernel order."""
        pos = {c: i for i, c in enumerate(self.k)}
        return KernelLayout(
            tuple(pos[c] for c in self.batch),
            tuple(pos[c] for c in self.inputs),
            tuple(pos[c] for c in self.outputs),
        )

    def unsupported(self) -> str | None:
        """Why the factored path cannot run this contraction (None if it can)."""
        if len(set(self.k)) != len(self.k) or len(set(self.x)) != len(self.x):
            return "a repeated label (a trace or diagonal)"
        rest_x = [c for c in self.x if c not in self.k]
        rest_y = [c for c in self.y if c not in self.k]
        if sorted(rest_x) != sorted(rest_y) or set(self.k) - set(self.x) - set(self.y):
            return "an axis summed out of x or of the kernel alone"
        return None

    @property
    def _lead(self) -> str:
        """The labels of the rows' leading axes: the batch labels (kernel order), then y's
        labels that are not the kernel's (y order)."""
        return self.batch + "".join(c for c in self.y if c not in self.k)

    def x_rows(self, x: jax.Array) -> jax.Array:
        """`x` as `(*batch, *rest, d_in)`: a batched kernel's axes first, x's other axes in y's
        order, then the inputs flattened."""
        target = self._lead + self.inputs
        if target != self.x:
            x = jnp.einsum(f"{self.x}->{target}", x)
        return x.reshape(*x.shape[: len(self._lead)], -1)

    def y_rows(self, y: jax.Array) -> jax.Array:
        """`y` as `(*batch, *rest, d_out)`."""
        target = self._lead + self.outputs
        if target != self.y:
            y = jnp.einsum(f"{self.y}->{target}", y)
        return y.reshape(*y.shape[: len(self._lead)], -1)

    def y_from_rows(self, rows: jax.Array, y_shape: Sequence[int]) -> jax.Array:
        """Inverse of `y_rows` for an output of shape `y_shape`."""
        size = dict(zip(self.y, y_shape, strict=True))
        target = self._lead + self.outputs
        y = rows.reshape(tuple(size[c] for c in target))
        return y if target == self.y else jnp.einsum(f"{target}->{self.y}", y)


def bias_rows(bias: Any, contraction: Contraction, y_shape: Sequence[int]) -> Any:
    """A layer's bias as `(d_out,)` (one value per output) or `(*batch, d_out)` (per output of
    each index of a batched kernel); None: no bias.

    Raises ValueError for a bias along other axes (DoRA cannot separate it from the matrix).
    """
    if bias is None:
        return None
    size = dict(zip(contraction.y, y_shape, strict=True))
    out = tuple(size[c] for c in contraction.outputs)
    batch = tuple(size[c] for c in contraction.batch)
    if tuple(bias.shape) == out:
        return bias.reshape(-1)
    if batch and tuple(bias.shape) == batch + out:
        return bias.reshape(*batch, -1)
    raise ValueError(f"a bias of shape {tuple(bias.shape)}, not one per output {out}")
