"""What a stage run shows in MLflow besides its results: its experiment, its name and its dataset inputs."""

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from kdd_mlflow import data, lineage, tracking
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


def test_dataset_inputs_carry_name_context_source_and_a_cheap_digest(monkeypatch):
    images, labels = torch.randn(50, 1, 8, 8), torch.arange(50) % 10
    train = data.Split(images, labels, "fashion-mnist-train", "/data/fashion-mnist")
    synthetic = data.Split(images[:10], labels[:10], "synthetic-abc", "runs:/abc/synthetic")
    with mlflow.start_run() as active:
        lineage.log_inputs(training=synthetic, test=train.to("cpu"))
    logged = {d.dataset.name: d for d in mlflow.get_run(active.info.run_id).inputs.dataset_inputs}
    assert {n: d.tags[0].value for n, d in logged.items()} == {"synthetic-abc": "training",
                                                                "fashion-mnist-train": "test"}
    assert logged["synthetic-abc"].dataset.source == '{"uri": "runs:/abc/synthetic"}'
    assert logged["fashion-mnist-train"].dataset.source_type == "local"
    assert logged["fashion-mnist-train"].dataset.digest == lineage.digest(train)

    monkeypatch.setattr(lineage, "DIGEST_BYTES", 3 * 64 * 4)  # three of the fifty images are hashed
    relabelled = data.Split(images, labels.roll(1))
    assert lineage.digest(relabelled) != lineage.digest(train)  # every label counts
    hashed_image, unhashed_image = images.clone(), images.clone()
    hashed_image[0] += 1
    unhashed_image[1] += 1
    assert lineage.digest(data.Split(hashed_image, labels)) != lineage.digest(train)
    assert lineage.digest(data.Split(unhashed_image, labels)) == lineage.digest(train)


def test_a_dataset_logged_by_two_runs_at_once_is_linked_on_the_next_attempt(monkeypatch):
    """Two stages side by side may both insert the same dataset; the store refuses the second insert."""
    from mlflow.exceptions import MlflowException

    calls = []

    def refused_once(dataset, context):
        calls.append(context)
        if len(calls) == 1:
            raise MlflowException('(psycopg.errors.UniqueViolation) duplicate key value violates unique '
                                  'constraint "dataset_pk"')

    monkeypatch.setattr(mlflow, "log_input", refused_once)
    lineage.log_input(object(), "training")
    assert calls == ["training", "training"]

    def broken(dataset, context):
        calls.append(context)
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: run gone")

    monkeypatch.setattr(mlflow, "log_input", broken)
    calls.clear()
    with pytest.raises(MlflowException, match="run gone"):
        lineage.log_input(object(), "training")
    assert calls == ["training"]  # any other error is not retried


def test_reading_an_artifact_leaves_no_copy_in_the_temporary_directory(tmp_path, monkeypatch):
    """Through a tracking server, MLflow downloads an artifact asked for without a destination into a fresh temporary
    directory and never removes it (a whitened run's input space is 75 MB). The readers give it one of their own."""
    import json
    import tempfile

    from safetensors.torch import save_file

    (tmp_path / "files").mkdir()
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(tmp_path / "files" / "space.safetensors"))
    (tmp_path / "files" / "manifest.json").write_text(json.dumps({"experts": [1, 2]}))
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(tmp_path / "files"), "kept")

    real = mlflow.artifacts.download_artifacts

    def as_a_server_does(*args, dst_path=None, **kwargs):  # what the remote artifact repositories do
        return real(*args, dst_path=dst_path or tempfile.mkdtemp(), **kwargs)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", as_a_server_does)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    run_id = run.info.run_id
    assert tracking.load_json(run_id, "kept/manifest.json") == {"experts": [1, 2]}
    assert torch.equal(tracking.load_tensors(run_id, "kept/space.safetensors")["w"], torch.arange(6.0).reshape(2, 3))
    assert list(scratch.iterdir()) == []
    with pytest.raises(tracking.ArtifactError, match="kept/missing.json"):
        tracking.load_json(run_id, "kept/missing.json")
    assert list(scratch.iterdir()) == []
