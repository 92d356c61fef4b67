"""Faults: killed stages resume, and a bad run id, artifact, tracking store or storage gives one clear line.

Each test here is a row of the README's table of bad inputs and faults (test_readme_fault_table_is_tested).
"""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from kdd_mlflow import cli
from kdd_mlflow.artifacts import experts as buffer
from kdd_mlflow.config import TrainConfig
from kdd_mlflow.stages import distill as distill_stage
from kdd_mlflow.stages import experts as experts_stage
from kdd_mlflow.stages import train as train_stage
from tests.services import finish, free_port, start_kdd
from tests.test_distill_stage import distill_config, experts_config

ROOT = Path(__file__).resolve().parents[1]


def wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the condition was not reached in time"
        time.sleep(0.2)


def running(stage: str) -> list[str]:
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`kdd.stage` = '{stage}' and attributes.status = 'RUNNING'")
    return [r.info.run_id for r in runs]


def artifact_file(run_id: str, path: str) -> Path:
    """The artifact's file in the local artifact store (to damage it as a disk or a copy would)."""
    return Path(mlflow.get_run(run_id).info.artifact_uri.removeprefix("file://")) / path


def cli_args(cfg) -> list[str]:
    return [a for k, v in cfg.model_dump(exclude_none=True).items() for a in (f"--{k.replace('_', '-')}", str(v))]


