"""Stages as Slurm jobs on a real one-node cluster (slurmctld, slurmd and munged started here), the Slurm
backend's script and config checks, and the Kubernetes backend's project and job checked offline."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.projects.utils import load_project

from kdd_mlflow import backends, cli, mlproject
from kdd_mlflow.backends import kubernetes, slurm
from tests.services import slurm as slurm_cluster

ROOT = Path(__file__).resolve().parents[1]
TRAIN = {"dataset": "fashion-mnist", "val_size": "100", "model": "convnet-w8-d2", "epochs": "1", "device": "cpu"}


# --- offline: the script, the config, the kubernetes project -------------------------------------------------

def test_sbatch_script_carries_the_config_and_execs_the_stage(tmp_path):
    cfg = slurm.parse_config({"partition": "gpu", "time": "1-02:00:00", "gpus": 1, "cpus_per_task": 8, "mem": "32G",
                              "account": "dd", "sbatch": ["--constraint=a100"], "setup": ["module load cuda"],
                              "log_dir": str(tmp_path), "ENV_MANAGER": "local", "STORAGE_DIR": None})
    script = slurm.render_script(cfg, "distill", "python -m entrypoints.distill --ipc 10", Path("/proj"), "abc123",
                                 "7", ["export PATH=/venv/bin:\"$PATH\""])
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert [line for line in lines if line.startswith("#SBATCH")] == [
        "#SBATCH --job-name=kdd-distill", f"#SBATCH --output={tmp_path}/%x-%j.out", "#SBATCH --partition=gpu",
        "#SBATCH --time=1-02:00:00", "#SBATCH --gpus=1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32G",
        "#SBATCH --account=dd", "#SBATCH --constraint=a100"]
    assert "export MLFLOW_RUN_ID=abc123 MLFLOW_EXPERIMENT_ID=7" in lines
    assert 'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"' in lines  # threads = its CPUs
    body = lines[lines.index("cd /proj"):]
    assert body == ["cd /proj", "module load cuda", "export PATH=/venv/bin:\"$PATH\"",
                    "exec python -m entrypoints.distill --ipc 10"]  # exec: scancel's SIGTERM reaches the stage
    assert "TRACKING" not in script  # the tracking URI and credentials travel in the environment, not the file


@pytest.mark.parametrize("config, said", [
    ({"time": "two hours"}, "time 'two hours' is not a Slurm time limit"),
    ({"mem": "lots"}, "mem 'lots' is not a Slurm memory size"),
    ({"partiton": "gpu"}, "partiton: Extra inputs are not permitted"),
    ({"sbatch": ["constraint=a100"]}, "must be one option starting with '-'"),
    ({"gpus": -1}, "gpus: Input should be greater than or equal to 0"),
])
def test_bad_slurm_config_is_one_line(config, said):
    with pytest.raises(ValueError, match=said) as caught:
        slurm.parse_config(config)
    assert "\n" not in str(caught.value)


def test_bad_backend_input_fails_before_any_run(fake_fashion, tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{partition: gpu")
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"partiton": "gpu"}))
    common = ["--dataset", "fashion-mnist", "--data-dir", str(fake_fashion)]
    for args, said in [
        (["combined", *common, "--backend", "slurm", "--backend-config", str(bad_json)], "is not JSON"),
        (["combined", *common, "--backend", "slurm", "--backend-config", str(typo)], "partiton"),
        (["combined", *common, "--backend", "slurm", "--backend-config", str(tmp_path / "none.json")],
         "No such file"),
        (["combined", *common, "--backend", "pbs"], "backend"),
        (["combined", *common, "--backend", "local", "--backend-config", str(typo)], "takes no backend config"),
        (["experts", *common, "--backend", "slurm"], "give --shards N too"),
        (["experts", *common, "--shards", "2", "--shard", "0/2"], "does not combine with --shard"),
        (["combined", *common, "--backend", "kubernetes", "--backend-config", str(typo)], "unknown key"),
    ]:
        result = CliRunner().invoke(cli.main, args)
        assert result.exit_code != 0, args
        assert said in result.output and len(result.output.strip().splitlines()) == 1, (args, result.output)
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_a_silent_controller_is_asked_again_and_a_forgotten_job_ends_its_run(monkeypatch):
    """A controller that does not answer leaves the job's status as it was; a job it no longer knows (and no
    accounting knows) ends a run still open FAILED, with the reason."""
    answers = []
    monkeypatch.setattr(slurm, "_slurm", lambda *command, **kw: answers.pop(0))
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)  # no sacct
    run = mlflow.MlflowClient().create_run("0")
    submitted = slurm.SlurmSubmittedRun(run.info.run_id, "42", Path("/nonexistent.out"), poll_s=0.01)

    def said(code: int, out: str = "", err: str = ""):
        return subprocess.CompletedProcess([], code, out, err)

    answers += [said(0, "JobId=42 JobState=RUNNING Reason=None"),
                said(1, err="slurm_load_jobs error: Unable to contact slurm controller (connect failure)")]
    assert submitted.get_status() == "RUNNING" and submitted.get_status() == "RUNNING"
    answers += [said(1, err="slurm_load_jobs error: Invalid job id specified")]
    assert submitted.get_status() == "FAILED"
    ended = mlflow.get_run(run.info.run_id)
    assert ended.info.status == "FAILED" and "slurm job 42 is gone" in ended.data.tags["kdd.error"]
    assert ended.data.tags[slurm.STATE_TAG] == "FAILED"
    assert submitted.get_status() == "FAILED"  # settled: Slurm is not asked again
    assert answers == []


def test_kubernetes_project_is_the_docker_variant_of_the_mlproject():
    kube_dir = ROOT / backends.KUBERNETES_DIR
    assert (kube_dir / "MLproject").read_text() == mlproject.render(cli.STAGES, "kdd-mlflow:cpu")
    local, docker = load_project(str(ROOT)), load_project(str(kube_dir))
    assert docker.docker_env == {"image": "kdd-mlflow:cpu"} and local.docker_env is None
    assert set(docker._entry_points) == set(local._entry_points) == set(cli.STAGES)
    for name, entry in local._entry_points.items():
        other = docker._entry_points[name]
        defaults = {k: p.default for k, p in entry.parameters.items()}
        assert defaults == {k: p.default for k, p in other.parameters.items()}
        params = {k: "x" for k, p in entry.parameters.items() if p.default is None}
        assert (other.compute_command(params, None).replace(f"kdd {name} ", "")
                == entry.compute_command(params, None).replace(f"python -m entrypoints.{name} ", ""))


def test_kubernetes_backend_config_and_job_validate_offline(tmp_path):
    pytest.importorskip("kubernetes")
    config = backends.load("kubernetes", str(ROOT / "deploy/kubernetes/backend.json"))
    assert Path(config.config["kube-job-template-path"]).is_file()
    assert config.project() == ROOT / backends.KUBERNETES_DIR
    template = kubernetes.load_template(Path(config.config["kube-job-template-path"]))
    project = load_project(str(config.project()))
    command = project.get_entry_point("distill").compute_command({"experts_run": "abc"}, None)
    job = kubernetes.job_definition(template, project.name, "registry.example/kdd-mlflow", "sha256:0",
                                    command.split(), {"MLFLOW_RUN_ID": "r1", "MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    container = job.spec.template.spec.containers[0]
    assert job.kind == "Job" and container.image == "registry.example/kdd-mlflow@sha256:0"
    assert container.command[:2] == ["kdd", "distill"] and "--experts-run" in container.command
    assert {e.name: e.value for e in container.env}["MLFLOW_RUN_ID"] == "r1"
    assert job.spec.template.spec.restart_policy == "Never" and job.spec.backoff_limit == 0
    broken = tmp_path / "job.yaml"
    broken.write_text("apiVersion: batch/v1\nkind: Deployment\n")
    with pytest.raises(ValueError, match="must be a batch/v1 Job"):
        kubernetes.check_config({"kube-job-template-path": str(broken), "repository-uri": "r"})


# --- a real cluster ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    with slurm_cluster() as running:
        yield running


@pytest.fixture
def on_cluster(cluster, monkeypatch, tmp_path, fake_fashion):
    """The cluster's clients reachable, the dataset found by the jobs, a log directory for the jobs."""
    for key, value in cluster.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KDD_DATA_DIR", str(fake_fashion.parent))
    backends.use_this_interpreter()
    return cluster, {"log_dir": str(tmp_path / "jobs"), "poll_s": 0.5}


