"""Fixed-shape, length-bucketed batches with deterministic, resumable shuffling.

Every batch has `batch_size` rows and a length from `buckets` (the smallest bucket that holds the
batch's longest example), so a jitted step compiles at most `len(buckets)` times. Batch keys are
those of `jlora.data.collate.collate`: `input_ids`, `attention_mask`, `label` / `loss_mask` when
the examples have them, `weight` (0 on dummy rows) and `index`.

Order per epoch, from `numpy.random.default_rng([seed, epoch])` alone:

1. a permutation of the examples (with `drop_last`, its last `len % batch_size` are left out);
2. within consecutive windows of `window * batch_size` examples, a stable sort by length, cut
   into batches (so a batch holds examples of similar length);
3. a permutation of the batch order.

Without `shuffle` the examples come in their given order, `batch_size` at a time. The state is
`{"epoch", "position"}` (batches consumed in the epoch); a Batcher restored from it yields
exactly the batches an uninterrupted one would have.

Example:
  >>> import numpy as np
  >>> examples = [{"input_ids": np.arange(1, n + 1), "label": n % 2} for n in range(1, 21)]
  >>> batcher = Batcher(examples, batch_size=4, buckets=(8, 16, 32), seed=0)
  >>> batcher.num_batches_per_epoch, next(iter(batcher))["input_ids"].shape[0]
  (5, 4)
  >>> batcher.state()
  {'epoch': 0, 'position': 1}
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from jlora.data.collate import PADDING_SIDES, bucket_length, collate

_OPTIONAL_KEYS = ("label", "loss_mask")


class Batcher:
    """Fixed-shape numpy batches of encoded examples; see the module docstring.

    Args:
      examples: dicts with `input_ids` (int[n], 1 <= n <= max(buckets)) and optionally `label`
        and `loss_mask` (bool[n]), the same optional keys in every example.
      batch_size: rows per batch, also of the last partial batch (filled with dummy rows of
        weight 0) when `drop_last` is False.
      buckets: the allowed padded lengths.
      pad_id: token id of the padding.
      shuffle: shuffle and group by length per epoch; False keeps the given order.
      seed: a non-negative int; the order of epoch e depends on (seed, e) only.
      drop_last: leave out the examples that do not fill a last batch (training); False keeps
        them in a last batch padded with dummy rows (evaluation).
      repeat: iterate forever across epochs (training); False: to the end of the current epoch.
      window: batches per length-sorting window (1: no grouping by length).
      padding_side: "right", or "left" for prompts to generate from.

    Example:
      >>> import numpy as np
      >>> ex = [{"input_ids": np.ones(n, np.int32)} for n in (3, 5, 9)]
      >>> eval_batches = list(Batcher(ex, batch_size=2, buckets=(8, 16), shuffle=False,
      ...                             drop_last=False, repeat=False))
      >>> [b["input_ids"].shape for b in eval_batches], eval_batches[-1]["weight"].tolist()
      ([(2, 8), (2, 16)], [1.0, 0.0])
    """

    def __init__(
        self,
        examples: Sequence[Mapping[str, Any]],
        *,
        batch_size: int,
        buckets: Sequence[int] = (32, 64, 128, 256),
        pad_id: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        repeat: bool = True,
        window: int = 50,
        padding_side: str = "right",
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size {batch_size!r}: expected a positive int")
        if not buckets or any(not isinstance(b, int) or b < 1 for b in buckets):
            raise ValueError(f"buckets {buckets!r}: expected positive int lengths")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed {seed!r}: expected a non-negative int")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window {window!r}: expected a positive int")
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side {padding_side!r}: expected one of {PADDING_SIDES}")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.buckets = tuple(sorted(set(buckets)))
        self.pad_id = pad_id
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.repeat = repeat
        self.window = window
        self.padding_side = padding_side
        self.lengths = self._check_examples()
        if self.num_batches_per_epoch == 0:
            raise ValueError(
                f"examples: {len(self.examples)} with batch_size {batch_size} and drop_last=True "
                f"make no full batch; pass fewer rows per batch or drop_last=False"
            )
        self._epoch, self._position = 0, 0
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def _check_examples(self) -> np.ndarray:
        if not self.examples:
            raise ValueError("examples: empty; expected at least one encoded example")
        keys = {k for k in _OPTIONAL_KEYS if k in self.examples[0]}
        lengths = np.empty(len(self.examples), np.int64)
        for i, ex in enumerate(self.examples):
            if "input_ids" not in ex:
                raise ValueError(f"examples[{i}]: no 'input_ids'; keys are {sorted(ex)}")
            if {k for k in _OPTIONAL_KEYS if k in ex} != keys:
                raise ValueError(
                    f"examples[{i}]: optional keys {sorted(k for k in _OPTIONAL_KEYS if k in ex)} "
                    f"differ from examples[0]'s {sorted(keys)}"
                )
            n = len(ex["input_ids"])
            if not 1 <= n <= self.buckets[-1]:
                raise ValueError(
                    f"examples[{i}]: input_ids has {n} tokens; expected 1 to the largest bucket "
                    f"{self.buckets[-1]} (truncate upstream with max_length, or add a bucket)"
                )
            if "loss_mask" in ex and len(ex["loss_mask"]) != n:
                raise ValueError(
                    f"examples[{i}]: loss_mask has {len(ex['loss_mask'])} entries for {n} tokens"
                )
            lengths[i] = n
        return lengths

    @property
    def num_batches_per_epoch(self) -> int:
        """Batches in one epoch: len // batch_size with drop_last, else rounded up."""
        n, b = len(self.examples), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def batch_indices(self, epoch: int) -> list[np.ndarray]:
        """Example indices of every batch of `epoch`, in order (a short last one unfilled).

        Example:
          >>> import numpy as np
          >>> b = Batcher([{"input_ids": [1]}] * 5, batch_size=2, buckets=(4,), shuffle=False)
          >>> [x.tolist() for x in b.batch_indices(0)]
          [[0, 1], [2, 3]]
        """
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        n, bs = len(self.examples), self.batch_size
        keep = n - n % bs if self.drop_last else n
        if not self.shuffle:
            order = np.arange(keep)
            batches = [order[i : i + bs] for i in range(0, keep, bs)]
        else:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(n)[:keep]
            batches = []
            step = self.window * bs
            for start in range(0, keep, step):
                chunk = perm[start : start + step]
                chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
                batches += [chunk[i : i + bs] for i in range(0, len(chunk), bs)]
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cache = (epoch, batches)
        return batches

    def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The padded batch of the examples at `indices` (at most batch_size of them)."""
        length = bucket_length(int(self.lengths[indices].max()), self.buckets)
        return collate(
            [self.examples[i] for i in indices],
            length=length,
            batch_size=self.batch_size,
            pad_id=self.pad_id,
            padding_side=self.padding_side,
            indices=indices,
        )

    def state(self) -> dict[str, int]:
        """`{"epoch", "position"}`: where the next batch comes from (position = batches done)."""
        if self._position >= self.num_batches_per_epoch:
            return {"epoch": self._epoch + 1, "position": 0}
        return {"epoch": self._epoch, "position": self._position}

    def restore(self, state: Mapping[str, int]) -> None:
        """Continue from a `state()`: the next batch is the one that followed it.

        Example:
          >>> import numpy as np
          >>> ex = [{"input_ids": np.ones(n % 7 + 1, np.int32)} for n in range(40)]
          >>> a, b = (Batcher(ex, batch_size=4, buckets=(8,)) for _ in range(2))
          >>> it = iter(a); _ = [next(it) for _ in range(13)]
          >>> b.restore(a.state())
          >>> bool((next(iter(b))["index"] == next(it)["index"]).all())
          True
        """
        epoch, position = state.get("epoch"), state.get("position")
        if not isinstance(epoch, int | np.integer) or epoch < 0:
            raise ValueError(f"state['epoch'] {epoch!r}: expected a non-negative int")
        nb = self.num_batches_per_epoch
        if not isinstance(position, int | np.integer) or not 0 <= position <= nb:
            raise ValueError(f"state['position'] {position!r}: expected an int in 0..{nb}")
        self._epoch, self._position = int(epoch), int(position)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Batches from the current state: forever with `repeat`, else to the epoch's end."""
        first = self.state()["epoch"]
        while True:
            self._epoch, self._position = self.state()["epoch"], self.state()["position"]
            if not self.repeat and self._epoch != first:
                return
            indices = self.batch_indices(self._epoch)[self._position]
            self._position += 1
            yield self.batch(indices)
