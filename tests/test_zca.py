"""ZCA whitening end to end: one matrix, fitted by the experts, shared by the set and every arm."""

from __future__ import annotations

import mlflow
import pytest
import torch
from click.testing import CliRunner

from kdd_mlflow import cli, data
from kdd_mlflow.artifacts import find, synthetic
from kdd_mlflow.artifacts import model as model_artifact
from kdd_mlflow.config import DistillConfig, ExpertsConfig, KDConfig, TeacherConfig
from kdd_mlflow.distill.evaluate import evaluate_set
from kdd_mlflow.stages import distill as distill_stage
from kdd_mlflow.stages import experts as experts_stage
from kdd_mlflow.stages import kd as kd_stage
from kdd_mlflow.stages import train as train_stage
from tests.conftest import write_cifar_dataset
from tests.test_faults import one_line_error

COMMON = dict(dataset="cifar10", val_size=100, budget="quick")


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return write_cifar_dataset(tmp_path_factory.mktemp("cifar"), n_train=600, n_test=100)


def experts(cifar, **kw) -> str:
    return experts_stage.run(ExpertsConfig(**COMMON, data_dir=str(cifar), model="convnet-w8-d2", num_experts=1,
                                           epochs=2, zca=True, **kw))


def distill(cifar, experts_run: str, **kw) -> str:
    return distill_stage.run(DistillConfig(**COMMON, data_dir=str(cifar), experts_run=experts_run, ipc=1,
                                           iterations=1, syn_steps=2, expert_epochs=1, max_start_epoch=1,
                                           eval_every=1, num_eval=1, eval_epochs=2, **kw))


@pytest.mark.slow
def test_distill_whitens_with_the_experts_stored_matrix(cifar):
    """(a) Under a train limit of its own, distill still works in the experts' whitened space."""
    experts_run = experts(cifar, train_limit=200)
    stored = find.input_space(experts_run)
    own_fit = data.ZCA.fit(data.load("cifar10", cifar, 100, train_limit=400).train.images)
    assert not torch.allclose(own_fit.matrix, stored.zca.matrix, atol=1e-3)  # a refit would be another space

    distill_run = distill(cifar, experts_run, train_limit=400)
    distilled = synthetic.load(distill_run)
    assert distilled.space.digest == stored.digest
    assert torch.equal(distilled.space.zca.matrix, stored.zca.matrix)
    assert mlflow.get_run(distill_run).data.params["zca_digest"] == stored.digest

    # the random-subset baseline is also measured without the whitening: the same subsets and networks on the
    # normalised images, measured on the normalised test split
    metrics = mlflow.get_run(distill_run).data.metrics
    raw = data.load("cifar10", cifar, 100, train_limit=400)
    subsets = distill_stage.random_subsets(raw, DistillConfig(**COMMON, experts_run="x", ipc=1), torch.device("cpu"))
    unwhitened = evaluate_set(subsets, "convnet-w8-d2", raw.info, raw.test, lr=0.01, epochs=2, num_nets=1,
                              seed=distill_stage.BASELINE_SEED)
    assert metrics["random_subset_unwhitened_test_acc_mean"] == pytest.approx(unwhitened[0], abs=0.011)
    assert metrics["test_acc_gain_unwhitened"] == pytest.approx(
        metrics["test_acc_mean"] - metrics["random_subset_unwhitened_test_acc_mean"])


@pytest.mark.slow
def test_every_arm_of_a_zca_study_shares_one_input_space(cifar):
    """(b) A full-data teacher in the experts' space distils on the synthetic set; fidelity is measurable."""
    experts_run = experts(cifar)
    distill_run = distill(cifar, experts_run)
    teacher_common = dict(**COMMON, data_dir=str(cifar), model="convnet-w8-d2", epochs=1)
    full = train_stage.run_teacher(TeacherConfig(**teacher_common, space_run=experts_run))
    teacher = model_artifact.load(full)
    assert teacher.space.agrees_with(find.input_space(experts_run))
    assert mlflow.get_run(full).data.tags["kdd.input_space"].startswith("cifar10, ZCA ")

    # kd-full-teacher-synthetic: the full-data teacher on the synthetic set of the same study
    student = kd_stage.run(KDConfig(**COMMON, data_dir=str(cifar), teacher_run=full, student="convnet-w8-d1",
                                    transfer="synthetic", synthetic_run=distill_run, epochs=2))
    trained = model_artifact.load(student)
    assert trained.space.digest == teacher.space.digest
    real = data.load("cifar10", cifar, 100)
    agreement = (trained.logits(real.test.images).argmax(1) == teacher.logits(real.test.images).argmax(1)).float()
    assert 0 < agreement.mean() <= 1
    assert "test_agreement" in mlflow.get_run(student).data.metrics

    # a teacher trained on raw pixels is another space: refused, naming both runs
    raw = train_stage.run_teacher(TeacherConfig(**teacher_common))
    result = CliRunner().invoke(cli.main, ["kd", "--teacher-run", raw, "--transfer", "synthetic", "--synthetic-run",
                                           distill_run, "--dataset", "cifar10", "--data-dir", str(cifar),
                                           "--val-size", "100", "--budget", "quick"])
    one_line_error(result, f"run {distill_run}", f"teacher run {raw}", "no ZCA")


@pytest.mark.slow
def test_spaces_are_compared_by_their_matrices_not_a_flag(cifar, tmp_path):
    """Two ZCA spaces fitted on different images are different spaces, though both 'use ZCA'."""
    experts_run = experts(cifar)
    other_experts = experts(write_cifar_dataset(tmp_path / "other", n_train=700, n_test=100))
    distill_run = distill(cifar, experts_run)
    result = CliRunner().invoke(cli.main, ["teacher", "--synthetic-run", distill_run, "--space-run", other_experts,
                                           "--dataset", "cifar10", "--data-dir", str(cifar), "--val-size", "100",
                                           "--budget", "quick", "--model", "convnet-w8-d2", "--epochs", "1"])
    digest = find.input_space(other_experts).digest
    one_line_error(result, f"run {distill_run}", f"run {other_experts}", digest, "must share one input space")
    result = CliRunner().invoke(cli.main, ["distill", "--experts-run", f"{experts_run},{other_experts}",
                                           "--dataset", "cifar10", "--data-dir", str(cifar), "--val-size", "100"])
    one_line_error(result, f"experts run {other_experts} trained in", "they are not one buffer")
