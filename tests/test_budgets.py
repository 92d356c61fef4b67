import mlflow
import pytest

from kdd_mlflow import budgets
from kdd_mlflow.config import CombinedConfig, ExpertsConfig, KDConfig, TeacherConfig


def test_experts_budgets():
    paper = budgets.resolve(ExpertsConfig(dataset="cifar10", budget="paper"), "cpu").cfg
    assert (paper.model, paper.num_experts, paper.epochs, paper.lr_teacher) == ("convnet", 100, 50, 0.01)
    assert paper.zca is True and paper.train_limit is None
    quick = budgets.resolve(ExpertsConfig(dataset="cifar10", model="convnet-w8"), "cpu")
    assert quick.budget == "quick" and "model" not in quick.filled
    assert (quick.cfg.model, quick.cfg.num_experts, quick.cfg.epochs, quick.cfg.train_limit, quick.cfg.zca) == \
        ("convnet-w8", 3, 6, 10000, False)


def test_teacher_budget_follows_its_training_set():
    real = budgets.resolve(TeacherConfig(budget="quick"), "cpu").cfg
    assert (real.model, real.epochs, real.lr, real.schedule, real.augment) == ("convnet-w32", 3, 0.05, "cosine", "none")
    synthetic = budgets.resolve(TeacherConfig(budget="paper", synthetic_run="x"), "cpu", learned_lr=0.02).cfg
    assert (synthetic.model, synthetic.epochs, synthetic.lr, synthetic.schedule, synthetic.augment) == \
        ("resnet18", 1000, 0.02, "step", "dsa")
    subset = budgets.resolve(TeacherConfig(budget="quick", ipc=2), "cpu")
    assert subset.cfg.lr == 0.01 and subset.filled["epochs"] == 200


def test_kd_on_its_teachers_own_set_mixes_up():
    cfg = KDConfig(budget="quick", teacher_run="t", transfer="synthetic", synthetic_run="s")
    own = budgets.resolve(cfg, "cpu", learned_lr=0.03, teacher_on_transfer=True)
    assert (own.cfg.student, own.cfg.lr, own.cfg.augment) == ("convnet-w16", 0.03, "mixup")
    assert own.filled["augment"] == "mixup"
    given = cfg.model_copy(update={"augment": "none"})
    assert budgets.resolve(given, "cpu", teacher_on_transfer=True).cfg.augment == "none"
    real = budgets.resolve(KDConfig(budget="paper", teacher_run="t"), "cpu").cfg
    assert (real.student, real.epochs, real.augment) == ("convnet-w32", 100, "dsa")


@pytest.mark.parametrize("budget, teacher, student", [("quick", "convnet-w32", "convnet-w16"),
                                                      ("paper", "resnet18", "convnet-w32")])
def test_pipeline_models_come_from_the_budget(budget, teacher, student):
    resolved = budgets.resolve(CombinedConfig(budget=budget), "cpu")
    assert (resolved.cfg.teacher_model, resolved.cfg.student_model) == (teacher, student)
    given = budgets.resolve(CombinedConfig(budget=budget, teacher_model="convnet"), "cpu")
    assert given.cfg.teacher_model == "convnet" and set(given.filled) == {"student_model"}


def test_what_the_budget_filled_is_logged():
    with mlflow.start_run() as run:
        budgets.log_resolved(budgets.resolve(TeacherConfig(), "cpu"))
    params = mlflow.get_run(run.info.run_id).data.params
    assert params["budget.resolved"] == "quick" and params["budget.epochs"] == "3" and params["budget.lr"] == "0.05"
