"""Adaptation methods: one module each, registered by name in `METHODS` (see `base`).

Each method module registers itself at import (`register(Method())` on its last line); the import
line below is the registry's list of built-in methods, in `METHODS` order.

Example:
  >>> from jlora.methods import METHODS
  >>> list(METHODS)[:10]
  ['lora', 'pissa', 'dora', 'slora', 'nlora', 'inttune', 'nola', 'vera', 'gora', 'loraga']
"""

from jlora.methods import lora, pissa, dora, slora, nola, vera, gora, loraga  # noqa: F401, I001
from jlora.methods.base import (
    IN,
    METHODS,
    OUT,
    RANK,
    Adapter,
    AdapterSpec,
    Layer,
    Leaf,
    Method,
    NoOptions,
    Options,
    option_names,
    register,
)

__all__ = [
    "IN",
    "METHODS",
    "OUT",
    "RANK",
    "Adapter",
    "AdapterSpec",
    "Layer",
    "Leaf",
    "Method",
    "NoOptions",
    "Options",
    "option_names",
    "register",
]
