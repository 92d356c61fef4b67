import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import mlflow
import optuna
import pytest
from click.testing import CliRunner

from kdd_mlflow import cli, pipeline, tune
from kdd_mlflow.config import TuneConfig
from kdd_mlflow.search_space import parse_dimension

TINY = ",".join([
    "experts.model=convnet-w8-d2", "experts.num_experts=1", "experts.epochs=3",
    "distill.iterations=2", "distill.syn_steps=2", "distill.expert_epochs=1", "distill.max_start_epoch=2",
    "distill.eval_every=1", "distill.num_eval=1", "distill.eval_epochs=5",
    "teacher.epochs=2", "kd.epochs=2",
])


def runs_with(**tags) -> list:
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string=where)


@pytest.mark.slow
def test_three_trial_study_with_its_mlflow_runs(fake_fashion, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    # One distill setting and a choice of temperatures: the trials share experts, distill and teacher runs.
    cfg = TuneConfig(dataset="fashion-mnist", data_dir=str(fake_fashion), val_size=100, budget="quick", ipc="2",
                     lr_teacher="0.01", lr_lr="1e-5", temperature="1:8", teacher_model="convnet-w16",
                     student_model="convnet-w8", overrides=TINY, env_manager="local", n_trials=3, storage=storage,
                     study_name="s3", pruner="none")
    study_run = tune.run(cfg)

    study = optuna.load_study(study_name="s3", storage=storage)
    assert len(study.trials) == 3 and all(t.state.name == "COMPLETE" for t in study.trials)
    trials = runs_with(**{"mlflow.parentRunId": study_run, "kdd.stage": "trial"})
    assert sorted(r.data.tags["optuna.trial_number"] for r in trials) == ["0", "1", "2"]
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in trials}
    for t in study.trials:
        run = by_number[t.number]
        assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "COMPLETE"
        assert float(run.data.params["temperature"]) == t.params["temperature"]
        # the value is the proposal's validation accuracy, test accuracy only an attribute
        proposal = mlflow.get_run(t.user_attrs["proposal_run"])
        assert t.value == pytest.approx(proposal.data.metrics["val_acc"])
        assert t.user_attrs["test_acc"] == pytest.approx(proposal.data.metrics["test_acc"])
        assert proposal.data.tags["mlflow.parentRunId"] == run.info.run_id
    # upstream work is shared: one experts, one distill, one teacher run for the three trials
    assert len(runs_with(**{"kdd.stage": "experts"})) == 1
    assert len(runs_with(**{"kdd.stage": "distill"})) == 1
    assert len({t.user_attrs["teacher_run"] for t in study.trials}) == 1
    assert len({t.user_attrs["proposal_run"] for t in study.trials}) == 3

    parent = mlflow.get_run(study_run)
    assert parent.info.status == "FINISHED" and parent.data.tags["kdd.role"] == "study"
    assert mlflow.get_experiment(parent.info.experiment_id).name == "s3"  # the study's own experiment
    assert {r.info.experiment_id for r in trials} == {parent.info.experiment_id}
    assert parent.data.tags["best.trial"] == str(study.best_trial.number)
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    assert parent.data.metrics["trials_complete"] == 3
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(study_run, "study")}
    assert {"study/optimization_history.html", "study/parallel_coordinate.html", "study/trials.csv"} <= names
    html = mlflow.artifacts.load_text(f"runs:/{study_run}/study/optimization_history.html")
    assert "Plotly.newPlot" in html and "<script src=" not in html and len(html) > 1_000_000  # plotly.js inlined

    # the storage opens with Optuna's own command line
    optuna_cli = str(Path(sys.executable).parent / "optuna")
    out = subprocess.run([optuna_cli, "trials", "--study-name", "s3", "--storage", storage, "-f", "json"],
                         capture_output=True, text=True, check=True).stdout
    assert len(json.loads(out)) == 3


WORKER = textwrap.dedent("""
    import sys, time, optuna
    from kdd_mlflow import tune
    storage_url, n_trials, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    storage = tune.open_storage(storage_url, heartbeat=1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tune.storage_lock(storage_url, "shared"):
        study = optuna.create_study(storage=storage, study_name="shared", load_if_exists=True,
                                    sampler=optuna.samplers.RandomSampler())
    def objective(trial):
        x = trial.suggest_float("x", -1, 1)
        trial.set_user_attr("pid", __import__("os").getpid())
        time.sleep(seconds)
        return x * x
    ran = tune.work(study, objective, n_trials, None, lambda: tune.storage_lock(storage_url, "shared"))
    print(ran)
""")


