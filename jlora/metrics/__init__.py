"""Evaluation metrics computed as the papers' official scripts compute them.

- `mteval`: BLEU and NIST as the E2E NLG Challenge's `e2e-metrics` (its Python port of
  mteval-v13a): mteval tokenization, corpus-level counts, several references per segment.
"""

from jlora.metrics import mteval

__all__ = ["mteval"]
