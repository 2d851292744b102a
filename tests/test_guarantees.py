"""What train.py guarantees (README, "What jlora guarantees"): non-finite steps never applied or
saved, guarded resume, finished runs left alone, a locked run folder, damaged checkpoints
skipped, one-line user errors, and signals that checkpoint. Each test names the defect of
issue 11 it covers."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jlora.errors import CheckpointError, ConfigError, UserError
from jlora.train import config as config_lib
from jlora.train import export as train_export
from jlora.train import guard, loop
from jlora.train.checkpoint import Checkpoints, checksum
from jlora.train.steps import NonFiniteError, guarded_update, new_guard
from tests.test_train import ADAPTERS, GSM8K_TINY, ROOT, _cfg, _losses

SLOW = pytest.mark.slow


def _tiny(**sections):
    return _cfg(GSM8K_TINY, **{"adapter": ADAPTERS["lora"], **sections})


def _cli(*args: str, cwd: pathlib.Path = ROOT, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "JLORA_DEBUG": ""}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        **kw,
    )


def _error_line(proc: subprocess.CompletedProcess) -> str:
    """The one error line: the last stderr line, with no traceback anywhere."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert lines and lines[-1].startswith("train.py: "), proc.stderr
    return lines[-1]


# --- 1. NaN never reaches a checkpoint or an export -------------------------------------------


def test_guarded_update_drops_nonfinite_steps():
    tx = optax.sgd(1.0)
    grads = [{"w": jnp.ones(2)}, {"w": jnp.array([1.0, jnp.inf])}, {"w": jnp.ones(2)}]
    for policy, want in (("skip", [-1.0, -1.0]), ("stop", [0.0, 0.0])):
        update = jax.jit(guarded_update(tx, policy))
        state = {
            "trainable": {"w": jnp.ones(2)},
            "opt": tx.init({"w": jnp.ones(2)}),
            "step": jnp.int32(0),
            "guard": new_guard(),
        }
        for g in grads:
            state, _ = update(state, g, jnp.float32(1.0))
        # skip: steps 1 and 3 applied; stop: only step 1 (nothing after the bad step 2).
        assert state["trainable"]["w"].tolist() == want, policy
        assert int(state["guard"]["first_bad"]) == 2 and int(state["guard"]["bad_leaf"]) == 0
    state, _ = update(state, {"w": jnp.ones(2)}, jnp.float32(jnp.nan))
    assert int(state["guard"]["skipped"]) == 2


def test_nan_stops_the_run_and_keeps_good_checkpoints(tmp_path):
    """Defect 1: lr 1e30 makes step 2 non-finite; checkpoint every step, keep 2."""
    cfg = _tiny(
        train={"steps": 6, "learning_rate": 1e30, "log_every": 5},
        checkpoint={"every": 1, "keep": 2},
    )
    with pytest.raises(NonFiniteError, match=r"step 2 .*non-finite.*checkpoint is step 1"):
        loop.run(cfg, tmp_path, progress=False)
    ckpt = Checkpoints(tmp_path / "checkpoints")
    assert ckpt.steps() == [1]  # the bad step 2 was never written, step 1 never evicted
    ckpt.close()
    # Resume restores the good state and meets the same bad step again: refused, not saved.
    with pytest.raises(NonFiniteError, match="step 2"):
        loop.run(cfg, tmp_path, progress=False, resume=True)
    _, trainable, meta = train_export.restore_run(tmp_path)
    assert meta["step"] == 1
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(trainable))
    history = [json.loads(x) for x in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [h["event"] for h in history] == ["start", "failed", "resume", "failed"]


@SLOW
def test_skip_policy_has_a_limit(tmp_path):
    cfg = _tiny(
        train={"steps": 6, "learning_rate": 1e30, "nonfinite": "skip", "max_skipped_steps": 2},
        checkpoint={"every": 0, "keep": 1},
    )
    with pytest.raises(NonFiniteError, match="max_skipped_steps=2"):
        loop.run(cfg, tmp_path, progress=False)


@SLOW
def test_resume_falls_back_from_a_nonfinite_checkpoint(tmp_path):
    """A non-finite checkpoint (written before this guard existed, or by hand) is moved to
    damaged/ and the run resumes from the newest finite one."""
    cfg = _tiny(train={"steps": 4}, checkpoint={"every": 1, "keep": 3})
    loop.run(cfg, tmp_path / "ref", progress=False)
    loop.run(cfg, tmp_path / "run", progress=False, stop_after=2)
    ckpt = Checkpoints(tmp_path / "run" / "checkpoints", keep=3)
    setup_state, meta = _restore_any(tmp_path / "run", 2)
    poisoned = jax.tree.map(lambda x: x * jnp.nan if x.dtype == jnp.float32 else x, setup_state)
    import orbax.checkpoint as ocp

    ckpt.manager.delete(2)
    ckpt.manager.save(
        2,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(poisoned),
            meta=ocp.args.JsonSave({**meta, "checksum": checksum(poisoned)}),
        ),
    )
    ckpt.manager.wait_until_finished()
    ckpt.close()
    loop.run(cfg, tmp_path / "run", progress=False, resume=True)
    assert "not finite" in (tmp_path / "run" / "damaged" / "2" / "reason.txt").read_text()
    assert _losses(tmp_path / "run") == _losses(tmp_path / "ref")