def start_worker(storage: str, n_trials: int, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, storage, str(n_trials), str(seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_two_workers_split_the_trials_with_none_lost_or_duplicated(tmp_path, kind):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}" if kind == "sqlite" else str(tmp_path / "optuna.log")
    workers = [start_worker(storage, 10, 0.3) for _ in range(2)]
    outputs = [w.communicate(timeout=300) for w in workers]
    assert all(w.returncode == 0 for w in workers), [o[1][-2000:] for o in outputs]
    ran = [int(o[0].split()[-1]) for o in outputs]
    study = optuna.load_study(study_name="shared", storage=tune.open_storage(storage, 1))
    trials = study.get_trials()
    assert sum(ran) == 10 and min(ran) >= 1  # both worked; together exactly the requested number
    assert len(trials) == 10 and sorted(t.number for t in trials) == list(range(10))
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert len({t.user_attrs["pid"] for t in trials}) == 2


def test_a_killed_workers_trial_is_failed_and_retried(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    stuck = start_worker(storage, 1, 600)  # takes the only trial, then hangs in it
    study = None
    for _ in range(300):
        time.sleep(0.1)
        try:
            study = optuna.load_study(study_name="shared", storage=tune.open_storage(storage, 1))
        except KeyError:
            continue
        # inside the objective (it records its pid), so the trial's heartbeat thread has started: a trial
        # killed before its first heartbeat is never stale, and the rescuer would leave it RUNNING
        if any(t.state.name == "RUNNING" and "pid" in t.user_attrs for t in study.get_trials()):
            break
    time.sleep(0.5)
    os.kill(stuck.pid, signal.SIGKILL)
    stuck.wait()
    time.sleep(3)  # past the grace period of two heartbeats
    rescuer = start_worker(storage, 1, 0)
    out, err = rescuer.communicate(timeout=120)
    assert rescuer.returncode == 0, err[-2000:]
    states = [t.state.name for t in study.get_trials()]
    assert states == ["FAIL", "COMPLETE"]  # the dead trial failed and does not count; another took its place
    assert tune.counted_trials(study) == 1


def test_the_pruner_stops_trials_whose_stage_metrics_trail(tmp_path):
    """A contrived objective: each trial's 'stage run' logs a validation curve; the Reporter feeds it."""
    study = optuna.create_study(direction="maximize", pruner=tune.make_pruner(TuneConfig(n_trials=5)),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    levels = iter([0.9, 0.8, 0.1, 0.95, 0.05])

    def objective(trial):
        level = next(levels)
        with mlflow.start_run() as run:
            for step in range(5):
                mlflow.log_metric("val_acc", level * (step + 1) / 5, step=step)
        tune.Reporter(trial, enabled=True)(run.info.run_id)
        return level

    study.optimize(objective, n_trials=5)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE", "PRUNED"]
    # the first value (the initial set's evaluation) never prunes; the second does
    assert study.trials[2].intermediate_values == {0: pytest.approx(0.02), 1: pytest.approx(0.04)}


@pytest.mark.slow
def test_a_watch_that_raises_cancels_the_stage_and_marks_it_killed(fake_fashion, monkeypatch):
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # local stages
    calls = []

    def watch(run_id):
        calls.append(run_id)
        if len(calls) >= 2:
            raise optuna.TrialPruned("stop")

    runner = pipeline.Runner(mlflow.get_experiment_by_name("Default").experiment_id, "local", set(), poll_s=1.0)
    params = {"dataset": "fashion-mnist", "data_dir": str(fake_fashion), "val_size": 100, "budget": "quick",
              "model": "convnet-w8", "epochs": 2000, "ipc": 5}
    with pytest.raises(optuna.TrialPruned):
        runner("teacher", params, "cancel-me", watch=watch)
    run = mlflow.get_run(calls[0])
    for _ in range(50):
        if run.info.status != "RUNNING":
            break
        time.sleep(0.2)
        run = mlflow.get_run(calls[0])
    assert run.info.status == "KILLED"
    # the stage's process led its own group, and nothing of that group is left
    (started,) = runner.launched.values()
    process = started.submitted.command_proc
    assert process.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)


def test_bad_search_space_is_rejected_before_any_trial(tmp_path):
    storage = tmp_path / "optuna.db"
    for args, reason in [
        (["--temperature", "20:1"], "temperature: range '20:1' must be LOW:HIGH with LOW < HIGH"),
        (["--ipc", "1,2.5"], "ipc: '1,2.5' must be whole numbers"),
        (["--lr-teacher", "0:1"], "lr_teacher: '0:1' must be > 0"),
        (["--alpha", "0.2:1.5"], "alpha: '0.2:1.5' must be in [0, 1]"),
        (["--lr-lr", "fast"], "lr_lr: 'fast' must be a number, LOW:HIGH or A,B,C"),
        (["--overrides", "kd.temperature=3"], "kd.temperature is a search parameter"),
        (["--pruner", "sometimes"], "pruner:"),
        (["--storage", "optuna.db"], "must be an RDB URL"),
        ([], "give --n-trials and/or --timeout"),
    ]:
        n = [] if not args else ["--n-trials", "2"]
        result = CliRunner().invoke(cli.main, ["tune", "--storage", f"sqlite:///{storage}", *n, *args])
        assert result.exit_code == 2 and reason in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
    result = CliRunner().invoke(cli.main, ["tune", "--n-trials", "2", "--momentum", "0.9"])
    assert result.exit_code == 2 and result.stderr == "kdd tune: error: No such option '--momentum' (see --help)\n"
    assert not storage.exists()
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_search_space_grammar():
    assert parse_dimension("ipc", "1,10,50").kind == "choice"
    d = parse_dimension("temperature", "1:20")
    assert d.kind == "range" and d.log and d.values == (1.0, 20.0)
    assert parse_dimension("alpha", "0.3").kind == "fixed" and not parse_dimension("alpha", "0:1").log
    with pytest.raises(ValueError, match="unknown search parameter 'beta'"):
        parse_dimension("beta", "1")


def test_storage_passwords_stay_out_of_params():
    from kdd_mlflow import tracking

    cfg = TuneConfig(n_trials=1, storage="postgresql://kdd:hunter2@db:5432/optuna")
    assert tracking.flat_params(cfg)["storage"] == "postgresql://kdd:***@db:5432/optuna"


def test_optuna_dashboard_serves_the_study(tmp_path):
    pytest.importorskip("optuna_dashboard")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=storage, study_name="shown")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    port = 18000 + os.getpid() % 1000
    server = subprocess.Popen([str(Path(sys.executable).parent / "optuna-dashboard"), storage, "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2).read()
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("optuna-dashboard did not answer")
        studies = json.loads(body)["study_summaries"]
        assert [s["study_name"] for s in studies] == ["shown"]
    finally:
        server.terminate()
        server.wait()
