"""The E2E NLG task (issue 16): the LoRA recipe's MR linearization and example layout, MR
grouping of the evaluation data, the decoding settings in the config, and a train.py run end to
end on a tiny real model."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from jlora.data import e2e
from jlora.data.tasks import FIXTURES
from jlora.errors import ConfigError, DataError
from jlora.models.llama2c import Llama2cTokenizer
from jlora.train import config as config_lib
from jlora.train import loop, tasks

ROOT = pathlib.Path(__file__).resolve().parent.parent
STORIES = FIXTURES / "stories260K.bin"


@pytest.fixture(scope="module")
def tok():
    return Llama2cTokenizer(FIXTURES / "tok512.bin")


def test_linearize_renames_keys_and_keeps_order():
    mr = (
        "name[The Mill], eatType[restaurant], food[English], priceRange[more than £30], "
        "customer rating[high], area[city centre], familyFriendly[no], near[Café Rouge]"
    )
    # The line of microsoft/LoRA's data/e2e/test.txt for this MR, with its values untokenized.
    assert e2e.linearize(mr) == (
        "name : The Mill | Type : restaurant | food : English | price : more than £30 | "
        "customer rating : high | area : city centre | family friendly : no | near : Café Rouge"
    )
    assert e2e.parse_mr(" name[A] ,near[B C]") == [("name", "A"), ("near", "B C")]


@pytest.mark.parametrize("bad", ["", "The Vaults pub", "name[A] eatType[pub]", "name[A], pub"])
def test_parse_mr_refuses_what_is_no_mr(bad):
    with pytest.raises(ValueError, match=r"attribute\[value\] pairs|empty"):
        e2e.parse_mr(bad)


def test_examples_are_context_separator_completion(tok):
    rows = [{"mr": "name[Tom], eatType[pub]", "ref": "Tom is a pub."}]
    ex = e2e.encode_examples(rows, tok)[0]
    context = tok(["name : Tom | Type : pub"])["input_ids"][0]  # BOS first: the tokenizer's
    completion = tok([" Tom is a pub."])["input_ids"][0][1:]  # no BOS inside
    eos = tok.eos_token_id
    want = [*context, eos, *completion, eos]
    assert ex["input_ids"].tolist() == want
    # The loss covers the completion and its EOS only (gpt2_ft.py's mask).
    assert ex["loss_mask"].tolist() == [False] * (len(context) + 1) + [True] * (len(completion) + 1)
    prompt = e2e.encode_prompts([rows[0]["mr"]], tok)[0]
    assert prompt.tolist() == [*context, eos]
    # Cut at the end; a too-long prompt keeps its tail (the separator stays last).
    assert len(e2e.encode_examples(rows, tok, max_length=5)[0]["input_ids"]) == 5
    assert e2e.encode_prompts([rows[0]["mr"]], tok, max_length=3)[0].tolist()[-1] == eos


def _e2e_cfg(tmp_path=None, **data):
    raw = {
        "task": "e2e",
        "model": {"source": str(STORIES)},
        "data": {
            "source": "data/e2e",
            "train_split": "train",
            "eval_split": "dev",
            "max_length": 256,
            "buckets": [128, 256],
            "max_train_examples": 16,
            "max_eval_examples": 3,
            "max_new_tokens": 6,
            **data,
        },
        "adapter": {"method": "lora", "rank": 2, "targets": "attention"},
        "train": {"steps": 2, "batch_size": 4, "eval_every": 0, "eval_batch_size": 2},
        "checkpoint": {"every": 0, "keep": 1},
    }
    return config_lib.from_dict(raw)


def test_eval_rows_are_grouped_by_mr_and_counted_in_mrs():
    rows = tasks.read_data(_e2e_cfg(max_eval_examples=4))
    assert len(rows["train"]) == 16
    ev = rows["eval"]
    assert [len(r["refs"]) for r in ev] and len(ev) == 4
    assert len({r["mr"] for r in ev}) == 4
    # data/e2e/dev.csv holds each MR's references on consecutive lines, all of them kept.
    first = rows["eval"][0]
    assert first["mr"].startswith("name[Alimentum]") and all(
        isinstance(x, str) for x in first["refs"]
    )
    everything = tasks.read_data(_e2e_cfg(max_eval_examples=None))["eval"]
    assert len(everything) == 100 and sum(len(r["refs"]) for r in everything) == 804


def test_bad_e2e_data_is_named(tmp_path):
    (tmp_path / "train.csv").write_text('mr,ref\n"name[A], eatType[pub]",A is a pub.\nA pub,x\n')
    (tmp_path / "dev.csv").write_text("mr,text\nname[A],A.\n")
    with pytest.raises(DataError, match=r"train.csv line 3: mr='A pub'; expected attribute"):
        tasks.read_data(_e2e_cfg(source=str(tmp_path)))
    (tmp_path / "train.csv").write_text('mr,ref\n"name[A], eatType[pub]",A is a pub.\n')
    with pytest.raises(DataError, match=r"dev.csv line 2: no column 'ref'"):
        tasks.read_data(_e2e_cfg(source=str(tmp_path)))


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("num_beams", 0, "data.num_beams=0: expected an integer >= 1"),
        ("no_repeat_ngram_size", -1, "data.no_repeat_ngram_size=-1"),
        ("beam_style", "fairseq", "data.beam_style='fairseq': expected one of"),
        ("length_penalty", float("nan"), "data.length_penalty=nan"),
    ],
)
def test_decoding_settings_are_checked(field, value, message):
    with pytest.raises(ConfigError, match=message):
        _e2e_cfg(**{field: value})


@pytest.mark.optimized  # beam decoding runs long: optimized compiles (conftest)
def test_train_py_runs_e2e_end_to_end(tmp_path):
    """A tiny run: loss on the references, beam-search decoding per MR, the metrics reported
    (BLEU/NIST always; METEOR, ROUGE-L, CIDEr where Java is installed) and the outputs written."""
    cfg = _e2e_cfg(num_beams=2, length_penalty=0.8, no_repeat_ngram_size=2, beam_style="gpt2_beam")
    summary = loop.run(cfg, tmp_path / "run", progress=False)
    assert np.isfinite(summary["eval/BLEU"]) and summary["eval/NIST"] >= 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "predictions_step2.jsonl").open()]
    assert len(rows) == 3 and all(set(r) == {"mr", "output", "references"} for r in rows)
    assert rows[0]["mr"].startswith("name[Alimentum]") and len(rows[0]["references"]) >= 1


@pytest.mark.slow
def test_gpt2_e2e_run_with_the_papers_target(tmp_path, tiny_gpt2):
    """train.py's E2E task on a GPT-2 folder with the LoRA/NOLA recipe's target (`c_attn`)."""
    cfg = _e2e_cfg(num_beams=2, length_penalty=0.8, beam_style="gpt2_beam")
    cfg = config_lib.from_dict({**config_lib.to_dict(cfg), "model": {"source": str(tiny_gpt2)}})
    summary = loop.run(cfg, tmp_path / "run", progress=False)
    assert summary["trainable_params"] == 2 * 2 * (32 + 96)  # 2 layers x r 2 x (d + 3d)
    assert np.isfinite(summary["eval/BLEU"])
