"""The team deployment without containers: PostgreSQL, an `mlflow server` with basic auth on 127.0.0.1,
two experts shards and two tuning workers against them, the combined pipeline and tuning workers as jobs of a
one-node Slurm cluster, and no secret anywhere they write."""

from __future__ import annotations

import json
import os
import subprocess

import mlflow
import optuna
import pytest

from kdd_mlflow.backends.slurm import JOB_TAG
from kdd_mlflow.tune import STUDY_RUN_ATTR
from tests.conftest import write_idx_dataset
from tests.services import BIN, finish, mlflow_server, postgres, slurm, start_kdd
from tests.test_pipeline import TINY as TINY_PIPELINE
from tests.test_tune import TINY

pytestmark = pytest.mark.slow

# Three secrets, each of which must stay out of every param, tag, artifact and log line.
PG_PASSWORD = "pg-Secret-4471"
ADMIN_PASSWORD = "admin-Secret-9923"
SECRET_KEY = "flask-Secret-5108"
SECRETS = (PG_PASSWORD, ADMIN_PASSWORD, SECRET_KEY)
DATABASES = ("mlflow", "mlflow_auth", "optuna")  # as docker/postgres-init.sql creates them


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """PostgreSQL with the tracking, auth and Optuna databases; the tracking server in front of it."""
    root = tmp_path_factory.mktemp("team")
    with postgres(DATABASES, PG_PASSWORD) as pg, \
            mlflow_server(root / "server", pg, ADMIN_PASSWORD, SECRET_KEY) as url:
        yield root, pg, url


@pytest.fixture
def client_env(team, monkeypatch, tmp_path):
    """A worker's environment: the server's URL, the user's credentials, the database password for libpq."""
    root, pg, url = team
    env = {"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD,
           "PGPASSWORD": PG_PASSWORD}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(url)
    data_dir = write_idx_dataset(tmp_path / "data" / "fashion-mnist")
    monkeypatch.setenv("KDD_DATA_DIR", str(data_dir.parent))
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "TQDM_DISABLE": "1"}


@pytest.fixture(scope="module")
def cluster():
    with slurm() as running:
        yield running


def slurm_config(tmp_path) -> str:
    path = tmp_path / "slurm.json"
    path.write_text(json.dumps({"log_dir": str(tmp_path / "jobs"), "poll_s": 1}))
    return str(path)


def assert_no_secret(*logs: str) -> None:
    """No secret in the given logs, nor in any param, tag or text artifact of any run on the server."""
    for text in logs:
        assert not any(s in text for s in SECRETS), "a secret reached a log"
    client = mlflow.MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    assert runs
    for run in runs:
        fields = " ".join([*run.data.params.values(), *run.data.tags.values(), *run.data.params, *run.data.tags])
        assert not any(s in fields for s in SECRETS), f"a secret reached run {run.info.run_id}'s params or tags"
        pending = list(client.list_artifacts(run.info.run_id))
        while pending:
            artifact = pending.pop()
            if artifact.is_dir:
                pending += client.list_artifacts(run.info.run_id, artifact.path)
            elif artifact.path.endswith((".json", ".csv", ".md", ".txt", ".yaml", ".html", "MLmodel")):
                text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/{artifact.path}")
                assert not any(s in text for s in SECRETS), f"a secret reached {run.info.run_id}/{artifact.path}"


def test_experts_shards_as_slurm_jobs_fill_one_buffer_through_the_server(client_env, cluster, tmp_path):
    env = {**client_env, **cluster.env}
    shards, = finish(start_kdd("experts", "--dataset", "fashion-mnist", "--val-size", "100", "--budget", "quick",
                               "--model", "convnet-w8", "--num-experts", "2", "--epochs", "2", "--shards", "2",
                               "--backend", "slurm", "--backend-config", slurm_config(tmp_path), cwd=tmp_path, env=env))
    runs = [mlflow.get_run(run_id) for run_id in shards.run_id.split(",")]
    assert [r.data.params["shard"] for r in runs] == ["0/2", "1/2"]
    jobs = cluster.jobs()
    assert all(r.info.status == "FINISHED" and jobs[r.data.tags[JOB_TAG]] == "COMPLETED" for r in runs)
    assert "backend" not in runs[0].data.params  # where a shard ran is a tag, not a parameter of its result
    distilled = finish(start_kdd("distill", "--experts-run", shards.run_id, "--dataset",
                                 "fashion-mnist", "--budget", "quick", "--ipc", "1", "--iterations", "2",
                                 "--syn-steps", "2", "--expert-epochs", "1", "--max-start-epoch", "1",
                                 "--eval-every", "2", "--num-eval", "1", "--eval-epochs", "3",
                                 cwd=tmp_path, env=client_env))
    distill = mlflow.get_run(distilled[0].run_id)
    assert distill.info.status == "FINISHED" and distill.data.params["experts"] == "2"
    assert distill.info.artifact_uri.startswith("mlflow-artifacts:")  # served by the tracking server
    assert (tmp_path / "mlruns").exists() is False  # nothing fell back to a local store
    assert_no_secret(*(f.out + f.err for f in (shards, *distilled)),
                     *(p.read_text() for p in (tmp_path / "jobs").iterdir()))


