"""The E2E challenge's five metrics (`jlora.metrics.e2e`, `jlora.metrics.coco`): ROUGE-L and
CIDEr pinned to values worked out by hand, METEOR's end points, the missing-Java path, and the
shipped dev references (the dev set's first 100 MRs) scored against themselves and against a
trivial output, with BLEU/NIST equal to e2e-metrics' own Python mteval (its values on these
exact inputs, computed once with `metrics/pymteval.py` of github.com/tuetschek/e2e-metrics)."""

from __future__ import annotations

import csv
import math
import pathlib

import pytest

from jlora.metrics import coco, e2e

DEV = pathlib.Path(__file__).resolve().parent.parent / "data" / "e2e" / "dev.csv"
NEEDS_COCO = pytest.mark.skipif(coco.available() is not None, reason=str(coco.available()))


def test_group_references_keeps_first_appearance_order():
    rows = [("b", "1"), ("a", "2"), ("b", "3")]
    assert e2e.group_references(rows) == (["b", "a"], [["1", "3"], ["2"]])


def test_without_java_the_coco_metrics_are_missing_not_zero(monkeypatch, caplog):
    monkeypatch.setattr(coco.shutil, "which", lambda name: None)
    assert "no java on the PATH" in coco.available()
    got = e2e.scores(["a pub in the centre"], [["a pub in the city centre"]])
    assert got["METEOR"] is got["ROUGE_L"] is got["CIDEr"] is None
    assert got["BLEU"] > 0 and got["NIST"] > 0
    assert "METEOR, ROUGE_L and CIDEr are missing" in caplog.text
    with pytest.raises(ValueError, match=r"outputs \(2\) and references \(1\)"):
        coco.coco_scores(["a", "b"], [["a"]])


def _beta_f(p: float, r: float, beta: float = 1.2) -> float:
    return (1 + beta**2) * p * r / (r + beta**2 * p)


@pytest.mark.slow  # starts Java (the PTB tokenizer twice per call, METEOR once)
@NEEDS_COCO
def test_coco_metrics_hand_worked():
    # ROUGE-L: PTB tokens are lower-cased, punctuation dropped. Segment 1: LCS 3 of 3 output and
    # 6 reference tokens. Segment 2: "a pub the eagle" vs "the eagle is a pub" (LCS 2) and
    # "a pub called the eagle" (LCS 4): best precision 4/4 and recall 4/5, each over the refs.
    got = coco.coco_scores(
        ["the cat sat", "A pub, The Eagle."],
        [["the cat sat on the mat"], ["The Eagle is a pub.", "a pub called the eagle"]],
    )
    want = (_beta_f(1.0, 0.5) + _beta_f(1.0, 0.8)) / 2
    assert got["ROUGE_L"] == pytest.approx(want, rel=1e-12)
    # CIDEr-D: two segments, each n-gram in one of them: idf = log 2 for all, identical tf-idf
    # vectors for n = 1, 2 (similarity 1), none for n = 3, 4 (0), no length penalty: 10 · 2/4.
    got = coco.coco_scores(["a b", "c d"], [["a b"], ["c d"]])
    assert got["CIDEr"] == pytest.approx(5.0, rel=1e-12)
    assert got["ROUGE_L"] == got["METEOR"] == 1.0  # METEOR 1.5 gives an exact match 1
    # One segment: every document frequency is the corpus size, so every idf, and CIDEr, is 0;
    # no word in common: METEOR 0.
    got = coco.coco_scores(["x y z"], [["the cat sat"]])
    assert got == {"METEOR": 0.0, "ROUGE_L": 0.0, "CIDEr": 0.0}


@pytest.mark.slow  # starts METEOR's JVM twice (~5 s each)
@NEEDS_COCO
def test_one_meteor_process_serves_every_call_and_a_dead_one_is_replaced():
    args = (["the cat sat", "a dog"], [["the cat sat on the mat"], ["a dog", "the dog"]])
    first = coco.coco_scores(*args)
    process = coco._meteor.meteor_p
    assert coco.coco_scores(*args) == first and coco._meteor.meteor_p is process
    process.kill()
    process.wait()
    assert coco.coco_scores(*args) == first and coco._meteor.meteor_p is not process
    # A call that fails (as pycocoevalcap's do: its lock still held) ends its process and
    # raises; the next call starts another.
    meteor = coco._meteor

    def fails(gts, res):
        meteor.lock.acquire()
        raise RuntimeError("METEOR answered nonsense")

    meteor.compute_score = fails
    with pytest.raises(RuntimeError, match="nonsense"):
        coco.coco_scores(*args)
    assert coco._meteor is None and not meteor.lock.locked()
    assert meteor.meteor_p.wait(timeout=30) is not None
    assert coco.coco_scores(*args) == first


def _dev() -> tuple[list[str], list[list[str]]]:
    with DEV.open(encoding="utf-8", newline="") as f:
        return e2e.group_references((r["mr"], r["ref"]) for r in csv.DictReader(f))


def test_shipped_dev_sample_groups_into_100_mrs():
    mrs, refs = _dev()
    assert len(mrs) == 100 and sum(map(len, refs)) == 804


@pytest.mark.slow  # the COCO metrics over 100 segments (~30 s)
@pytest.mark.parametrize("system", ["first-reference", "trivial"])
def test_dev_references_against_themselves_and_a_trivial_output(system):
    """Each MR's first reference as the output scores BLEU 1 and METEOR = ROUGE-L = 1 (it is one
    of the references); a constant sentence scores near 0. BLEU and NIST are e2e-metrics'."""
    _, refs = _dev()
    if system == "first-reference":
        outputs = [r[0] for r in refs]
        want = {"BLEU": 1.0, "NIST": 12.242530973824433}
    else:
        outputs = ["There is a restaurant."] * len(refs)
        want = {"BLEU": 0.010588655293113848, "NIST": 0.00014333229582998936}
    got = e2e.scores(outputs, refs, with_coco=coco.available() is None)
    assert got["BLEU"] == pytest.approx(want["BLEU"], rel=1e-12)
    assert got["NIST"] == pytest.approx(want["NIST"], rel=1e-9)
    if coco.available() is not None:
        pytest.skip(coco.available())
    if system == "first-reference":
        assert got["METEOR"] == pytest.approx(1.0) and got["ROUGE_L"] == pytest.approx(1.0)
        assert got["CIDEr"] > 2.0  # CIDEr averages over each MR's ~8 references
    else:
        assert got["METEOR"] < 0.1 and got["ROUGE_L"] < 0.25 and got["CIDEr"] < 0.1
    assert all(math.isfinite(v) for v in got.values())
