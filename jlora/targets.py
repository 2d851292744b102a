"""Pytree paths and target selection.

A target is named by the '/'-joined path of its kernel in the parameter pytree, e.g.
`encoder/layer_0/attention/query/kernel`. Candidates are floating-point leaves named `kernel`
with at least two axes; the last two axes are `(d_in, d_out)` and any leading axes are stacked
layers (as `nn.scan` produces).

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
from jlora.quant.kernel import is_quantized


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path: Sequence[Any]) -> str:
    """'/'-joins a `jax.tree_util` key path."""
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


@dataclasses.dataclass(frozen=True)
class Target:
    """A selected kernel with the rank and alpha of the rule that selected it."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    rank: int
    alpha: float


def select(params: Any, rules: Sequence[Rule], rank: int, alpha: float) -> list[Target]:
    """Targets of `rules` (first match wins) among the kernels of `params`, in tree order.

    Raises:
      ValueError: a rule matches no kernel (the message lists the closest kernel paths), or a
        rank exceeds min(d_in, d_out) of a kernel it selects.
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
                d_in, d_out = leaf.shape[-2:]
                if r > min(d_in, d_out):
                    raise ValueError(
                        f"rank {r} for target {path!r} exceeds min(d_in, d_out) = "
                        f"{min(d_in, d_out)} of its kernel {tuple(leaf.shape)}"
                    )
                a = rule.alpha if rule.alpha is not None else alpha
                out.append(Target(path, tuple(leaf.shape), np.dtype(leaf.dtype), r, float(a)))
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