def test_two_tuning_workers_share_one_study_on_postgres(team, client_env, tmp_path):
    _, pg, _ = team
    # One worker is given the password inside the storage URL, the other through PGPASSWORD.
    with_password = pg.url("optuna").replace(f"{pg.user}@", f"{pg.user}:{PG_PASSWORD}@")
    args = ["tune", "--dataset", "fashion-mnist", "--val-size", "100", "--budget", "quick", "--ipc", "2",
            "--lr-teacher", "0.01", "--lr-lr", "1e-5", "--temperature", "1:8", "--teacher-model", "convnet-w16",
            "--student-model", "convnet-w8", "--overrides", TINY, "--env-manager", "local", "--n-trials", "2",
            "--study-name", "team", "--load-if-exists", "true", "--pruner", "none", "--heartbeat", "5"]
    outputs = finish(start_kdd(*args, "--storage", with_password, cwd=tmp_path, env=client_env),
                     start_kdd(*args, "--storage", pg.url("optuna"), cwd=tmp_path, env=client_env))

    storage = optuna.storages.RDBStorage(pg.url("optuna"))
    study = optuna.load_study(study_name="team", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    workers = [mlflow.get_run(f.run_id) for f in outputs]
    assert sum(int(w.data.metrics["trials_run_here"]) for w in workers) == 2
    assert sorted(w.data.tags["kdd.role"] for w in workers) == ["study", "worker"]
    # the password given in the URL is masked in the params, the other URL had none to mask
    assert {w.data.params["storage"] for w in workers} == {pg.url("optuna"),
                                                          pg.url("optuna").replace(f"{pg.user}@", f"{pg.user}:***@")}
    study_run = next(w for w in workers if w.data.tags["kdd.role"] == "study").info.run_id
    trials = mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string=(
        f"tags.`mlflow.parentRunId` = '{study_run}' and tags.`kdd.stage` = 'trial'"))
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials)
    assert_no_secret(*(f.out + f.err for f in outputs))


