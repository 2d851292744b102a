"""Adaptation methods: one module each, registered by name in `METHODS`."""

from jlora.methods.base import Adapter, AdapterSpec, Method
from jlora.methods.gora import GORA
from jlora.methods.lora import LORA
from jlora.methods.nola import NOLA
from jlora.methods.pissa import PISSA
from jlora.methods.slora import INTTUNE, NLORA, SLORA

METHODS: dict[str, Method] = {m.name: m for m in (LORA, PISSA, SLORA, NLORA, INTTUNE, NOLA, GORA)}

__all__ = ["METHODS", "Adapter", "AdapterSpec", "Method"]