def wait(submitted, seconds: float = 300) -> str:
    deadline = time.monotonic() + seconds
    while (status := submitted.get_status()) in ("RUNNING", "SCHEDULED"):
        assert time.monotonic() < deadline, f"job {submitted.job_id} still {status}"
        time.sleep(0.5)
    return status


@pytest.mark.slow
def test_a_stage_runs_as_a_slurm_job_and_keeps_its_output(on_cluster):
    cluster, config = on_cluster
    # as `mlflow run . -e train --backend slurm` does it: MLflow finds the backend by its entry point and waits
    submitted = mlflow.projects.run(str(ROOT), "train", parameters=TRAIN, backend="slurm", backend_config=config,
                                    env_manager="local", synchronous=True)
    assert submitted.get_status() == "FINISHED"
    run = mlflow.get_run(submitted.run_id)
    assert run.info.status == "FINISHED" and run.data.tags[slurm.JOB_TAG] == submitted.job_id
    assert run.data.tags["mlflow.project.backend"] == "slurm" and run.data.tags[slurm.STATE_TAG] == "COMPLETED"
    assert cluster.jobs()[submitted.job_id] == "COMPLETED"
    assert "test_acc" in run.data.metrics
    kept = [a.path for a in mlflow.MlflowClient().list_artifacts(submitted.run_id, "slurm")]
    assert kept == [f"slurm/kdd-train-{submitted.job_id}.out"]
    script = next(Path(config["log_dir"]).glob("kdd-train-*.sbatch")).read_text()
    assert f"MLFLOW_RUN_ID={submitted.run_id}" in script