def _steps(folder: pathlib.Path) -> list[int]:
    """Complete checkpoint steps, read from the folder names (no orbax manager)."""
    if not folder.exists():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _restore_any(run: pathlib.Path, step: int):
    from jlora.train.setup import Setup

    ckpt = Checkpoints(run / "checkpoints")
    meta = ckpt.read_meta(step)
    setup = Setup(config_lib.from_dict(meta["config"]), need_data=False)
    state, meta = ckpt.restore(step, setup.initial_state(setup.optimizer()))
    ckpt.close()
    return state, meta


# --- 2, 3. Guarded resume; a finished run is left alone ---------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    cfg = _tiny(train={"steps": 2}, checkpoint={"every": 1, "keep": 2})
    loop.run(cfg, out, progress=False)
    return cfg, out


def _snapshot(out: pathlib.Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def test_resume_refuses_a_changed_config_before_writing(finished_run):
    """Defect 2: a resume with another rank fails first, naming the field, writing nothing."""
    cfg, out = finished_run
    before = _snapshot(out)
    changed = _cfg(
        config_lib.to_dict(cfg), adapter={"rank": 8}, train={"steps": 3, "learning_rate": 0.5}
    )
    with pytest.raises(ConfigError, match=r"adapter\.rank: 4 -> 8"):
        loop.run(changed, out, progress=False, resume=True)
    assert _snapshot(out) == before


def test_resume_of_a_finished_run_is_a_noop(finished_run):
    """Defect 3: summary.json and report.md are not rewritten."""
    cfg, out = finished_run
    before = _snapshot(out)
    summary = loop.run(cfg, out, progress=False, resume=True)
    assert summary["finished"] and summary["eval/exact_match"] >= 0
    assert _snapshot(out) == before


@SLOW
def test_resume_records_allowed_changes_and_export_needs_no_data(tmp_path):
    """A GoRA run continues with a new length and learning rate (recorded in history.jsonl)
    and exports without the training data or the gradient pre-pass."""
    cfg = _tiny(adapter=ADAPTERS["gora"], train={"steps": 2}, checkpoint={"every": 1, "keep": 2})
    out = tmp_path / "run"
    loop.run(cfg, out, progress=False)
    longer = _cfg(config_lib.to_dict(cfg), train={"steps": 3, "learning_rate": 5e-3})
    loop.run(longer, out, progress=False, resume=True)
    resume = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()][-2]
    assert resume["event"] == "resume"
    assert resume["changes"] == {"train.learning_rate": [1e-2, 5e-3], "train.steps": [2, 3]}
    # Export reads no data and runs no pre-pass: GoRA's specs come from the checkpoint.
    import jlora.train.setup as setup_lib
    from jlora.train import tasks

    def forbidden(*a, **k):
        raise AssertionError("export read the training data or ran the GoRA pre-pass")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(setup_lib.Setup, "_prepass", forbidden)
        mp.setattr(tasks, "read_data", forbidden)
        mp.setattr(tasks, "build_data", forbidden)
        path = train_export.export_run(out, "jlora", tmp_path / "export")
    assert (path / "adapter_config.json").exists()


# --- 4. The run folder is locked -------------------------------------------------------------


