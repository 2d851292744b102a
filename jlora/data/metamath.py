"""MetaMathQA (Yu et al. 2023; `meta-math/MetaMathQA` on the Hub): the math instruction data the
papers' LLaMA runs fine-tune on before they evaluate on GSM8K.

Its rows are `{"query", "response", "type", "original_question"}` (the Hub file is one JSON array,
`MetaMathQA-395K.json`, split "train"), and every response ends with `The answer is: <number>`.
The `gsm8k` task reads a table in this format as GSM8K rows, `question` = `query` and `answer` =
`response` (`as_gsm8k`), so prompt templates name `{question}` for both data sets and
`jlora.data.extract_answer` scores the `The answer is` marker like GSM8K's `####`.

Example:
  >>> from jlora.data.sources import Table
  >>> t = Table("m.json", [{"query": "1 + 1?", "response": "1 + 1 = 2.\\nThe answer is: 2"}])
  >>> is_metamath(t), as_gsm8k(t).rows[0]["answer"].splitlines()[-1]
  (True, 'The answer is: 2')
"""

from __future__ import annotations

from jlora.data.sources import Table

__all__ = ["FIELDS", "as_gsm8k", "is_metamath"]

# MetaMathQA column -> the GSM8K column the gsm8k task reads.
FIELDS = {"query": "question", "response": "answer"}


def is_metamath(table: Table) -> bool:
    """Whether `table` is in MetaMathQA's format: its first row has `query` and `response` and
    none of the GSM8K columns they stand for."""
    if not table.rows:
        return False
    row = table.rows[0]
    return all(k in row for k in FIELDS) and not any(v in row for v in FIELDS.values())


def as_gsm8k(table: Table) -> Table:
    """`table`'s rows with `question` and `answer` copied from `query` and `response` (the
    other columns kept), for the gsm8k task; rows and lines keep their order."""
    rows = [{**row, **{g: row.get(m) for m, g in FIELDS.items()}} for row in table.rows]
    return Table(table.origin, rows, table.lines)
