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

_PERSIST = (
    "CONFIG_FILE",
    "FORMAT",
    "JLORA_FILE",
    "READABLE_VERSIONS",
    "VERSION",
    "config_from_json",
    "leaf_shapes",
    "load_adapters",
    "save_adapters",
    "spec_from_json",
    "spec_to_json",
)
_PEFT = ("PEFT_FILE", "fold", "hf_module", "to_peft")


def __getattr__(name: str) -> Any:
    home = "jlora.persist" if name in _PERSIST else "jlora.interop.peft" if name in _PEFT else None
    if home is None:
        raise AttributeError(f"module 'jlora.export' has no attribute {name!r}")
    warnings.warn(
        f"jlora.export.{name} moved to {home}.{name}; jlora.export will be removed",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(home), name)
