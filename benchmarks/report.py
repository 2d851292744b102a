"""Tables, the targets check and the chart of a benchmark run."""

from __future__ import annotations

import pathlib
from typing import Any

from benchmarks import common


def _r(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}×"


def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target of BENCHMARKS.md with its measured value and whether it is met."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float, kind: str = "<=", fmt: str = "×"):
        if value is None:
            return
        ok = value <= limit if kind == "<=" else value >= limit
        shown = f"{value:.3g}{fmt}" if fmt else f"{value:.3g}"
        out.append(
            {"target": name, "measured": shown, "limit": f"{kind} {limit:g}{fmt}", "met": ok}
        )

    steps = [r for r in rows if r.get("section") == "step"]
    for w in dict.fromkeys(r["workload"] for r in steps):

        def ratio(variant: str, key: str = "vs_floor", w: str = w) -> float | None:
            r = _find(steps, workload=w, variant=variant)
            return None if r is None else r.get(key)

        for m in ("lora", "slora", "nlora"):
            add(f"{w}: {m} step / floor", ratio(m), 1.15)
        add(f"{w}: inttune step / floor", ratio("inttune"), 1.10)
        add(f"{w}: nola (cached) step / lora step", ratio("nola (cached bases)", "vs_lora"), 1.3)
        add(
            f"{w}: gora pre-pass / plain fwd+bwd",
            ratio("gora pre-pass (per micro-batch)", "vs_plain"),
            1.2,
        )
        pre = _find(steps, workload=w, variant="gora pre-pass (per micro-batch)")
        plain = _find(steps, workload=w, variant="plain fwd+bwd")
        if pre and plain:
            # Activations of one micro-batch: the temporaries of a plain forward+backward (its
            # full gradient is an output, not a temporary).
            budget = sum(pre["memory_budget"].values()) + plain["memory"]["temporaries"]
            add(
                f"{w}: gora pre-pass peak / (params + fp32 kernels + activations)",
                pre["memory"]["peak"] / budget,
                1.0,
            )
        first = max(r["compilations"] for r in steps if r["workload"] == w)
        add(f"{w}: programs compiled by a step's first call (max)", float(first), 1, fmt="")
        rec = max(r["recompilations_while_timed"] for r in steps if r["workload"] == w)
        add(f"{w}: recompilations over the timed steps", float(rec), 0, fmt="")

    init = [r for r in rows if r.get("section") == "init"]
    big = _find(init, shape="4096x4096", rank=128, method="nlora")
    if big:
        add(
            "nlora init speed-up over pissa full SVD (4096², r=128)",
            big.get("speedup_vs_pissa full SVD"),
            1000,
            ">=",
        )
        add(
            "nlora init speed-up over pissa rsvd niter 4 (4096², r=128)",
            big.get("speedup_vs_pissa rsvd niter 4"),
            10,
            ">=",
        )
    sk = _find(init, shape="4096x4096", rank=128, method="nlora random vs K@Ω + Ψᵀ@K")
    if sk:
        add("nlora random init / (K@Ω + Ψᵀ@K) (4096², r=128)", sk["vs_products"], 2.0)

    for r in rows:
        peft_jlora = r.get("section") == "peft" and r.get("contender") == "jlora"
        if peft_jlora and r.get("setting", "").startswith("lora"):
            add(f"jlora / PEFT: {r['setting']} step", r.get("jlora_vs_peft"), 1.0)
    return out


