"""Task glue between data, model and loop: SST-2-style sequence classification, GSM8K-style
supervised fine-tuning of a decoder (loss on the answer; evaluation by greedy generation and
exact match of the final number), and E2E NLG (meaning representation to text, the LoRA
recipe's format: `jlora.data.e2e`; evaluation by decoding once per MR and the challenge's five
metrics: `jlora.metrics.e2e`).

Each task gives the loop its batches, its loss `(trainable, frozen, batch, rng) -> loss` and
its evaluation `(params, adapters) -> {metric: value}`. `read_data(cfg)` reads and checks the
raw rows first (columns, labels in `SST2_LABELS`, GSM8K `#### <number>` answers), so that bad
data is a one-line `jlora.errors.DataError` before the model loads; `build_data` takes those
rows to encode them with the model's tokenizer.

Example:
  >>> from jlora.train.tasks import cross_entropy
  >>> import jax.numpy as jnp
  >>> round(float(cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))), 4)
  1.3863
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import string
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import data as jdata
from jlora.data import checks, e2e, harness, metamath
from jlora.errors import ConfigError
from jlora.linen.attach import attach
from jlora.linen.inject import inject
from jlora.metrics import e2e as e2e_metrics
from jlora.models import scan
from jlora.models.generate import generate
from jlora.train.distributed import to_host

log = logging.getLogger(__name__)

HEAD_MODULES = ("pooler", "classifier")
# SST-2's classes: the classification head has len(SST2_LABELS) outputs.
SST2_LABELS = (0, 1)


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    weights: jax.Array | None = None,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """Mean token/example cross-entropy in float32 (weighted mean when `weights` is given).

    With `label_smoothing` ε the target is (1 − ε)·one-hot + ε/C, as PyTorch's
    `cross_entropy(label_smoothing=ε)`: loss = (1 − ε)·nll + ε·mean over classes of −log p.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
    if weights is None:
        return jnp.mean(nll)
    w = weights.astype(jnp.float32)
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


@dataclasses.dataclass
class TaskData:
    train: jdata.Batcher
    eval: Any  # a Batcher (classification) or a list of (prompt ids, reference) (generation)
    train_examples: list
    micro_batch_size: int
    buckets: tuple[int, ...]
    pad_id: int

    def prepass_batches(self, seed: int) -> jdata.Batcher:
        """An independent shuffle of the training data (GoRA's pre-pass)."""
        return jdata.Batcher(
            self.train_examples,
            batch_size=self.micro_batch_size,
            buckets=self.buckets,
            pad_id=self.pad_id,
            seed=seed,
        )


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return int(pad or 0)


def _template_fields(template: str) -> list[str]:
    """The row fields a prompt template's placeholders read (`{question}` -> `question`)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"data.prompt_template={template!r}: {e}") from None
    names = [field.split(".")[0].split("[")[0] for _, field, _, _ in parsed if field is not None]
    if not all(n.isidentifier() for n in names):
        raise ConfigError(
            f"data.prompt_template={template!r}: placeholders must name row fields, "
            "like {question}"
        )
    return list(dict.fromkeys(names))


def required_columns(cfg: Any) -> tuple[str, ...]:
    """The columns the task reads from every row: SST-2 `sentence`, `label`; GSM8K the prompt
    template's fields (`question`) and `answer`."""
    if cfg.task == "sst2":
        return ("sentence", "label")
    if cfg.task == "e2e":
        return ("mr", "ref")
    return (*_template_fields(cfg.data.prompt_template), "answer")


def check_table(cfg: Any, table: jdata.Table, *, train: bool) -> None:
    """Raise `DataError` for the first row of `table` the task cannot use: a missing column, an
    SST-2 label outside `SST2_LABELS`, a GSM8K answer without a final answer (`#### <number>`
    for training rows, any number for evaluation references), an E2E `mr` that is no meaning
    representation."""
    checks.require_columns(table, required_columns(cfg), reader=f"task {cfg.task!r}")
    if cfg.task == "sst2":
        checks.check_labels(table, "label", SST2_LABELS)
    elif cfg.task == "e2e":
        checks.check_meaning_representations(table, "mr")
    else:
        checks.check_final_answers(table, "answer", marker=train)