def one_line_error(result, *fragments: str) -> None:
    """Exit 1 with one error line (MLflow's download progress bars aside) holding every fragment."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("kdd ")]
    assert result.exit_code == 1 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(f in errors[0] for f in fragments), errors[0]


def stage_runs() -> list:
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


@pytest.mark.slow
def test_killed_distill_resumes_to_the_uninterrupted_set(fake_fashion, tmp_path):
    experts_run = experts_stage.run(experts_config(fake_fashion))
    args = cli_args(distill_config(fake_fashion, experts_run, iterations=12, eval_every=6, checkpoint_every=2))
    whole = finish(start_kdd("distill", *args, cwd=tmp_path))[0].run_id

    victim = start_kdd("distill", *args, cwd=tmp_path)
    client = mlflow.MlflowClient()

    def past_a_checkpoint() -> bool:
        ids = running("distill")
        return bool(ids) and len(client.get_metric_history(ids[0], "matching_loss")) >= 5 \
            and bool(client.list_artifacts(ids[0], "checkpoint"))

    wait_for(past_a_checkpoint, victim)
    killed = running("distill")[0]
    victim.send_signal(signal.SIGKILL)  # no handler runs: the run stays RUNNING, as after a power cut
    victim.wait()
    assert mlflow.get_run(killed).info.status == "RUNNING"

    [resumed] = finish(start_kdd("distill", *args, "--resume", killed, cwd=tmp_path))
    assert resumed.run_id == killed and re.search(rf"resuming run {killed} at iteration (2|4|6|8|10)\b", resumed.err)

    def final(run_id):
        return load_file(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/synthetic/synthetic.safetensors"))

    a, b = final(whole), final(killed)
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["lr"], b["lr"])
    assert mlflow.get_run(killed).info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(killed, "matching_loss")}
    assert steps == {m.step for m in client.get_metric_history(whole, "matching_loss")}


@pytest.mark.slow
def test_killed_experts_loses_at_most_the_expert_in_progress(fake_fashion, tmp_path):
    args = cli_args(experts_config(fake_fashion, num_experts=3, epochs=4))
    victim = start_kdd("experts", *args, cwd=tmp_path)

    def first_expert_stored() -> bool:
        ids = running("experts")
        return bool(ids) and len(buffer.existing_experts(ids[0])) >= 1

    wait_for(first_expert_stored, victim)
    killed = running("experts")[0]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    kept = buffer.existing_experts(killed)
    before = {k: hashlib.sha256(artifact_file(killed, f"trajectories/{e['file']}").read_bytes()).hexdigest()
              for k, e in kept.items()}
    assert 1 <= len(kept) <= 2

    [resumed] = finish(start_kdd("experts", *args, "--run-id", killed, cwd=tmp_path))
    assert resumed.run_id == killed and f"{3 - len(kept)} of this shard's 3 experts to train" in resumed.err
    done = buffer.existing_experts(killed)
    assert sorted(done) == [0, 1, 2] and mlflow.get_run(killed).info.status == "FINISHED"
    for k, digest in before.items():  # what was stored survives untouched: only the missing ones were trained
        assert hashlib.sha256(artifact_file(killed, f"trajectories/{done[k]['file']}").read_bytes()).hexdigest() \
            == digest


@pytest.fixture
def teacher_run(fake_fashion) -> str:
    return train_stage.run(TrainConfig(dataset="fashion-mnist", data_dir=str(fake_fashion), model="convnet-w8",
                                       epochs=1, val_size=100))


def test_truncated_model_artifact_names_the_run_and_file(fake_fashion, teacher_run):
    weights = artifact_file(teacher_run, "weights/model.safetensors")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    count = len(stage_runs())
    result = CliRunner().invoke(cli.main, ["kd", "--teacher-run", teacher_run, "--dataset", "fashion-mnist",
                                           "--data-dir", str(fake_fashion), "--val-size", "100"])
    one_line_error(result, f"run {teacher_run}", "weights/model.safetensors is unreadable")
    assert len(stage_runs()) == count and mlflow.get_run(teacher_run).info.status == "FINISHED"


def test_garbled_spec_and_mismatched_model_are_refused(fake_fashion, teacher_run):
    base = ["--dataset", "fashion-mnist", "--data-dir", str(fake_fashion), "--val-size", "100"]
    result = CliRunner().invoke(cli.main, ["kd", "--teacher-run", teacher_run, *base[2:], "--dataset", "mnist"])
    one_line_error(result, f"run {teacher_run}", "dataset='fashion-mnist', expected 'mnist'")
    experts_run = experts_stage.run(experts_config(fake_fashion, num_experts=1, epochs=1))
    result = CliRunner().invoke(cli.main, ["kd", "--teacher-run", experts_run, *base])
    one_line_error(result, f"run {experts_run} is a kdd experts run", "expected a model run")
    spec = artifact_file(teacher_run, "weights/model.json")
    spec.write_text(spec.read_text()[:20])
    result = CliRunner().invoke(cli.main, ["kd", "--teacher-run", teacher_run, *base])
    one_line_error(result, f"run {teacher_run}", "weights/model.json is unreadable")


@pytest.mark.slow
def test_truncated_trajectory_and_synthetic_set_name_the_run_and_file(fake_fashion):
    experts_run = experts_stage.run(experts_config(fake_fashion))
    distill_run = distill_stage.run(distill_config(fake_fashion, experts_run, iterations=2, eval_every=2))
    synthetic = artifact_file(distill_run, "synthetic/synthetic.safetensors")
    synthetic.write_bytes(synthetic.read_bytes()[:-100])
    result = CliRunner().invoke(cli.main, ["teacher", "--synthetic-run", distill_run, "--dataset", "fashion-mnist",
                                           "--data-dir", str(fake_fashion), "--val-size", "100"])
    one_line_error(result, f"run {distill_run}", "synthetic/synthetic.safetensors is unreadable")

    trajectory = artifact_file(experts_run, "trajectories/expert_0001.safetensors")
    trajectory.write_bytes(trajectory.read_bytes()[:-64])
    result = CliRunner().invoke(cli.main, ["distill", *cli_args(distill_config(fake_fashion, experts_run))])
    one_line_error(result, f"run {experts_run}", "expert_0001.safetensors")
    assert len([r for r in stage_runs() if r.data.tags.get("kdd.stage") == "distill"]) == 1  # no new run


@pytest.mark.parametrize("args", [
    ["kd", "--teacher-run", "0" * 32],
    ["teacher", "--synthetic-run", "0" * 32],
    ["distill", "--experts-run", "0" * 32],
    ["experts", "--run-id", "0" * 32],
    ["evaluate", "--runs", "0" * 32],
])
def test_unknown_run_id_is_one_line(fake_fashion, args):
    result = CliRunner().invoke(cli.main, [*args, "--dataset", "fashion-mnist", "--data-dir", str(fake_fashion),
                                           "--val-size", "100"])
    one_line_error(result, f"'{'0' * 32}' not found in sqlite:///")
    assert stage_runs() == []


def test_unreachable_tracking_server_fails_at_once(fake_fashion):
    mlflow.set_tracking_uri(f"http://127.0.0.1:{free_port()}")
    result = CliRunner().invoke(cli.main, ["train", "--dataset", "fashion-mnist", "--data-dir", str(fake_fashion)])
    one_line_error(result, "is unreachable", "Connection refused", "MLFLOW_TRACKING_URI")


def test_unwritable_tracking_store_fails_at_once(fake_fashion, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    mlflow.set_tracking_uri(f"sqlite:///{blocker / 'mlflow.db'}")
    result = CliRunner().invoke(cli.main, ["train", "--dataset", "fashion-mnist", "--data-dir", str(fake_fashion)])
    one_line_error(result, "cannot be opened", str(blocker))
    assert blocker.read_text() == "not a directory"


def test_unwritable_artifact_store_fails_before_any_run(fake_fashion, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    mlflow.create_experiment("blocked", artifact_location=str(blocker / "artifacts"))
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "blocked")
    result = CliRunner().invoke(cli.main, ["train", "--dataset", "fashion-mnist", "--data-dir", str(fake_fashion)])
    one_line_error(result, "artifact store", "is not writable")
    assert stage_runs() == []


@pytest.mark.parametrize("storage", ["postgresql://kdd@127.0.0.1:{port}/optuna", "sqlite:///{blocker}/optuna.db"])
def test_unreachable_optuna_storage_fails_before_any_run(fake_fashion, tmp_path, storage):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    storage = storage.format(port=free_port(), blocker=blocker)
    result = CliRunner().invoke(cli.main, ["tune", "--storage", storage, "--dataset", "fashion-mnist",
                                           "--data-dir", str(fake_fashion), "--n-trials", "1"])
    one_line_error(result, "Optuna storage", "cannot be opened")
    assert stage_runs() == []


def test_readme_fault_table_is_tested():
    """Every row of the README's table of bad inputs and faults names tests, and each of them exists."""
    section = (ROOT / "README.md").read_text().split("## Bad input and faults", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| input")]
    assert len(rows) >= 15
    for row in rows:
        named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", row.split("|")[-2])
        assert named, f"row without a test: {row}"
        for file, name in named:
            assert re.search(rf"^def {name}\(", (ROOT / "tests" / file).read_text(), re.M), f"{file}::{name} missing"