def text(rows: list[dict[str, Any]]) -> str:
    """All tables of a run, Markdown."""
    parts = []
    init = [r for r in rows if r.get("section") == "init" and "vs_products" not in r]
    if init:
        parts.append("### a. Init cost per target matrix (warm call; first call compiles)\n")
        parts.append(
            common.table(
                [
                    {
                        **r,
                        "t": common.fmt_s(r["median_s"]),
                        "first": common.fmt_s(r.get("first_call_s")),
                        "note": f"same SVD as r={r['shared_with_rank']}"
                        if "shared_with_rank" in r
                        else "one call (compile included)"
                        if r.get("calls") == 0
                        else "",
                        "x_full": _r(r.get("speedup_vs_pissa full SVD"), 0),
                        "x_r4": _r(r.get("speedup_vs_pissa rsvd niter 4"), 0),
                    }
                    for r in init
                ],
                [
                    ("shape", "shape"),
                    ("rank", "r"),
                    ("method", "method"),
                    ("t", "time"),
                    ("first", "first call"),
                    ("x_full", "nlora speed-up vs full SVD"),
                    ("x_r4", "vs rsvd niter 4"),
                    ("note", "note"),
                ],
            )
        )
    sk = [r for r in rows if "vs_products" in r]
    if sk:
        parts.append("\n### a. Random-sketch Nyström init vs its two products (alternated)\n")
        parts.append(
            common.table(
                [
                    {
                        **r,
                        "t": common.fmt_s(r["median_s"]),
                        "p": common.fmt_s(r["products_s"]),
                        "x": _r(r["vs_products"]),
                    }
                    for r in sk
                ],
                [
                    ("shape", "shape"),
                    ("rank", "r"),
                    ("t", "nlora random init"),
                    ("p", "K@Ω + Ψᵀ@K"),
                    ("x", "ratio"),
                ],
            )
        )
    whole = [r for r in rows if r.get("section") == "init-model"]
    if whole:
        parts.append("\n### a. Whole-model init\n")
        parts.append(
            common.table(
                [
                    {
                        **r,
                        "t": common.fmt_s(r["median_s"]),
                        "first": common.fmt_s(r.get("first_call_s", r.get("first_layer_s"))),
                        "note": "estimated from per-matrix times"
                        if r.get("estimated_from_per_matrix")
                        else f"{r['layers_measured']} layers measured, extrapolated"
                        if r.get("extrapolated")
                        else "",
                    }
                    for r in whole
                ],
                [
                    ("model", "model"),
                    ("rank", "r"),
                    ("method", "method"),
                    ("t", "time (warm)"),
                    ("first", "first call / layer (compiles)"),
                    ("note", "note"),
                ],
            )
        )
    steps = [r for r in rows if r.get("section") == "step"]
    if steps:
        parts.append("\n### b. Training-step cost (median of alternated rounds)\n")
        parts.append(
            common.table(
                [
                    {
                        **r,
                        "t": common.fmt_s(r["median_s"]),
                        "f": _r(r["vs_floor"]),
                        "l": _r(r["vs_lora"]),
                        "mem": common.fmt_bytes(r["memory"]["peak"]),
                        "c": common.fmt_s(r["compile_s"]),
                        "tr": r.get("trainable", "—"),
                    }
                    for r in steps
                ],
                [
                    ("workload", "workload"),
                    ("variant", "step"),
                    ("t", "time"),
                    ("f", "/ floor"),
                    ("l", "/ lora"),
                    ("mem", "XLA peak"),
                    ("tr", "trainable"),
                    ("c", "first call"),
                    ("compilations", "programs compiled"),
                ],
            )
        )
    peft = [r for r in rows if r.get("section") == "peft"]
    if peft:
        parts.append("\n### c. Side by side with PEFT (PyTorch CPU, alternated)\n")
        if "skipped" in peft[0]:
            parts.append(f"skipped: {peft[0]['skipped']}")
        else:
            parts.append(
                common.table(
                    [
                        {**r, "t": common.fmt_s(r["median_s"]), "x": _r(r.get("jlora_vs_peft"))}
                        for r in peft
                    ],
                    [
                        ("setting", "setting"),
                        ("contender", "library"),
                        ("t", "time"),
                        ("x", "jlora / PEFT"),
                    ],
                )
            )
    tg = targets(rows)
    if tg:
        parts.append("\n### Targets\n")
        parts.append(
            common.table(
                [{**t, "ok": "met" if t["met"] else "**not met**"} for t in tg],
                [("target", "target"), ("measured", "measured"), ("limit", "limit"), ("ok", "")],
            )
        )
    return "\n".join(parts)


def chart(rows: list[dict[str, Any]], path: pathlib.Path) -> None:
    """A PNG: step time / floor per method and workload, and init time per method at 4096²."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in rows if r.get("section") == "step"]
    init = [
        r
        for r in rows
        if r.get("section") == "init" and r.get("shape") == "4096x4096" and "vs_products" not in r
    ]
    panels = [p for p in (steps, init) if p]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    ax_i = 0
    if steps:
        ax = axes[0][ax_i]
        ax_i += 1
        workloads = list(dict.fromkeys(r["workload"] for r in steps))
        variants = list(dict.fromkeys(r["variant"] for r in steps))
        width = 0.8 / len(workloads)
        for j, w in enumerate(workloads):
            vals = [
                next((r["vs_floor"] for r in steps if r["workload"] == w and r["variant"] == v), 0)
                for v in variants
            ]
            ax.barh([i + j * width for i in range(len(variants))], vals, height=width, label=w)
        ax.set_yticks([i + 0.4 - width / 2 for i in range(len(variants))], variants)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.axvline(1.15, color="r", lw=0.8, ls="--", label="1.15× target")
        ax.set_xlabel("step time / frozen-base floor")
        ax.invert_yaxis()
        ax.legend(fontsize=7, loc="lower right")
    if init:
        ax = axes[0][ax_i]
        ranks = sorted({r["rank"] for r in init})
        methods = list(dict.fromkeys(r["method"] for r in init))
        width = 0.8 / len(ranks)
        for j, rank in enumerate(ranks):
            vals = [
                next((r["median_s"] for r in init if r["rank"] == rank and r["method"] == m), 0)
                for m in methods
            ]
            ax.barh(
                [i + j * width for i in range(len(methods))], vals, height=width, label=f"r={rank}"
            )
        ax.set_yticks([i + 0.4 - width / 2 for i in range(len(methods))], methods)
        ax.set_xscale("log")
        ax.set_xlabel("init time of one 4096×4096 kernel (s, log)")
        ax.invert_yaxis()
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
