import logging

import mlflow
import pytest

from kdd_mlflow import budgets, pipeline, tune
from kdd_mlflow.config import CombinedConfig, DistillConfig, ExpertsConfig, KDConfig, TeacherConfig, TuneConfig


def test_experts_budgets():
    paper = budgets.resolve(ExpertsConfig(dataset="cifar10", budget="paper"), "cpu").cfg
    assert (paper.model, paper.num_experts, paper.epochs, paper.lr_teacher) == ("convnet", 100, 50, 0.01)
    assert paper.zca is True and paper.train_limit is None
    quick = budgets.resolve(ExpertsConfig(dataset="cifar10", model="convnet-w8"), "cpu")
    assert quick.budget == "quick" and "model" not in quick.filled
    # natural images: 14 epochs on whitened images, at MTT's rate
    assert (quick.cfg.model, quick.cfg.num_experts, quick.cfg.epochs, quick.cfg.train_limit, quick.cfg.zca) == \
        ("convnet-w8", 3, 14, 10000, True)
    assert quick.cfg.lr_teacher == 0.01
    for gray in ("fashion-mnist", "mnist"):  # digits and clothes: 6 epochs, unwhitened, at 0.1
        cfg = budgets.resolve(ExpertsConfig(dataset=gray), "cpu").cfg
        assert (cfg.epochs, cfg.zca, cfg.lr_teacher) == (6, False, 0.1)
    given = budgets.resolve(ExpertsConfig(dataset="cifar100", epochs=6, zca=False), "cpu").cfg
    assert (given.epochs, given.zca) == (6, False)


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


@pytest.mark.parametrize("dataset, ipc, zca", [("cifar10", 10, True), ("cifar10", 50, False), ("cifar100", 10, False)])
def test_paper_experts_of_combined_and_tune_follow_their_rows_zca(dataset, ipc, zca):
    combined = pipeline.experts_params(CombinedConfig(dataset=dataset, ipc=ipc), "paper", ipc)
    tuned = tune.experts_params(TuneConfig(dataset=dataset, ipc=str(ipc), n_trials=1), "paper")[ipc]
    for params in (combined, tuned):
        experts = ExpertsConfig(**{k: v for k, v in params.items() if v is not None})
        assert budgets.resolve(experts, "cuda").cfg.zca is zca


@pytest.mark.parametrize("budget", ["quick", "long"])
def test_one_image_per_class_of_a_grayscale_set_gets_experts_at_mtts_rate(budget):
    def lr(dataset: str, ipc: int) -> float:
        params = pipeline.experts_params(CombinedConfig(dataset=dataset, ipc=ipc), budget, ipc)
        experts = ExpertsConfig(**{k: v for k, v in params.items() if v is not None})
        return budgets.resolve(experts, "cpu").cfg.lr_teacher

    assert (lr("fashion-mnist", 1), lr("fashion-mnist", 10), lr("mnist", 1), lr("mnist", 50)) == (0.01, 0.1, 0.01, 0.1)
    assert lr("cifar10", 1) == lr("cifar10", 10) == 0.01
    space = tune.experts_params(TuneConfig(dataset="fashion-mnist", ipc="1:10", n_trials=1), budget)
    assert {n: params.get("lr_teacher") for n, params in space.items() if n < 3} == {1: 0.01, 2: None}
    given = pipeline.experts_params(CombinedConfig(dataset="fashion-mnist", ipc=1, overrides="experts.lr_teacher=0.05"),
                                    budget, 1)
    assert given["lr_teacher"] == 0.01  # the pipeline's own value; the runner lays the user's overrides on top


def test_distilling_one_grayscale_image_per_class_from_fast_experts_warns(caplog):
    cfg = DistillConfig(dataset="fashion-mnist", experts_run="x", budget="quick", ipc=1)
    with caplog.at_level(logging.WARNING, logger="kdd_mlflow.budgets"):
        resolved = budgets.resolve(cfg, "cpu", experts_model="convnet-w32", experts_zca=False, experts_lr=0.1)
    assert resolved.cfg.lr_teacher == 0.1  # still the experts' rate: the set is distilled from what was trained
    assert "the experts trained at 0.1; for fashion-mnist at ipc 1 the quick budget trains them at 0.01" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdd_mlflow.budgets"):
        budgets.resolve(cfg, "cpu", experts_model="convnet-w32", experts_zca=False, experts_lr=0.01)
        budgets.resolve(cfg.model_copy(update={"ipc": 10}), "cpu", experts_model="convnet-w32", experts_zca=False,
                        experts_lr=0.1)
    assert not caplog.records


def test_a_tuning_space_across_rows_that_whiten_differently_needs_two_experts_runs():
    def distinct(budget: str) -> int:
        space = tune.experts_params(TuneConfig(dataset="cifar10", ipc="1:50", n_trials=1), budget)
        assert sorted(space) == list(range(1, 51))
        return len({tuple(params.items()) for params in space.values()})

    assert distinct("paper") == 2 and distinct("quick") == 1


