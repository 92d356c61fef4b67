"""What a stage run shows in MLflow besides its results: its experiment and its name."""

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from kdd_mlflow import tracking
from kdd_mlflow.config import TrainConfig

CFG = TrainConfig(dataset="fashion-mnist")


def stage(**kw) -> mlflow.entities.Run:
    with tracking.stage_run("train", CFG, run_name="train-convnet-fashion-mnist", **kw) as active:
        pass
    return mlflow.get_run(active.info.run_id)


def test_a_new_stage_run_goes_to_the_dataset_experiment_unless_the_user_chose_one(monkeypatch):
    run = stage()
    assert mlflow.get_experiment(run.info.experiment_id).name == "kdd-fashion-mnist"
    assert run.info.run_name == "train-convnet-fashion-mnist"
    assert stage().info.experiment_id == run.info.experiment_id
    assert mlflow.get_experiment(stage(experiment="my-study").info.experiment_id).name == "my-study"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "chosen")
    assert mlflow.get_experiment(stage().info.experiment_id).name == "chosen"


def test_a_joined_run_stays_in_its_experiment_and_keeps_the_name_its_launcher_gave(monkeypatch):
    client = MlflowClient()
    named = client.create_run("0", run_name="proposal/seed0")
    monkeypatch.setenv("MLFLOW_RUN_ID", named.info.run_id)
    run = stage()
    assert (run.info.run_id, run.info.experiment_id, run.info.run_name) == (named.info.run_id, "0", "proposal/seed0")
    unnamed = client.create_run("0")  # `mlflow run` without --run-name: MLflow makes a name up
    assert tracking.generated_name(unnamed.info.run_name)
    monkeypatch.setenv("MLFLOW_RUN_ID", unnamed.info.run_id)
    assert stage().info.run_name == "train-convnet-fashion-mnist"


def test_a_deleted_dataset_experiment_fails_in_one_line():
    mlflow.delete_experiment(mlflow.create_experiment("kdd-fashion-mnist"))
    with pytest.raises(ValueError, match="experiment 'kdd-fashion-mnist' is deleted: restore it"):
        stage()
