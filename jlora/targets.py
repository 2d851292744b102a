"""Pytree paths and target selection.

A target is named by the '/'-joined path of its kernel in the parameter pytree, e.g.
`encoder/layer_0/attention/query/kernel`. Candidates are floating-point leaves named `kernel`
with at least two axes. A 2-D kernel is the `(d_in, d_out)` matrix an adapter adapts; for a kernel
with more axes the parameters alone cannot say which are stacked layers (`nn.scan`) and which
the inputs and outputs of a multi-axis projection (`DenseGeneral`, `Einsum`): its
`jlora.layout.KernelLayout` comes from the module (`jlora.linen.layouts`, `jlora.nnx.layouts`).

Example:
  >>> import jax.numpy as jnp
  >>> from jlora import targets
  >>> k = {"kernel": jnp.ones((4, 4))}
  >>> params = {"attn": {"query": k, "out": k}}
  >>> [t.path for t in targets.select(params, [targets.Rule(pattern=".*/query/kernel")], 2, 16.0)]
  ['attn/query/kernel']
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.config import Rule
from jlora.layout import KernelLayout
from jlora.quant.kernel import is_quantized


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path: Sequence[Any]) -> str:
    """'/'-joins a `jax.tree_util` key path. A value boxed in a variable (an `nnx.Param` of an
    NNX state, a Linen `nn.Partitioned`: the box's attribute `.value`) is named by the box's
    path, so `encoder/q/kernel` names an NNX kernel as it names a Linen one."""
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return "/".join(_key_name(k) for k in path)


def flatten(tree: Any) -> dict[str, Any]:
    """All leaves of `tree` keyed by their '/'-joined path, in tree order (a kernel kept
    quantized, `jlora.quant.QuantizedKernel`, is one leaf)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)
    return {path_str(p): v for p, v in leaves}


