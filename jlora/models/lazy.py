"""A checkpoint tensor not yet read: its shape now, any slice of it on demand.

Loading onto a mesh (`jlora.models.load(..., mesh=)`) hands each family's `params_from_hf` a
`Lazy` per safetensors tensor; the family transposes it as it would the array (a view, nothing
is read) and the placer (`jlora.sharding.placer`) reads, for each of this process's devices,
only the slice that device holds. On several hosts a process thus reads only its own share of
each sharded kernel from the files.

Example:
  >>> import numpy as np
  >>> w = np.arange(12.0).reshape(3, 4)
  >>> x = Lazy(w, w.shape).T  # (4, 3), nothing read yet
  >>> x.shape, x[1:3, :2].tolist()
  ((4, 3), [[1.0, 5.0], [2.0, 6.0]])
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["Lazy"]


class Lazy:
    """A tensor read by slices: `slicer[index]` (a safetensors `get_slice` handle, or any array)
    gives the stored tensor's slice; `shape` is the (possibly transposed) shape.

    Args:
      slicer: indexable by a tuple of slices of the stored tensor.
      shape: the stored tensor's shape.
      transposed: whether this view is the stored 2-D tensor's transpose.
    """

    def __init__(self, slicer: Any, shape: tuple[int, ...], transposed: bool = False) -> None:
        self.slicer = slicer
        self.stored_shape = tuple(int(n) for n in shape)
        self.transposed = transposed

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stored_shape[::-1] if self.transposed else self.stored_shape

    @property
    def ndim(self) -> int:
        return len(self.stored_shape)

    @property
    def T(self) -> Lazy:  # noqa: N802 (NumPy's name)
        if self.ndim != 2:
            raise ValueError(f"Lazy.T: only 2-D tensors, not shape {self.shape}")
        return Lazy(self.slicer, self.stored_shape, not self.transposed)

    def __getitem__(self, index: Any) -> np.ndarray:
        """The slice `index` (slices or a tuple of slices, over this view's axes) as NumPy."""
        index = index if isinstance(index, tuple) else (index,)
        index = index + (slice(None),) * (self.ndim - len(index))
        if self.transposed:
            return np.asarray(self.slicer[index[::-1]]).T
        return np.asarray(self.slicer[index])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """The whole tensor (read at once)."""
        out = self[(slice(None),) * self.ndim]
        return out if dtype is None else out.astype(dtype)