def read_data(cfg: Any) -> dict[str, list[dict[str, Any]]]:
    """`{"train": rows, "eval": rows}` of `cfg.data`'s splits, cut to `max_train_examples` /
    `max_eval_examples` and checked against the task (`check_table`). E2E evaluation rows are
    grouped by MR, `{"mr": ..., "refs": [...]}`, and `max_eval_examples` counts MRs.

    Needs no model or tokenizer: call it before loading the model so that bad data fails fast,
    then pass the result to `build_data(..., rows=...)`.
    """
    d = cfg.data
    out = {}
    for role, source, split, limit in (
        ("train", d.source, d.train_split, d.max_train_examples),
        ("eval", d.eval_source or d.source, d.eval_split, d.max_eval_examples),
    ):
        table = jdata.load_table(source, split)
        if not (cfg.task == "e2e" and role == "eval"):
            table = table.head(limit)
        if cfg.task == "gsm8k" and metamath.is_metamath(table):
            table = metamath.as_gsm8k(table)
        check_table(cfg, table, train=role == "train")
        out[role] = table.rows
        if cfg.task == "e2e" and role == "eval":
            mrs, refs = e2e_metrics.group_references((r["mr"], r["ref"]) for r in table.rows)
            out[role] = [{"mr": m, "refs": r} for m, r in zip(mrs, refs, strict=True)][:limit]
    return out


def build_data(
    cfg: Any, tokenizer: Any, seed: int, rows: Mapping[str, list[dict[str, Any]]] | None = None
) -> TaskData:
    """The task's encoded, batched train and eval data.

    `rows` is `read_data(cfg)`'s result when the caller read the data before loading the model;
    None reads (and checks) it here.
    """
    d, t = cfg.data, cfg.train
    rows = read_data(cfg) if rows is None else rows
    train_rows, eval_rows = rows["train"], rows["eval"]
    micro = t.batch_size // t.grad_accum
    pad = _pad_id(tokenizer)
    if cfg.task == "sst2":
        enc = dict(max_length=d.max_length)
        train = jdata.encode_classification(train_rows, tokenizer, **enc)
        ev = jdata.encode_classification(eval_rows, tokenizer, **enc)
        eval_batches = jdata.Batcher(
            ev,
            batch_size=t.eval_batch_size,
            buckets=d.buckets,
            pad_id=pad,
            shuffle=False,
            drop_last=False,
            repeat=False,
        )
    else:
        if cfg.task == "e2e":
            train = e2e.encode_examples(train_rows, tokenizer, max_length=d.max_length)
        else:
            train = jdata.encode_sft(
                train_rows, tokenizer, prompt_template=d.prompt_template, max_length=d.max_length
            )
        kept = [ex for ex in train if ex["loss_mask"].any()]
        if len(kept) < len(train):
            log.warning(
                "%d of %d training examples lost their whole answer to data.max_length=%d; dropped",
                len(train) - len(kept),
                len(train),
                d.max_length,
            )
        if not kept:
            raise ConfigError(
                f"data.max_length={d.max_length}: every training answer is cut off; raise it"
            )
        train = kept
        if cfg.task == "e2e":
            prompts = e2e.encode_prompts(
                [r["mr"] for r in eval_rows], tokenizer, max_length=d.max_length
            )
            eval_batches = [
                {"input_ids": ids, "mr": r["mr"], "references": r["refs"]}
                for ids, r in zip(prompts, eval_rows, strict=True)
            ]
        else:
            eval_batches = jdata.encode_prompts(
                eval_rows, tokenizer, prompt_template=d.prompt_template, max_length=d.max_length
            )
    train_batches = jdata.Batcher(
        train, batch_size=micro, buckets=d.buckets, pad_id=pad, shuffle=True, seed=seed
    )
    return TaskData(train_batches, eval_batches, train, micro, tuple(d.buckets), pad)


