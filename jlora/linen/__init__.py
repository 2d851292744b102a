"""jlora's Linen wing: the factored path (`inject`, `attach`, `apply`), kernel `layouts` from a
model's modules, dense layers on quantized kernels (`quant`: `dense`, `dequantizing`) and the
gradient tap of `jlora.gradient_stats`.

Everything here knows Linen's module system; the pytree math it calls (`jlora.adapters`,
`jlora.layout`, `jlora.factored`) does not.
"""

from jlora.linen import quant, tap  # tap: registers the gradient tap
from jlora.linen.attach import apply, attach
from jlora.linen.inject import inject
from jlora.linen.layouts import layouts

__all__ = ["apply", "attach", "inject", "layouts", "quant", "tap"]
