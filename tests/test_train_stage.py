import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner

from kdd_mlflow import cli, data, models, tracking
from kdd_mlflow.artifacts import model as model_artifact
from kdd_mlflow.config import TrainConfig
from kdd_mlflow.mlproject import render
from kdd_mlflow.stages import train as train_stage
from kdd_mlflow.train import SGDRecipe, evaluate, fit, supervised

ROOT = Path(__file__).resolve().parents[1]


def test_fit_learns_on_generated_data(fake_fashion):
    real = data.load("fashion-mnist", fake_fashion, val_size=100)
    model = models.create("convnet-w32", 1, 10, 28)
    losses = []
    fit(model, real.train, SGDRecipe(epochs=3, batch_size=64, lr=0.05), torch.Generator().manual_seed(0),
        on_epoch=lambda e, m: losses.append(m["train_loss"]), progress=False)
    assert losses[-1] < losses[0]
    assert evaluate(model, real.test)["acc"] > 0.6  # chance is 0.1


@pytest.mark.parametrize("epochs, validated",
                         [(3, [1, 2, 3]), (12, [2, 4, 6, 8, 10, 12]), (23, [4, 8, 12, 16, 20, 23])])
def test_validation_about_five_times_a_run_and_after_the_last_epoch(fake_fashion, epochs, validated):
    real = data.load("fashion-mnist", fake_fashion, val_size=100)
    seen = []
    fit(models.create("convnet-w8", 1, 10, 28), data.Split(real.train.images[:20], real.train.labels[:20]),
        SGDRecipe(epochs=epochs, batch_size=20),
        torch.Generator().manual_seed(0), val=real.val, progress=False,
        on_epoch=lambda e, m: seen.append(e + 1) if "val_acc" in m else None)
    assert seen == validated


@pytest.mark.parametrize("kd_teacher", [False, True], ids=["supervised", "kd"])
def test_bf16_precision_runs_forwards_in_bf16_and_keeps_weights_and_losses_float32(fake_fashion, kd_teacher):
    from kdd_mlflow import kd

    real = data.load("fashion-mnist", fake_fashion, val_size=100)
    torch.manual_seed(0)
    model = models.create("convnet-w32", 1, 10, 28)
    objective = None
    if kd_teacher:
        teacher = models.create("convnet-w32", 1, 10, 28)
        fit(teacher, real.train, SGDRecipe(3, 64, 0.05), torch.Generator().manual_seed(0), progress=False)
        objective = kd.kd_objective(teacher, kd.create_loss("hinton", temperature=2.0, alpha=0.5))
    base = objective or supervised()
    loss_dtypes = set()

    def spy(*args, **kwargs):
        loss, logits = base(*args, **kwargs)
        loss_dtypes.add(loss.dtype)
        return loss, logits

    seen, losses = set(), []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    hook = conv.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    fit(model, real.train, SGDRecipe(epochs=3, batch_size=64, lr=0.05, precision="bf16"),
        torch.Generator().manual_seed(0), on_epoch=lambda e, m: losses.append(m["train_loss"]), progress=False,
        objective=spy)
    hook.remove()
    assert seen == {torch.bfloat16} and loss_dtypes == {torch.float32}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < losses[0]
    assert evaluate(model, real.test)["acc"] > 0.6  # chance is 0.1; float32 evaluation of bf16-trained weights


def test_train_stage_logs_run_and_model_round_trips(fake_fashion):
    cfg = TrainConfig(dataset="fashion-mnist", data_dir=str(fake_fashion), model="convnet-w32", epochs=2,
                      batch_size=64, lr=0.05, val_size=100, augment="dsa")
    run_id = train_stage.run(cfg)
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "2" and run.data.params["model"] == "convnet-w32"
    assert run.data.metrics["test_acc"] > 0.3
    history = mlflow.MlflowClient().get_metric_history(run_id, "val_acc")
    assert [m.step for m in history] == [1, 2]
    config = mlflow.artifacts.load_dict(f"runs:/{run_id}/config.json")
    assert config == cfg.model_dump()

    real = data.load("fashion-mnist", fake_fashion, val_size=100)
    loaded = model_artifact.load(run_id, expect={"dataset": "fashion-mnist"})
    ours, spec = loaded.module, loaded.spec
    assert loaded.space.zca is None and spec["model"] == "convnet-w32"
    logged = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    x = real.test.images[:16]
    with torch.no_grad():
        ours.eval()
        # the exported (pt2) graph runs torch's own avg_pool2d, which adds a block's four values in another order
        # than the ConvNet's pooling (kdd_mlflow/layers.py): the same network to float32 rounding
        torch.testing.assert_close(ours(x), logged(x), rtol=1e-5, atol=1e-6)
    # the MLflow model's environment pins what loading it needs, at this environment's versions
    requirements = mlflow.artifacts.load_text(f"runs:/{run_id}/model/requirements.txt").split()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements
    assert f"mlflow=={mlflow.__version__}" in requirements
    assert abs(evaluate(ours, real.test)["acc"] - run.data.metrics["test_acc"]) < 1e-6
    # the run keeps its test logits; a report reads them for this test split and computes them for another
    with torch.no_grad():
        computed = ours(real.test.images)
    stored = loaded.test_logits(real.test.images, real.test.labels)
    assert stored.shape == computed.shape and torch.allclose(stored, computed, atol=1e-5)
    assert stored.data_ptr() == loaded.test["logits"].data_ptr()  # read, not recomputed
    other = loaded.test_logits(real.test.images[:16], real.test.labels[:16])
    assert other.shape == (16, 10) and other.data_ptr() != loaded.test["logits"].data_ptr()
    with pytest.raises(tracking.ArtifactError, match="dataset='fashion-mnist', expected 'mnist'"):
        model_artifact.load(run_id, expect={"dataset": "mnist"})