def test_distilling_paper_rows_from_experts_whitened_otherwise_warns(caplog):
    cfg = DistillConfig(dataset="cifar10", experts_run="x", budget="paper", ipc=50)
    with caplog.at_level(logging.WARNING, logger="kdd_mlflow.budgets"):
        resolved = budgets.resolve(cfg, "cpu", experts_model="convnet", experts_zca=True)
    assert resolved.filled["paper_row_ipc"] == 50 and "zca" not in resolved.filled
    assert "experts are ZCA-whitened, but the published row for cifar10 ipc 50 is without ZCA" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdd_mlflow.budgets"):
        budgets.resolve(cfg, "cpu", experts_model="convnet", experts_zca=False)
    assert not caplog.records


@pytest.mark.parametrize("budget", ["quick", "paper"])
def test_synthetic_step_size_starts_at_the_experts_learning_rate(budget):
    cfg = DistillConfig(experts_run="e", budget=budget, dataset="cifar10", ipc=10)
    follows = budgets.resolve(cfg, "cpu", experts_model="convnet", experts_zca=True, experts_lr=0.1)
    assert follows.cfg.lr_teacher == 0.1 and follows.filled["lr_teacher"] == 0.1
    unknown = budgets.resolve(cfg, "cpu", experts_model="convnet", experts_zca=True)
    assert unknown.cfg.lr_teacher == 0.01  # the budget's value (the paper experts' rate)
    given = budgets.resolve(cfg.model_copy(update={"lr_teacher": 0.05}), "cpu", experts_model="convnet",
                            experts_zca=True, experts_lr=0.1)
    assert given.cfg.lr_teacher == 0.05


@pytest.mark.parametrize("dataset, ipc, window", [("cifar10", 1, (0, None, 4, None)),
                                                  ("cifar10", 10, (0, 10, 20, 1000)),
                                                  ("cifar10", 50, (0, 20, 40, 2000)),
                                                  ("cifar100", 10, (0, 30, 50, 2000)),
                                                  ("cifar100", 50, (20, None, 70, None))])
def test_the_datm_recipe_fills_the_published_window_and_learned_labels(dataset, ipc, window):
    cfg = DistillConfig(experts_run="e", budget="paper", recipe="datm", dataset=dataset, ipc=ipc)
    resolved = budgets.resolve(cfg, "cuda", experts_model="convnet", experts_zca=True).cfg
    assert (resolved.min_start_epoch, resolved.window_start, resolved.max_start_epoch,
            resolved.window_iterations) == window
    assert (resolved.labels, resolved.iterations, resolved.syn_steps) == ("learned", 10000, 80)
    mtt = budgets.resolve(cfg.model_copy(update={"recipe": "mtt"}), "cuda", experts_model="convnet",
                          experts_zca=True).cfg
    assert (mtt.labels, mtt.min_start_epoch, mtt.window_start, mtt.lr_label) == ("hard", 0, None, 2.0)
    # what is given explicitly wins over the recipe
    given = budgets.resolve(cfg.model_copy(update={"labels": "hard", "lr_label": 1.0}), "cuda",
                            experts_model="convnet", experts_zca=True).cfg
    assert (given.labels, given.lr_label) == ("hard", 1.0)


def test_the_datm_recipe_is_refused_where_it_has_no_published_settings():
    with pytest.raises(ValueError, match="cover cifar10 and cifar100, not fashion-mnist"):
        budgets.resolve(DistillConfig(experts_run="e", budget="paper", recipe="datm", dataset="fashion-mnist"), "cuda",
                        experts_model="convnet", experts_zca=False)
    with pytest.raises(ValueError, match="paper-budget table"):
        budgets.resolve(DistillConfig(experts_run="e", budget="quick", recipe="datm", dataset="cifar10"), "cpu",
                        experts_model="convnet-w32", experts_zca=False)
    quick = budgets.resolve(DistillConfig(experts_run="e", dataset="cifar10"), "cpu", experts_model="convnet-w32",
                            experts_zca=False).cfg
    assert (quick.min_start_epoch, quick.lr_label, quick.window_start) == (0, 2.0, None)


@pytest.mark.parametrize("dataset, ipc, labels", [("fashion-mnist", 10, "hard"), ("fashion-mnist", 1, "learned"),
                                                  ("mnist", 50, "hard"), ("cifar10", 10, "learned"),
                                                  ("cifar100", 1, "learned")])
def test_the_quick_budget_learns_labels_where_they_paid(dataset, ipc, labels):
    cfg = DistillConfig(experts_run="e", budget="quick", dataset=dataset, ipc=ipc)
    resolved = budgets.resolve(cfg, "cpu", experts_model="convnet-w32", experts_zca=False)
    assert resolved.cfg.labels == labels and resolved.filled["labels"] == labels
    given = budgets.resolve(cfg.model_copy(update={"labels": "hard"}), "cpu", experts_model="convnet-w32",
                            experts_zca=False)
    assert given.cfg.labels == "hard" and "labels" not in given.filled
    whitened = budgets.resolve(cfg, "cpu", experts_model="convnet-w32", experts_zca=True)
    assert whitened.cfg.labels == "hard"


