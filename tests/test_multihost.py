"""Several processes in one run (`jlora.train.distributed`): two `train.py` processes on
localhost with 4 simulated CPU devices each (gloo collectives) train like one process with 8
devices: the same losses, every file written once, checkpoints that resume in two processes
and export from one; a signal to one process stops both at the same step with a checkpoint.
The settings' parsing and errors are fast tests."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import yaml
from conftest import MULTIDEVICE_ENV, tiny_model

from jlora.errors import ConfigError
from jlora.train import config, distributed, export, loop
from jlora.train.distributed import DistributedConfig, settings

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = ROOT / "train.py"


# --- settings (fast) ---


def test_no_settings_is_one_process_and_the_config_wins_over_the_environment():
    assert settings(DistributedConfig(), environ={}) is None
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert settings(DistributedConfig(), environ=env) == {
        "coordinator_address": "h:1",
        "num_processes": 4,
        "process_id": 3,
    }
    got = settings(DistributedConfig(process_id=1), environ=env)
    assert got is not None and got["process_id"] == 1
    # auto: what is missing is left to jax's cluster detection
    assert settings(DistributedConfig(auto=True), environ={}) == {}


@pytest.mark.parametrize(
    ("cfg", "env", "message"),
    [
        (DistributedConfig(coordinator="h:1"), {}, r"distributed.coordinator given but not "),
        (DistributedConfig(), {"JAX_NUM_PROCESSES": "two"}, r"JAX_NUM_PROCESSES='two': expected"),
        (DistributedConfig(), {"JAX_COORDINATOR_ADDRESS": "nohost"}, r"'nohost': expected 'host"),
        (
            DistributedConfig(coordinator="h:1", num_processes=2),
            {"JAX_PROCESS_ID": "2"},
            r"JAX_PROCESS_ID=2: expected an integer in \[0, 2\)",
        ),
    ],
)
def test_bad_settings_name_the_field_or_variable(cfg, env, message):
    with pytest.raises(ConfigError, match=message):
        settings(cfg, environ=env)


def test_the_config_section_is_checked_and_may_change_on_resume():
    with pytest.raises(ConfigError, match=r"distributed.process_id=2: expected an integer in"):
        config.from_dict({"distributed": {"num_processes": 2, "process_id": 2}})
    with pytest.raises(ConfigError, match=r"distributed.coordinator='x': expected 'host:port'"):
        config.from_dict({"distributed": {"coordinator": "x"}})
    old = config.to_dict(config.from_dict({}))
    new = config.from_dict({"distributed": {"process_id": 1}})
    allowed, refused = config.resume_changes(old, new)
    assert allowed == {"distributed.process_id": (None, 1)} and refused == {}


def test_one_process_helpers_are_the_plain_ones():
    x = jax.numpy.arange(4.0)
    assert distributed.initialize(DistributedConfig(), environ={}) is False
    assert distributed.is_main()
    np.testing.assert_array_equal(distributed.to_host(x), np.arange(4.0))
    assert distributed.any_process(True) and not distributed.any_process(False)
    distributed.barrier("nothing to wait for")


# --- two processes (slow) ---


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int, process: int | None = None, port: int = 0) -> dict[str, str]:
    env = dict(MULTIDEVICE_ENV)
    env["XLA_FLAGS"] = env["XLA_FLAGS"].replace("device_count=8", f"device_count={devices}")
    for var in distributed.ENV.values():
        env.pop(var, None)
    if process is not None:
        env.update(
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(process),
        )
    return env


def _train_two(cfg: pathlib.Path, out: pathlib.Path, *args: str) -> list:
    """`train.py` as two processes of 4 devices each; `(process, stdout, stderr)` of each once
    both have ended."""
    cmd = [sys.executable, str(TRAIN), "--config", str(cfg), "--out", str(out), "--no-progress"]
    port = _free_port()
    procs = [
        subprocess.Popen(
            [*cmd, *args],
            env=_env(4, i, port),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    return [(p, *p.communicate(timeout=900)) for p in procs]


def _ok(results: list) -> None:
    for i, (p, _, err) in enumerate(results):
        assert p.returncode == 0, f"process {i}: {err[-3000:]}"


def _rows(run: pathlib.Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _config(tmp: pathlib.Path, method: str) -> pathlib.Path:
    raw = {
        "name": f"multihost-{method}",
        "task": "gsm8k",
        "model": {"source": str(ROOT / "tests/fixtures/stories260K/stories260K.bin")},
        "data": {
            "source": str(ROOT / "data/gsm8k"),
            "eval_split": "test",
            "max_length": 128,
            "buckets": [128],
            "max_train_examples": 64,
            "max_eval_examples": 2,
            "max_new_tokens": 2,
        },
        "adapter": {"method": method, "rank": 4, "targets": "all-linear"},
        # constant lr: a run stopped at 3 and resumed to 5 equals one of 5 steps
        "train": {
            "steps": 5,
            "batch_size": 8,
            "eval_batch_size": 2,
            "log_every": 1,
            "eval_every": 0,
            "learning_rate": 1e-4,
            "schedule": "constant",
            "prepass_batches": 2,
            "seed": 0,
        },
        "checkpoint": {"every": 0},
        "mesh": {"data": 2, "fsdp": 4, "tensor": 1},
    }
    path = tmp / f"{method}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
# GoRA: its gradient pre-pass also runs over both processes. (Each method's own layouts are
# checked on 8 devices of one process in tests/test_mesh_training.py; slora ran here too, at
# 4 minutes of CI time.)
@pytest.mark.parametrize("method", ["gora"])
def test_two_processes_train_like_one_and_write_each_file_once(tmp_path, method):
    cfg = _config(tmp_path, method)
    ref, run = tmp_path / "ref", tmp_path / "two"
    # The reference: the same run in this process, on one device (tests/test_mesh_training.py
    # shows a mesh run's losses are the 1-device run's).
    one = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]
    loop.run(config.load(cfg, one), ref, progress=False)
    first = _train_two(cfg, run, "--set", "train.steps=3")
    _ok(first)
    # Process 0 prints the summary table; process 1 writes and prints nothing of the run's.
    assert "| method |" in first[0][1] and "| method |" not in first[1][1]
    _ok(_train_two(cfg, run, "--resume"))

    want = {r["step"]: r["loss"] for r in _rows(ref) if "loss" in r}
    rows = _rows(run)
    got = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert [s for s, _ in got] == [1, 2, 3, 4, 5]  # each step once, not once per process
    np.testing.assert_allclose([v for _, v in got], [want[s] for s, _ in got], atol=1e-5)
    events = [json.loads(x)["event"] for x in (run / "history.jsonl").read_text().splitlines()]
    assert events == ["start", "end", "resume", "end"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [
        "3",
        "5",
    ]
    assert json.loads((run / "summary.json").read_text())["steps"] == 5

    # One process on one device (this one: `train.py export` is `export_run`) exports what two
    # processes trained: the reference's adapters.
    from safetensors.numpy import load_file

    for name, src in (("two", run), ("ref", ref)):
        export.export_run(src, "peft", tmp_path / f"peft-{name}")
    a = load_file(tmp_path / "peft-two" / "adapter_model.safetensors")
    b = load_file(tmp_path / "peft-ref" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and a
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)


@pytest.mark.slow
def test_a_signal_to_one_process_stops_both_at_the_same_step(tmp_path):
    cfg = _config(tmp_path, "lora")
    run = tmp_path / "run"
    port = _free_port()
    cmd = [
        sys.executable,
        str(TRAIN),
        "--config",
        str(cfg),
        "--out",
        str(run),
        "--no-progress",
        "--set",
        "train.steps=100000",
    ]
    procs = [
        subprocess.Popen(
            cmd, env=_env(4, i, port), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for i in range(2)
    ]
    try:
        deadline = time.monotonic() + 600
        while not (run / "metrics.jsonl").exists() or not _rows(run):
            assert time.monotonic() < deadline, "no step in 600 s"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.5)
        os.kill(procs[1].pid, signal.SIGTERM)
        results = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [143, 143], [e[-2000:] for _, e in results]
    events = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    stopped = [e for e in events if e["event"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["signal"] == signal.SIGTERM
    steps = [p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps == [str(stopped[0]["step"])]


@pytest.mark.slow
def test_each_process_reads_only_its_slices_of_a_safetensors_checkpoint(tmp_path):
    """A random Llama saved as safetensors, loaded by two processes onto FSDP over their 8
    devices: each process reads about half of the checkpoint (its kernels' slices, plus the
    replicated norms), and its shards are the plain load's slices."""
    import jlora.models as jm

    model = tiny_model("llama")
    ids = np.ones((1, 4), np.int32)
    params = model.init(jax.random.key(0), ids, ids)["params"]
    folder = jm.save_hf(tmp_path / "llama", model, params)
    script = ROOT / "tests" / "multidevice" / "multihost_load.py"
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(folder)],
            env=_env(4, i, port),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    rows = [json.loads(next(x for x in o.splitlines() if x.startswith("{"))) for o, _ in outs]
    assert sorted(r["process"] for r in rows) == [0, 1]
    for r in rows:
        assert r["equal"], r
        # half of the sharded kernels, all of the (small) replicated norms
        assert 0.45 * r["total"] < r["read"] < 0.55 * r["total"], r