def replace(tree: Any, updates: Mapping[str, Any]) -> Any:
    """A copy of `tree` with the leaves at the given paths replaced."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)
    paths = [path_str(p) for p, _ in leaves]
    missing = set(updates) - set(paths)
    if missing:
        raise KeyError(f"paths not found in the parameter pytree: {sorted(missing)}")
    new = [updates.get(p, v) for p, (_, v) in zip(paths, leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, new)


def module_index(kernel_paths: Iterable[str]) -> dict[str, str]:
    """`{module path: kernel path}`: the Linen module whose `module.path` joined by '/' owns each
    kernel. A path made from a whole variables dict ("params/enc/q/kernel") is indexed both with
    and without its "params" collection prefix.

    Example:
      >>> module_index(["params/enc/q/kernel"])
      {'params/enc/q': 'params/enc/q/kernel', 'enc/q': 'params/enc/q/kernel'}
    """
    index = {}
    for path in kernel_paths:
        module_path = path.removesuffix("kernel").rstrip("/")
        index[module_path] = path
        if module_path == "params" or module_path.startswith("params/"):
            index[module_path.removeprefix("params").lstrip("/")] = path
    return index


def stable_hash(path: str) -> int:
    """A process-independent 31-bit hash of a path (Python's `hash` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(path.encode(), digest_size=4).digest(), "little") >> 1


def is_kernel(path: str, leaf: Any) -> bool:
    """Whether a leaf can be adapted: a floating `kernel` with at least two axes."""
    return (
        path.rsplit("/", 1)[-1] == "kernel"
        and hasattr(leaf, "shape")
        and len(leaf.shape) >= 2
        and jnp.issubdtype(leaf.dtype, jnp.floating)
    )


def stacked_layouts(params: Any) -> dict[str, KernelLayout]:
    """`{path: KernelLayout.default(ndim)}` for every kernel with more than two axes: each is
    stacked `(d_in, d_out)` matrices (scanned plain dense layers). For models you know to be
    built that way; a model's own layouts come from `jlora.linen.layouts` / `jlora.nnx.layouts`.

    Example:
      >>> import jax.numpy as jnp
      >>> stacked_layouts({"layers": {"kernel": jnp.ones((3, 4, 5))}})
      {'layers/kernel': KernelLayout(stack=(0,), inputs=(1,), outputs=(2,))}
    """
    return {
        p: KernelLayout.default(len(v.shape))
        for p, v in flatten(params).items()
        if is_kernel(p, v) and len(v.shape) > 2
    }


@dataclasses.dataclass(frozen=True)
class Target:
    """A selected kernel with the rank and alpha of the rule that selected it."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    rank: int
    alpha: float
    # Which kernel axes are stacked, inputs and outputs (the default for a 2-D kernel).
    layout: KernelLayout = dataclasses.field(default_factory=KernelLayout)


def layout_of(
    path: str, shape: Sequence[int], layouts: Mapping[str, KernelLayout] | None
) -> KernelLayout:
    """The layout of the kernel at `path`: `layouts[path]`, else the default of a 2-D kernel.

    Raises:
      ValueError: a kernel with more than two axes and no layout, or a layout that does not fit.
    """
    lay = (layouts or {}).get(path)
    if lay is None and len(shape) == 2:
        return KernelLayout()
    if lay is None:
        raise ValueError(
            f"kernel {path!r} has shape {tuple(shape)}: from the parameters alone jlora cannot "
            "tell stacked layers (nn.scan / nnx.scan) from a multi-axis projection "
            "(DenseGeneral, Einsum). Pass layouts=jlora.linen.layouts(model, *inputs) (Linen) "
            "or jlora.nnx.layouts(model) (NNX), or {path: jlora.KernelLayout(...)}"
        )
    if not isinstance(lay, KernelLayout):
        raise TypeError(f"layouts[{path!r}] must be a jlora.KernelLayout, got {type(lay).__name__}")
    lay.check(shape, f"layouts[{path!r}]")
    return lay


def select(
    params: Any,
    rules: Sequence[Rule],
    rank: int,
    alpha: float,
    layouts: Mapping[str, KernelLayout] | None = None,
    *,
    need_layouts: bool = True,
) -> list[Target]:
    """Targets of `rules` (first match wins) among the kernels of `params`, in tree order.

    `layouts` gives the layout of kernels that are not plain 2-D matrices; with
    `need_layouts=False` (callers that only read shapes, e.g. the gradient pre-pass) a kernel
    without one gets the default layout instead of an error.

    Raises:
      ValueError: a rule matches no kernel (the message lists the closest kernel paths), a
        kernel with more than two axes has no layout, or a rank exceeds min(d_in, d_out) of a
        kernel it selects.
    """
    kernels = {p: v for p, v in flatten(params).items() if is_kernel(p, v)}
    if not kernels:
        raise ValueError(
            "no adaptable kernel in params: expected floating leaves named 'kernel' with >= 2 axes"
        )
    compiled = [re.compile(r.pattern) for r in rules]
    used = [False] * len(rules)
    out = []
    for path, leaf in kernels.items():
        for i, (rule, rx) in enumerate(zip(rules, compiled, strict=True)):
            if rx.fullmatch(path):
                used[i] = True
                r = rule.rank if rule.rank is not None else rank
                shape = tuple(leaf.shape)
                if need_layouts or path in (layouts or {}):
                    lay = layout_of(path, shape, layouts)
                else:
                    lay = KernelLayout.default(len(shape))
                d_in, d_out = lay.matrix_shape(shape)[-2:]
                if r > min(d_in, d_out):
                    raise ValueError(
                        f"rank {r} for target {path!r} exceeds min(d_in, d_out) = "
                        f"{min(d_in, d_out)} of its kernel {tuple(leaf.shape)}"
                    )
                a = rule.alpha if rule.alpha is not None else alpha
                out.append(Target(path, shape, np.dtype(leaf.dtype), r, float(a), lay))
                break
    for rule, hit in zip(rules, used, strict=True):
        if not hit:
            near = difflib.get_close_matches(rule.pattern, list(kernels), n=5, cutoff=0.0)
            raise ValueError(
                f"target rule {rule.pattern!r} matches no kernel (re.fullmatch on '/'-joined "
                f"paths; a rule matching only kernels taken by an earlier rule counts as "
                f"matching none). Closest kernel paths: {near}"
            )
    return out
