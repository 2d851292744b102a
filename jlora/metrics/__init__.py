"""Evaluation metrics computed as the papers' official scripts compute them.

- `mteval`: BLEU and NIST as the E2E NLG Challenge's `e2e-metrics` (its Python port of
  mteval-v13a): mteval tokenization, corpus-level counts, several references per segment;
- `coco`: METEOR, ROUGE-L and CIDEr through the COCO caption code (`pycocoevalcap`, Java), as
  `e2e-metrics` runs it;
- `e2e`: the five together, references grouped by meaning representation.
"""

from jlora.metrics import coco, e2e, mteval

__all__ = ["coco", "e2e", "mteval"]