def test_a_second_run_in_a_locked_folder_fails_at_once(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from jlora.train.guard import RunLock; "
            f"RunLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(60)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(guard.RunLockedError, match=f"pid {holder.pid}"):
            loop.run(_tiny(), tmp_path, progress=False)
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the killed holder's lock.
    with guard.RunLock(tmp_path):
        pass


# --- 7. Damaged checkpoints ------------------------------------------------------------------


def _two_checkpoints(tmp_path):
    ckpt = Checkpoints(tmp_path / "checkpoints", keep=3)
    state = {"w": jnp.arange(64.0), "b": {"c": jnp.ones((4, 4))}}
    for step in (1, 2):
        ckpt.save(step, jax.tree.map(lambda x, s=step: x * s, state), {"step": step})
    return ckpt, state


def _damage(folder: pathlib.Path, how: str) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.parent.name == "d")
    if how == "truncate":
        for p in files:
            p.write_bytes(p.read_bytes()[:10])
    elif how == "manifest":
        for p in folder.rglob("manifest.ocdbt"):
            p.unlink()
    elif how == "bitflip":  # same size, one bit: only the checksum can tell
        target = max(files, key=lambda p: p.stat().st_size)
        data = bytearray(target.read_bytes())
        data[-20] ^= 0x01
        target.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "manifest", "bitflip", "meta"])
def test_a_damaged_latest_checkpoint_falls_back(tmp_path, how, caplog, capfd):
    ckpt, state = _two_checkpoints(tmp_path)
    if how == "meta":
        (tmp_path / "checkpoints" / "2" / "meta" / "metadata").write_text("{not json")
    else:
        _damage(tmp_path / "checkpoints" / "2", how)
    step, restored, meta = ckpt.restore_latest(lambda s, m: state)
    assert step == 1 and meta["step"] == 1
    np.testing.assert_array_equal(restored["w"], np.arange(64.0))
    assert (tmp_path / "damaged" / "2" / "reason.txt").exists()  # kept, not deleted
    assert ckpt.steps() == [1]
    ckpt.save(2, state, {"step": 2})  # a later save is not blocked by the damaged step
    assert ckpt.steps() == [1, 2]
    out, err = capfd.readouterr()
    assert len((out + err).splitlines()) <= 3, out + err
    assert len(caplog.records) <= 2
    ckpt.close()


def test_a_checkpoint_of_another_run_is_refused_not_quarantined(tmp_path):
    ckpt, _ = _two_checkpoints(tmp_path)
    other = {"w": jnp.arange(32.0), "b": {"c": jnp.ones((4, 4))}}
    with pytest.raises(CheckpointError, match=r"does not fit.*w: saved \(64,\), this run \(32,\)"):
        ckpt.restore_latest(lambda s, m: other)
    assert ckpt.steps() == [1, 2] and not (tmp_path / "damaged").exists()
    ckpt.close()