def test_wrong_credentials_are_refused_in_one_line(client_env, tmp_path):
    env = {**client_env, "MLFLOW_TRACKING_PASSWORD": "not-the-password"}
    done = subprocess.run([str(BIN / "kdd"), "train", "--dataset", "fashion-mnist"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1].startswith("kdd train: error: tracking server")
    assert "HTTP 401" in done.stderr and "Traceback" not in done.stderr


def children(parent_id: str) -> list:
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def test_combined_on_slurm_reports_what_the_local_backend_does(client_env, cluster, tmp_path):
    # one thread per stage on both sides (a Slurm job gets as many as its CPUs, here 1), so that the two
    # reports can agree to the last digit, and the two pipelines do not spin against each other
    env = {**client_env, **cluster.env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = ["combined", "--dataset", "fashion-mnist", "--val-size", "100", "--budget", "quick", "--ipc", "2",
            "--teacher-model", "convnet-w16", "--student-model", "convnet-w8", "--overrides", TINY_PIPELINE,
            "--env-manager", "local", "--arms", "proposal"]
    # side by side, each in its own experiment, so neither reuses the other's stage runs
    local, on_slurm = finish(
        start_kdd(*args, cwd=tmp_path, env={**env, "MLFLOW_EXPERIMENT_NAME": "backend-local"}),
        start_kdd(*args, "--backend", "slurm", "--backend-config", slurm_config(tmp_path), cwd=tmp_path,
                  env={**env, "MLFLOW_EXPERIMENT_NAME": "backend-slurm"}))

    client = mlflow.MlflowClient()
    runs = {name: mlflow.get_run(f.run_id) for name, f in (("local", local), ("slurm", on_slurm))}
    assert {name: r.data.tags["kdd.backend"] for name, r in runs.items()} == {"local": "local", "slurm": "slurm"}
    assert runs["slurm"].data.tags["kdd.reused_runs"] == "-"  # every stage ran, as a job
    jobs = cluster.jobs()
    kids = children(on_slurm.run_id)
    assert sorted(k.info.run_name for k in kids) == ["distill", "experts", "proposal/seed0", "teacher-full/seed0",
                                                     "teacher-synthetic/seed0"]
    for kid in kids:
        assert kid.info.status == "FINISHED" and kid.data.tags["mlflow.project.backend"] == "slurm"
        assert jobs[kid.data.tags[JOB_TAG]] == "COMPLETED"
    assert not any(JOB_TAG in k.data.tags for k in children(local.run_id))

    tables = {name: client.load_table(r.info.experiment_id, "report/comparison.json", [r.info.run_id])
              for name, r in runs.items()}
    assert list(tables["slurm"]["arm"]) == list(tables["local"]["arm"]) == ["teacher-full", "proposal"]
    # the same report: every column but the run ids and the wall time (the local backend ran the stages
    # one by one, the cluster side by side)
    shown = [c for c in tables["local"].columns if c not in ("runs", "wall_s")]
    for mine, theirs in zip(tables["slurm"][shown].to_dict("records"), tables["local"][shown].to_dict("records"),
                            strict=True):
        numbers = [k for k, v in theirs.items() if isinstance(v, float)]
        assert {k: mine[k] for k in numbers} == pytest.approx({k: theirs[k] for k in numbers}, abs=1e-6)
        assert {k: v for k, v in mine.items() if k not in numbers} == {
            k: v for k, v in theirs.items() if k not in numbers}
    assert_no_secret(local.out + local.err, on_slurm.out + on_slurm.err,
                     *(p.read_text() for p in (tmp_path / "jobs").iterdir()))


def test_tuning_workers_as_slurm_jobs_join_the_study(team, client_env, cluster, tmp_path):
    """Two more workers, as jobs, on the study the previous test made: the study grows to four trials (its
    experts, distill and teacher runs are reused; the students differ by temperature)."""
    _, pg, _ = team
    env = {**client_env, **cluster.env}
    args = ["tune", "--dataset", "fashion-mnist", "--val-size", "100", "--budget", "quick", "--ipc", "2",
            "--lr-teacher", "0.01", "--lr-lr", "1e-5", "--temperature", "1:8", "--teacher-model", "convnet-w16",
            "--student-model", "convnet-w8", "--overrides", TINY, "--env-manager", "local", "--n-trials", "4",
            "--study-name", "team", "--pruner", "none", "--heartbeat", "5", "--workers", "2", "--backend", "slurm",
            "--backend-config", slurm_config(tmp_path)]
    with_password = pg.url("optuna").replace(f"{pg.user}@", f"{pg.user}:{PG_PASSWORD}@")
    refused = subprocess.run([str(BIN / "kdd"), *args, "--storage", with_password], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "PGPASSWORD" in refused.stderr.strip().splitlines()[-1]
    assert PG_PASSWORD not in refused.stderr

    storage = optuna.storages.RDBStorage(pg.url("optuna"))
    before = len(optuna.load_study(study_name="team", storage=storage).trials) if "team" in \
        optuna.study.get_all_study_names(storage) else 0  # two when the test above ran
    done, = finish(start_kdd(*args, "--storage", pg.url("optuna"), cwd=tmp_path, env=env))
    study = optuna.load_study(study_name="team", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    study_run = study.user_attrs[STUDY_RUN_ATTR]
    assert done.run_id == study_run
    on_slurm = mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string=(
        f"tags.`optuna.study` = 'team' and tags.`kdd.stage` = 'tune' and tags.`{JOB_TAG}` != ''"))
    assert len(on_slurm) == 2
    for worker in on_slurm:  # each either made the study or is a child of the run that did
        assert (worker.info.run_id == study_run if worker.data.tags["kdd.role"] == "study"
                else worker.data.tags["mlflow.parentRunId"] == study_run)
    jobs = cluster.jobs()
    assert all(w.info.status == "FINISHED" and jobs[w.data.tags[JOB_TAG]] == "COMPLETED" for w in on_slurm)
    assert sum(int(w.data.metrics["trials_run_here"]) for w in on_slurm) == 4 - before
    assert_no_secret(done.out + done.err, *(p.read_text() for p in (tmp_path / "jobs").iterdir()))