def variables(model: Any, params: Any, adapters: Any) -> dict[str, Any]:
    """What `model.apply` takes under `jlora.inject(adapters)`: `{"params": params}`, with the
    adapters' leaves attached to their layers when the layers are scanned
    (`model.scan_layers`), so that the scan slices them per layer (`jlora.linen.attach`)."""
    if getattr(model, "scan_layers", False) and adapters:
        return attach({"params": params}, adapters)
    return {"params": params}


def loss_fn(cfg: Any, model: Any) -> Callable[..., jax.Array]:
    """`loss(params, adapters, batch, rng)`; `params` already holds the trained head."""
    smoothing = cfg.train.label_smoothing

    def classification(params, adapters, batch, rng):
        with inject(adapters, rng=rng):
            logits = model.apply(
                variables(model, params, adapters), batch["input_ids"], batch["attention_mask"]
            )
        return cross_entropy(logits, batch["label"], label_smoothing=smoothing)

    def causal_lm(params, adapters, batch, rng):
        with inject(adapters, rng=rng):
            logits = model.apply(
                variables(model, params, adapters), batch["input_ids"], batch["attention_mask"]
            )
        # Position i predicts token i+1; loss_mask marks answer tokens (targets).
        targets = batch["input_ids"][:, 1:]
        weights = batch["loss_mask"][:, 1:]
        return cross_entropy(logits[:, :-1], targets, weights, label_smoothing=smoothing)

    return classification if cfg.task == "sst2" else causal_lm


def evaluate(
    cfg: Any,
    model: Any,
    tokenizer: Any,
    data: TaskData,
    params: Any,
    adapters: Any,
    predictions: pathlib.Path | None = None,
) -> dict[str, float]:
    """`{"accuracy": ...}` (classification); for GSM8K, `{"exact_match": ...}` (jlora's value
    comparison, `jlora.data.exact_match`) with lm-evaluation-harness's strict-match and
    flexible-extract scores of the same generations (`harness_strict`, `harness_flexible`;
    `jlora.data.harness`); for E2E, the challenge's `BLEU`, `NIST`, `METEOR`, `ROUGE_L` and
    `CIDEr` (`jlora.metrics.e2e`; the last three are left out, with a warning, where Java or
    pycocoevalcap is missing).

    `predictions`, for the generation tasks, is a JSON-lines file to write each prompt's output
    to, with its references (`{"mr", "output", "references"}` for E2E, `{"prompt", "output",
    "reference"}` for GSM8K): E2E's can be scored by the challenge's own script."""
    if cfg.task == "sst2":
        return {"accuracy": _accuracy(model, data.eval, params, adapters)}
    texts = generate_texts(cfg, model, tokenizer, data.eval, params, adapters)
    for p, text in list(zip(data.eval, texts, strict=True))[:2]:
        log.info("generated: %r -> %r", tokenizer.decode(p["input_ids"])[-80:], text[:200])
    if predictions is not None:
        _write_predictions(predictions, cfg, tokenizer, data.eval, texts)
    if cfg.task == "e2e":
        scores = e2e_metrics.scores(texts, [p["references"] for p in data.eval])
        missing = [k for k, v in scores.items() if v is None]
        if missing:
            log.warning(
                "E2E %s not computed: they need Java and pycocoevalcap (apt-get install "
                "default-jre-headless; pip install pycocoevalcap)",
                ", ".join(missing),
            )
        return {k: v for k, v in scores.items() if v is not None}
    references = [p["reference"] for p in data.eval]
    hits = sum(jdata.exact_match(t, r) for t, r in zip(texts, references, strict=True))
    # lm-evaluation-harness's scoring of the same generations (`jlora.data.harness`): its
    # numbers when the prompt is its zero-shot one, "Question: {question}\nAnswer:".
    lm_eval = harness.accuracy(texts, references)
    return {
        "exact_match": hits / max(len(texts), 1),
        "harness_strict": lm_eval["strict-match"],
        "harness_flexible": lm_eval["flexible-extract"],
    }


