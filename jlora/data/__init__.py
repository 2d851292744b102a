"""Data for scripted fine-tuning: rows from files or the Hub, task encoders, fixed-shape batches.

- `load_rows(source, split)`: rows (dicts) of a local .tsv/.csv/.jsonl/.json file or folder, or
  a Hub data set (`glue/sst2`, `openai/gsm8k`); `DATA_DIR` holds the shipped samples;
  `load_table` gives them as a `Table` that knows each row's file and line;
- `checks`: rows against what a task reads (columns, labels, GSM8K final answers); problems
  with the data are `jlora.errors.DataError`s naming the file and line;
- `encode_classification`, `encode_sft`, `encode_prompts`: rows to token arrays;
- `extract_answer`, `exact_match`: GSM8K final-answer scoring (values); `harness`: the same
  scored as lm-evaluation-harness's `gsm8k` task (strict-match, flexible-extract);
- `Batcher`: length-bucketed, fixed-shape numpy batches with resumable shuffling;
- `collate`, `next_token_targets`: padding and the shifted causal-LM targets.

Example:
  >>> import jlora.data as jd
  >>> from jlora.models.llama2c import Llama2cTokenizer
  >>> tok = Llama2cTokenizer(jd.tasks.FIXTURES / "tok512.bin")
  >>> rows = jd.load_rows(jd.DATA_DIR / "sst2", "dev")[:10]
  >>> batcher = jd.Batcher(jd.encode_classification(rows, tok), batch_size=4, buckets=(64, 128))
  >>> batch = next(iter(batcher))
  >>> sorted(batch), batch["input_ids"].shape[0]
  (['attention_mask', 'index', 'input_ids', 'label', 'weight'], 4)
"""

from jlora.data import checks, harness, tasks
from jlora.data.batching import Batcher
from jlora.data.collate import bucket_length, collate, next_token_targets
from jlora.data.gsm8k import exact_match, extract_answer, normalize_number
from jlora.data.sources import DATA_DIR, Table, load_rows, load_table
from jlora.data.tasks import encode_classification, encode_prompts, encode_sft

__all__ = [
    "DATA_DIR",
    "Batcher",
    "Table",
    "bucket_length",
    "checks",
    "collate",
    "encode_classification",
    "encode_prompts",
    "encode_sft",
    "exact_match",
    "extract_answer",
    "harness",
    "load_rows",
    "load_table",
    "next_token_targets",
    "normalize_number",
    "tasks",
]