def test_a_pipeline_distilling_by_datm_gives_its_experts_the_datm_rows_zca():
    mtt = pipeline.experts_params(CombinedConfig(dataset="cifar10", ipc=50), "paper", 50)
    datm = pipeline.experts_params(CombinedConfig(dataset="cifar10", ipc=50, overrides="distill.recipe=datm"),
                                   "paper", 50)
    assert (mtt["zca"], datm["zca"]) == (False, True)


@pytest.mark.parametrize("dataset, epochs, lr", [("fashion-mnist", 20, 0.1), ("mnist", 20, 0.1), ("cifar10", 14, 0.01),
                                                 ("cifar100", 14, 0.01)])
def test_the_long_budget_trains_longer_experts_and_matches_along_them(dataset, epochs, lr):
    experts = budgets.resolve(ExpertsConfig(dataset=dataset, budget="long"), "cpu").cfg
    assert (experts.epochs, experts.lr_teacher, experts.num_experts, experts.train_limit) == (epochs, lr, 3, 10000)
    assert experts.zca is dataset.startswith("cifar")
    cfg = DistillConfig(experts_run="e", budget="long", dataset=dataset, ipc=10)
    distill = budgets.resolve(cfg, "cpu", experts_model="convnet-w32", experts_zca=False, experts_lr=lr,
                              experts_epochs=epochs)
    assert distill.budget == "long" and distill.cfg.max_start_epoch == epochs - 2
    # the grayscale sets (hard labels at ipc 10) unroll 15 steps for 250 iterations evaluated at 0, 200 and 250, the
    # others the quick budget's 10 for 200 evaluated every 100
    if budgets.grayscale(dataset):
        assert distill.cfg.labels == "hard"
    grayscale_hard = budgets.grayscale(dataset)
    assert (distill.cfg.syn_steps, distill.cfg.iterations, distill.cfg.eval_every, distill.cfg.eval_epochs) == (
        (15, 250, 200, 200) if grayscale_hard else (10, 200, 100, 200))
    learned = budgets.resolve(cfg.model_copy(update={"labels": "learned"}), "cpu", experts_model="convnet-w32",
                              experts_zca=False, experts_lr=lr, experts_epochs=epochs)
    assert (learned.cfg.syn_steps, learned.cfg.iterations, learned.cfg.eval_every) == (10, 200, 100)
    given = budgets.resolve(cfg.model_copy(update={"max_start_epoch": 5}), "cpu", experts_model="convnet-w32",
                            experts_zca=False, experts_epochs=epochs)
    assert given.cfg.max_start_epoch == 5
    quick = budgets.resolve(cfg.model_copy(update={"budget": "quick"}), "cpu", experts_model="convnet-w32",
                            experts_zca=False, experts_epochs=epochs)
    assert quick.cfg.max_start_epoch == epochs - 2  # the quick budget matches along the experts given too
    assert budgets.resolve(cfg.model_copy(update={"budget": "quick"}), "cpu", experts_model="convnet-w32",
                           experts_zca=False, experts_epochs=6).cfg.max_start_epoch == 4
    assert (quick.cfg.iterations, quick.cfg.eval_every) == (50 if budgets.grayscale(dataset) else 100, 50)
    # teacher and KD arms train as under the quick budget
    assert budgets.resolve(TeacherConfig(budget="long"), "cpu").cfg.epochs == 3


@pytest.mark.parametrize("dataset, ipc, labels, iterations", [
    ("fashion-mnist", 10, None, 50), ("mnist", 50, "hard", 50),  # grayscale, hard labels: the set of iteration 50
    ("fashion-mnist", 10, "learned", 100), ("fashion-mnist", 1, None, 100), ("fashion-mnist", 1, "hard", 100),
    ("cifar10", 10, None, 100), ("cifar10", 10, "hard", 100)])
def test_quick_iterations_stop_where_the_chosen_set_stopped_improving(dataset, ipc, labels, iterations):
    cfg = DistillConfig(experts_run="e", budget="quick", dataset=dataset, ipc=ipc, labels=labels)
    resolved = budgets.resolve(cfg, "cpu", experts_model="convnet-w32", experts_zca=False)
    assert resolved.cfg.iterations == iterations and resolved.cfg.eval_every == 50
    assert budgets.resolve(cfg.model_copy(update={"iterations": 80}), "cpu", experts_model="convnet-w32",
                           experts_zca=False).cfg.iterations == 80
    assert budgets.resolve(cfg.model_copy(update={"budget": "long"}), "cpu", experts_model="convnet-w32",
                           experts_zca=False).cfg.iterations == (250 if iterations == 50 else 200)
