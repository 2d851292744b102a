"""jlora: LoRA variants for JAX/Flax parameter pytrees.

Methods: `lora` (and rsLoRA), `pissa`, `slora`, `nlora`, `inttune`, `nola`, `gora`.

Example:
  >>> import jax, jax.numpy as jnp, optax, jlora
  >>> params = {"layer": {"kernel": jnp.ones((16, 8))}}
  >>> cfg = jlora.AdapterConfig(method="nlora", rank=4, targets=r".*/kernel")
  >>> base, adapters = jlora.init(cfg, params, jax.random.key(0))
  >>> tx = jlora.optimizer(adapters, optax.adam(1e-3))
  >>> jlora.trainable_count(adapters)
  112
"""

from jlora import linen, nnx
from jlora.adapters import Adapters, abstract_init, combine, delta, init, merge, split, unmerge
from jlora.config import METHODS, AdapterConfig, Rule
from jlora.counting import summary, trainable_count
from jlora.gradstats import gradient_stats
from jlora.layout import KernelLayout
from jlora.linen import inject
from jlora.methods import Adapter, AdapterSpec
from jlora.optim import optimizer
from jlora.targets import stacked_layouts

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Adapter",
    "AdapterConfig",
    "AdapterSpec",
    "Adapters",
    "KernelLayout",
    "Rule",
    "abstract_init",
    "combine",
    "delta",
    "gradient_stats",
    "init",
    "inject",
    "linen",
    "merge",
    "nnx",
    "optimizer",
    "split",
    "stacked_layouts",
    "summary",
    "trainable_count",
    "unmerge",
]
