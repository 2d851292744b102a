"""MetaMathQA as a data source of the gsm8k task (the papers' LLaMA runs train on it): the
shipped sample in its format, the row mapping, its final-answer marker, and a run that trains on
it and evaluates on GSM8K."""

from __future__ import annotations

import json
import pathlib

import pytest

import jlora.data as jd
from jlora.data import metamath
from jlora.errors import DataError
from jlora.train import config as config_lib
from jlora.train import loop, tasks

ROOT = pathlib.Path(__file__).resolve().parent.parent
STORIES = ROOT / "tests" / "fixtures" / "stories260K" / "stories260K.bin"
RUN = {
    "task": "gsm8k",
    "model": {"source": str(STORIES)},
    "data": {
        "source": "data/metamathqa",
        "eval_source": "data/gsm8k",
        "eval_split": "test",
        "max_length": 256,
        "buckets": [256],
        "max_eval_examples": 2,
        "max_new_tokens": 4,
    },
    "adapter": {"method": "slora", "rank": 4},
    "train": {"steps": 3, "batch_size": 4, "eval_every": 0, "eval_batch_size": 2},
    "checkpoint": {"every": 0, "keep": 1},
}


def test_shipped_sample_is_gsm8k_in_metamathqa_format():
    rows = json.loads((jd.DATA_DIR / "metamathqa" / "train.json").read_text())
    gsm8k = jd.load_rows(jd.DATA_DIR / "gsm8k", "train")[: len(rows)]
    assert len(rows) == 100
    for row, ref in zip(rows, gsm8k, strict=True):
        assert set(row) == {"query", "response", "type", "original_question"}
        assert row["query"] == ref["question"]
        assert "<<" not in row["response"] and "####" not in row["response"]
        final = row["response"].rsplit("\n", 1)[1]
        assert final == f"The answer is: {ref['answer'].split('####')[1].strip()}"
        assert jd.extract_answer(row["response"]) == jd.extract_answer(ref["answer"])


def test_rows_read_as_gsm8k_and_eval_from_its_own_source():
    cfg = config_lib.from_dict(RUN)
    rows = tasks.read_data(cfg)
    assert len(rows["train"]) == 100 and len(rows["eval"]) == 2
    first = rows["train"][0]
    assert first["question"] == first["query"] and first["answer"] == first["response"]
    assert set(rows["eval"][0]) == {"question", "answer"}  # GSM8K's test split
    table = jd.Table("m.json", [{"query": "q", "response": "r", "type": "x"}])
    assert metamath.is_metamath(table)
    assert not metamath.is_metamath(jd.Table("g.json", [{"question": "q", "answer": "a"}]))
    assert not metamath.is_metamath(jd.Table("e.json", []))


def test_final_answer_marker():
    assert jd.extract_answer("6 + 1 = 7.\nThe answer is: 7") == "7"
    # The first number after the marker, whatever the model goes on to write.
    assert jd.extract_answer("The answer is: 12\n\nQuestion: 3 + 4?") == "12"
    assert jd.exact_match("... The answer is: 1,000", "#### 1000")


def test_a_response_without_a_final_answer_names_the_row(tmp_path):
    bad = [{"query": "1 + 1?", "response": "The answer is: 2"}, {"query": "x", "response": "no"}]
    (tmp_path / "train.json").write_text(json.dumps(bad))
    cfg = config_lib.from_dict({**RUN, "data": {**RUN["data"], "source": str(tmp_path)}})
    with pytest.raises(DataError, match=r"train\.json row 2: answer='no'.*The answer is: "):
        tasks.read_data(cfg)


def test_training_on_metamathqa_evaluates_on_gsm8k(tmp_path):
    summary = loop.run(config_lib.from_dict(RUN), tmp_path / "run", progress=False)
    assert summary["steps"] == 3 and "eval/exact_match" in summary