def test_a_full_disk_keeps_the_last_checkpoint(tmp_path):
    """Defect 10: a checkpoint write on a full disk is one error naming the folder."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        ckpt = Checkpoints(mnt / "checkpoints", keep=3)
        state = {"w": jnp.arange(1024.0)}
        ckpt.save(1, state, {"step": 1})
        with open(mnt / "filler", "wb", buffering=0) as f, pytest.raises(OSError):
            while True:
                f.write(b"\0" * 4096)
        with pytest.raises(CheckpointError, match=r"writing checkpoint 2 to .*small.*intact"):
            ckpt.save(2, state, {"step": 2})
        assert ckpt.steps() == [1]
        (mnt / "filler").unlink()
        assert ckpt.restore(1, state)[1]["step"] == 1
        ckpt.close()
    finally:
        subprocess.run(["umount", str(mnt)])


# --- 8, 9. User errors: one line, exit 2, before the model loads ------------------------------


CONFIG_ERRORS = [
    (["adapter.rnak=4"], "adapter.rnak: unknown key"),
    (["adapter.rank=-4"], "adapter.rank=-4: expected"),
    (["data.max_train_examples=-5"], "data.max_train_examples=-5: expected"),
    (["train.learning_rate=.inf"], "train.learning_rate=inf: expected a finite number"),
    (["train.nonfinite=ignore"], "train.nonfinite='ignore'"),
    (["train.steps=[1,"], "--set train.steps line 1"),
]


@pytest.mark.parametrize(("overrides", "message"), CONFIG_ERRORS)
def test_config_errors_name_the_field(overrides, message):
    """Defects 8, 9: the adapter section is checked with the rest, before any model."""
    with pytest.raises(ConfigError) as e:
        config_lib.load(ROOT / "configs" / "default.yaml", overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_config_errors_are_one_line_before_any_work(tmp_path):
    """On the command line: exit 2, one line, no run folder left behind."""
    proc = _cli("--set", "adapter.rnak=4", "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert "adapter.rnak: unknown key" in _error_line(proc)
    assert not (tmp_path / "run").exists()


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n  batch_size: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml line \d+ column \d+: invalid YAML"):
        config_lib.load(bad)
    (tmp_path / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text \(byte 9\)"):
        config_lib.load(tmp_path / "latin1.yaml")


def test_missing_data_folder_is_reported_before_the_model_loads(tmp_path):
    """Defect 8: a missing relative data folder is one line at once (no hub attempt)."""
    start = time.perf_counter()
    proc = _cli("--set", "data.source=data/sst3", "--out", str(tmp_path / "run"))
    assert proc.returncode == 2 and "data/sst3" in _error_line(proc)
    assert "loading" not in proc.stderr  # the model was never loaded
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "run").exists()


@SLOW
def test_nonfinite_and_debug_on_the_cli(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(config_lib.to_dict(_tiny(train={"learning_rate": 1e30}))))
    proc = _cli("--config", str(cfg), "--out", str(tmp_path / "run"), "--no-progress")
    assert proc.returncode == 2 and "non-finite" in _error_line(proc)
    proc = _cli("--config", str(cfg), "--out", str(tmp_path / "r2"), "--no-progress", "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_user_errors_are_value_errors():
    assert issubclass(NonFiniteError, UserError) and issubclass(guard.RunLockedError, UserError)


# --- 10. Signals ------------------------------------------------------------------------------


@SLOW
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_and_exits(tmp_path, sig):
    cfg_path = tmp_path / "c.yaml"
    cfg = _tiny(train={"steps": 400, "log_every": 1}, checkpoint={"every": 0, "keep": 1})
    cfg_path.write_text(json.dumps(config_lib.to_dict(cfg)))
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "train.py",
        "--config",
        str(cfg_path),
        "--out",
        str(run),
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (
        metrics.exists() and metrics.read_text().count("\n") >= 3
    ):
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err
    last = [x for x in err.splitlines() if x.strip()][-1]
    assert last.startswith("train.py: interrupted at step") and "--resume" in last
    step = int(last.split("interrupted at step ")[1].split(";")[0])
    assert _steps(tmp_path / "run" / "checkpoints") == [step]


@SLOW
def test_kills_at_random_points_resume_to_the_same_losses(tmp_path):
    """SIGKILL at 4 random points of one run (while loading, while training, and while a
    checkpoint is being written), each followed by --resume: the finished run's losses equal
    an uninterrupted run's, bit for bit. (10 points took 214 s of CI time, 6 about 200; each is
    a new train.py process.)"""
    cfg = _tiny(train={"steps": 24}, checkpoint={"every": 1, "keep": 2})
    loop.run(cfg, tmp_path / "ref", progress=False)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(json.dumps(config_lib.to_dict(cfg)))
    run = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--config", str(cfg_path), "--out", str(run)]
    cmd += ["--resume", "--no-progress"]
    rng = np.random.default_rng(0)
    during_write = 0
    for trial in range(4):
        proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL)
        ckpts = run / "checkpoints"
        start_steps = _steps(ckpts)
        mode = ("write", "write", "time")[trial % 3]
        deadline = time.time() + (float(rng.uniform(2, 12)) if mode == "time" else 180)
        while time.time() < deadline and proc.poll() is None:
            if mode == "write" and ckpts.exists():
                names = [p.name for p in ckpts.iterdir()]
                if any("tmp" in n for n in names) and start_steps != _steps(ckpts):
                    break
            time.sleep(0.002)
        proc.kill()
        proc.wait()
        during_write += ckpts.exists() and any("tmp" in p.name for p in ckpts.iterdir())
        if (run / "summary.json").exists():
            break
    assert during_write >= 1
    loop.run(cfg, run, progress=False, resume=True)
    assert _losses(run) == _losses(tmp_path / "ref")
