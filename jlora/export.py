"""Deprecated alias: the jlora format moved to `jlora.persist`, the PEFT export to
`jlora.interop.peft` (issue 12: persistence in the core, interop above the models).

`jlora.export.<name>` still resolves, with a `DeprecationWarning` naming the new home, e.g.
`jlora.export.save_adapters` is `jlora.persist.save_adapters` and `jlora.export.to_peft` is
`jlora.interop.peft.to_peft`.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_HOMES = ("jlora.persist", "jlora.interop.peft")


def __getattr__(name: str) -> Any:
    homes = (importlib.import_module(h) for h in _HOMES)
    module = next((m for m in homes if name in m.__all__), None)
    if module is None:
        raise AttributeError(f"module 'jlora.export' has no attribute {name!r}")
    home = module.__name__
    warnings.warn(
        f"jlora.export.{name} moved to {home}.{name}; jlora.export will be removed",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(module, name)