def _write_predictions(
    path: pathlib.Path, cfg: Any, tokenizer: Any, prompts: list[dict], texts: list[str]
) -> None:
    lines = []
    for p, text in zip(prompts, texts, strict=True):
        if cfg.task == "e2e":
            row = {"mr": p["mr"], "output": text, "references": p["references"]}
        else:
            prompt = tokenizer.decode([int(i) for i in p["input_ids"]])
            row = {"prompt": prompt, "output": text, "reference": p["reference"]}
        lines.append(json.dumps(row, ensure_ascii=False))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)  # never a half-written file


@jax.jit
def _correct(logits: jax.Array, labels: jax.Array, weight: jax.Array) -> jax.Array:
    return jnp.sum((jnp.argmax(logits, -1) == labels) * weight)


def _accuracy(model: Any, batches: Any, params: Any, adapters: Any) -> float:
    @jax.jit
    def predict(params, adapters, ids, mask):
        with inject(adapters):
            return model.apply(variables(model, params, adapters), ids, mask)

    correct = total = 0.0
    batches.restore({"epoch": 0, "position": 0})
    for batch in batches:
        logits = predict(params, adapters, batch["input_ids"], batch["attention_mask"])
        correct += float(to_host(_correct(logits, batch["label"], batch["weight"])))
        total += float(np.sum(batch["weight"]))
    return correct / max(total, 1.0)


def generate_texts(
    cfg: Any, model: Any, tokenizer: Any, prompts: list[dict], params: Any, adapters: Any
) -> list[str]:
    """The decoded continuation of each prompt (`{"input_ids": ...}`), generated with the
    config's decoding settings (`data.max_new_tokens`, `num_beams`, `length_penalty`,
    `no_repeat_ngram_size`, `beam_style`) in left-padded batches of `train.eval_batch_size`,
    stopping at the tokenizer's EOS or a `data.stop_tokens` id (not part of the text)."""
    if getattr(model, "scan_layers", False):  # generation needs per-layer key/value caches
        where = scan.layers_of(model)
        model, params = scan.unscanned(model, params)
        adapters = scan.unstack_adapters(adapters, *where)
    d = cfg.data
    bs, pad = cfg.train.eval_batch_size, _pad_id(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    stops = [int(t) for t in ([] if eos is None else [eos]) + list(d.stop_tokens)]
    texts: list[str] = []
    for start in range(0, len(prompts), bs):
        chunk = prompts[start : start + bs]
        width = max(len(p["input_ids"]) for p in chunk)
        width = min(b for b in d.buckets if b >= width) if width <= max(d.buckets) else width
        n = len(chunk)
        ids = np.full((bs, width), pad, np.int32)
        mask = np.zeros((bs, width), np.int32)
        for i, p in enumerate(chunk):  # left padding, as generation expects
            ids[i, width - len(p["input_ids"]) :] = p["input_ids"]
            mask[i, width - len(p["input_ids"]) :] = 1
        mask[n:, -1] = 1  # dummy rows: one real token so they stay well defined
        out = generate(
            model,
            params,
            ids,
            mask,
            max_new_tokens=d.max_new_tokens,
            adapters=adapters,
            stop_tokens=stops,
            pad_token_id=pad,
            num_beams=d.num_beams,
            length_penalty=d.length_penalty,
            no_repeat_ngram_size=d.no_repeat_ngram_size,
            beam_style=d.beam_style,
        )
        out = to_host(out)[:, width:]
        for i in range(n):
            row = [int(x) for x in out[i]]
            end = next((j for j, x in enumerate(row) if x in stops), len(row))
            row = row[:end]  # without the stop token and the padding after it
            text = tokenizer.decode([x for x in row if x != pad])
            if cfg.task == "e2e":  # gpt2_decode.py: the text up to a blank line
                text = text.split("\n\n")[0]
            texts.append(text.strip())
    return texts