@pytest.mark.slow
def test_cancelled_jobs_end_their_runs_killed_running_or_pending(on_cluster):
    cluster, config = on_cluster
    long = {**TRAIN, "epochs": "500"}
    running = backends.Backend("slurm", config).submit("train", long, "0", "long", "local")
    deadline = time.monotonic() + 120
    while not mlflow.get_run(running.run_id).data.params:  # the stage has started and logged its config
        assert time.monotonic() < deadline and running.get_status() in ("RUNNING", "SCHEDULED")
        time.sleep(0.5)
    pending = backends.Backend("slurm", {**config, "sbatch": ["--begin=now+1hour"]}).submit(
        "train", TRAIN, "0", "later", "local")
    assert pending.get_status() == "SCHEDULED"
    for submitted in (running, pending):
        submitted.cancel()
        assert submitted.get_status() == "KILLED"
        assert mlflow.get_run(submitted.run_id).info.status == "KILLED"
        assert cluster.jobs()[submitted.job_id] == "CANCELLED"


@pytest.mark.slow
def test_failing_jobs_end_their_runs_failed_with_the_reason(on_cluster):
    cluster, config = on_cluster
    backend = backends.Backend("slurm", config)
    stage_fails = backend.submit("distill", {"experts_run": "0123456789abcdef", "dataset": "fashion-mnist",
                                             "device": "cpu"}, "0", "no-experts", "local")
    job_fails = backends.Backend("slurm", {**config, "setup": ["echo 'no such module' >&2; exit 3"]}).submit(
        "train", TRAIN, "0", "bad-setup", "local")
    assert wait(stage_fails) == "FAILED" and wait(job_fails) == "FAILED"
    said = mlflow.get_run(stage_fails.run_id).data.tags["kdd.error"]
    assert "0123456789abcdef" in said and "not found" in said  # the stage's own reason
    run = mlflow.get_run(job_fails.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["kdd.error"].startswith(f"slurm job {job_fails.job_id} ended FAILED (NonZeroExitCode, "
                                                 "exit code 3:0)")
    assert {cluster.jobs()[s.job_id] for s in (stage_fails, job_fails)} == {"FAILED"}
    out = mlflow.artifacts.load_text(f"runs:/{job_fails.run_id}/slurm/kdd-train-{job_fails.job_id}.out")
    assert "no such module" in out