def test_a_model_logged_on_a_gpu_machine_passes_its_input_example_check_and_loads_on_the_cpu(monkeypatch):
    """MLflow loads a pyfunc on CUDA wherever there is one, and refuses a pt2 program exported on the CPU there. The
    input-example check at logging time runs on the CPU, where the program was exported (here CUDA is pretended: the
    check fails before anything runs on a device)."""
    import logging

    from kdd_mlflow.artifacts.space import InputSpace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("MLFLOW_DEFAULT_PREDICTION_DEVICE", raising=False)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("mlflow.models.model")
    logger.addHandler(handler)
    model = models.create("convnet-w8-d2", 1, 10, 28)
    example = torch.randn(4, 1, 28, 28)
    try:
        with mlflow.start_run() as run:
            model_artifact.log(model, "convnet-w8-d2", InputSpace("fashion-mnist"), example)
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "Failed to validate serving input example" in r.getMessage()]
    assert "MLFLOW_DEFAULT_PREDICTION_DEVICE" not in os.environ  # restored
    uri = f"runs:/{run.info.run_id}/model"
    with pytest.raises(mlflow.exceptions.MlflowException, match="can't be loaded on 'cuda'"):
        mlflow.pyfunc.load_model(uri)  # what the docstring of model_artifact.log tells GPU users to avoid
    loaded = mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(torch.as_tensor(loaded.predict(example.numpy())), model(example),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.real_data
def test_train_on_real_fashion_mnist_subset(real_fashion):
    cfg = TrainConfig(dataset="fashion-mnist", model="convnet-w32", epochs=2, batch_size=64, lr=0.05,
                      train_limit=3000)
    run = mlflow.get_run(train_stage.run(cfg))
    assert run.data.metrics["test_acc"] > 0.7


def test_cli_help_lists_stages():
    result = CliRunner().invoke(cli.main, ["--help"])
    assert result.exit_code == 0 and "train" in result.output
    result = CliRunner().invoke(cli.main, ["train", "--help"])
    assert result.exit_code == 0 and "--dataset" in result.output and "--epochs" in result.output


@pytest.mark.parametrize(
    "args, reason",
    [
        (["--dataset", "nope"], "dataset: unknown dataset 'nope'"),
        (["--model", "vgg99"], "model: unknown model 'vgg99'"),
        (["--epochs", "0"], "epochs: Input should be greater than or equal to 1"),
        (["--lr", "-1"], "lr: Input should be greater than 0"),
        (["--device", "tpu"], "device: unknown device 'tpu'"),
    ],
)
def test_bad_input_fails_before_work_with_one_line(args, reason):
    result = CliRunner().invoke(cli.main, ["train", *args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and reason in lines[0]
    assert mlflow.search_runs(search_all_experiments=True).empty  # no run was started


def test_bad_input_under_mlflow_run_ends_failed_with_reason():
    run = mlflow.MlflowClient().create_run("0")
    env = {"MLFLOW_RUN_ID": run.info.run_id}
    result = CliRunner().invoke(cli.main, ["train", "--dataset", "nope"], env=env)
    assert result.exit_code == 2
    after = mlflow.get_run(run.info.run_id)
    assert after.info.status == "FAILED" and "unknown dataset" in after.data.tags[tracking.ERROR_TAG]


def test_missing_data_is_one_paragraph_without_traceback(tmp_path):
    result = CliRunner().invoke(cli.main, ["train", "--dataset", "mnist", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output + result.stderr
    assert "dataset 'mnist' is not available" in result.stderr and "KDD_DATA_DIR" in result.stderr


def test_mlproject_is_rendered_from_the_configs():
    assert (ROOT / "MLproject").read_text() == render(cli.STAGES)


@pytest.mark.slow
def test_mlflow_run_train_entry_point(fake_fashion, tmp_path):
    env = {**os.environ, "KDD_DATA_DIR": str(fake_fashion.parent),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "train", "--env-manager", "local",
           "-P", "dataset=fashion-mnist", "-P", "epochs=1", "-P", "model=convnet-w32", "-P", "val_size=100",
           "-P", "lr=0.050"]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = mlflow.search_runs(search_all_experiments=True)
    assert list(runs["status"]) == ["FINISHED"] and runs["metrics.test_acc"][0] > 0.2
    assert runs["params.lr"][0] == "0.050"
    spec = mlflow.artifacts.load_text(f"runs:/{runs['run_id'][0]}/weights/model.json")
    assert json.loads(spec)["model"] == "convnet-w32"
