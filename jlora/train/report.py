"""Run outputs: `metrics.jsonl` (one JSON object per line, `step` plus metric names, evaluation
metrics prefixed `eval/`), TensorBoard event files, and at the end `summary.json`, `report.md`
and `curves.png`.

On resume, lines of `metrics.jsonl` beyond the restored step (written after the last
checkpoint of the interrupted run) are dropped, so the file reads as one uninterrupted run.

Example:
  >>> import tempfile, pathlib, json
  >>> from jlora.train.report import Metrics
  >>> out = pathlib.Path(tempfile.mkdtemp())
  >>> m = Metrics(out, tensorboard=False)
  >>> m.write(10, {"loss": 0.5}); m.write(10, {"eval/accuracy": 0.9}); m.close()
  >>> [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  [{'step': 10, 'loss': 0.5}, {'step': 10, 'eval/accuracy': 0.9}]
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
from typing import Any

log = logging.getLogger(__name__)


class Metrics:
    """Appends metrics to `metrics.jsonl` and TensorBoard in the run folder."""

    def __init__(
        self, out: pathlib.Path, *, resume_step: int | None = None, tensorboard: bool = True
    ) -> None:
        self.path = out / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and _complete(line) and json.loads(line)["step"] <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = self.path.open("a")
        self.tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, step: int, values: dict[str, float]) -> None:
        row = {"step": int(step), **{k: float(v) for k, v in values.items()}}
        try:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        except OSError as e:  # name the file (a full disk's error does not)
            raise OSError(e.errno, e.strerror, str(self.path)) from e
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a write error was raised already by `write`
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _complete(line: str) -> bool:
    try:
        return "step" in json.loads(line)
    except json.JSONDecodeError:  # a line cut off by a kill
        return False


def read_metrics(out: pathlib.Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if _complete(line)]


def plot(out: pathlib.Path, rows: list[dict[str, Any]]) -> pathlib.Path | None:
    """`curves.png`: training loss, and each evaluation metric, against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = sorted({k for r in rows for k in r if k.startswith("eval/")})
    if not losses and not evals:
        return None
    fig, axes = plt.subplots(1, 1 + len(evals), figsize=(5 * (1 + len(evals)), 3.5))
    axes = [axes] if not evals else list(axes)
    if losses:
        axes[0].plot(*zip(*losses, strict=True))
    axes[0].set(title="training loss", xlabel="step")
    for ax, key in zip(axes[1:], evals, strict=True):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*pts, strict=True), marker="o")
        ax.set(title=key, xlabel="step")
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of summary rows (method, trainable params, eval metrics, wall time)."""
    keys = ["method", "trainable_params"]
    keys += sorted({k for r in rows for k in r if k.startswith("eval/")})
    keys += ["wall_time_s"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k, "")
            cells.append(
                f"{v:.4f}"
                if isinstance(v, float) and k.startswith("eval/")
                else f"{v:.1f}"
                if isinstance(v, float)
                else f"{v:,}"
                if isinstance(v, int)
                else str(v)
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out: pathlib.Path, summary: dict[str, Any], config_text: str) -> None:
    """`summary.json`, `report.md` and `curves.png` in the run folder."""
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    png = plot(out, read_metrics(out))
    parts = [
        f"# Run report: {summary.get('name', out.name)}",
        "",
        table([summary]),
        "",
    ]
    if png is not None:
        parts += [f"![training curves]({png.name})", ""]
    parts += ["## Resolved config", "", "```yaml", config_text.rstrip(), "```", ""]
    (out / "report.md").write_text("\n".join(parts))
