"""Stages ``train`` and ``teacher``: one model trained with SGD on real data or on a synthetic set."""

from __future__ import annotations

import logging

import mlflow
import torch
from pydantic import BaseModel
from torch import nn

from kdd_mlflow import config, data, lineage, metrics, models, tracking
from kdd_mlflow.artifacts import find, synthetic
from kdd_mlflow.artifacts import model as model_artifact
from kdd_mlflow.artifacts.space import InputSpace
from kdd_mlflow.augment import DSA
from kdd_mlflow.config import SGDStageConfig, TeacherConfig, TrainConfig
from kdd_mlflow.runtime import pick_device, seed_everything
from kdd_mlflow.train import Objective, SGDRecipe, fit, predict_logits

log = logging.getLogger(__name__)


def sgd_recipe(cfg: TrainConfig | SGDStageConfig) -> SGDRecipe:
    """The SGD recipe a training stage's (resolved) config asks for."""
    return SGDRecipe(cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.schedule, cfg.precision)


def train_and_log(model: nn.Module, model_name: str, transfer: data.Split, real: data.RealData, recipe: SGDRecipe,
                  generator: torch.Generator, device: torch.device, space: InputSpace, augment: str = "none",
                  objective: Objective | None = None, extra_parameters: list | None = None) -> dict[str, float]:
    """Train ``model`` on ``transfer`` inside the active run: per-epoch metrics, test metrics, the model.

    ``real`` supplies validation and test splits, already in ``space``, the input space the model is logged with.
    """
    mlflow.log_params({"parameters": models.count_parameters(model), "train_images": len(transfer)})
    mlflow.set_tag("kdd.device", str(device))
    lineage.log_inputs(training=transfer, validation=real.val, test=real.test)
    log.info("training %s (%d parameters) on %d images, device %s", model_name, models.count_parameters(model),
             len(transfer), device)
    fit(
        model, transfer.to(device), recipe, generator,
        augment=DSA() if augment == "dsa" else None,
        val=real.val.to(device),
        on_epoch=lambda epoch, m: mlflow.log_metrics(m, step=epoch + 1),
        progress=f"train {model_name}",
        objective=objective, extra_parameters=extra_parameters,
    )
    logits = predict_logits(model, real.test.images)
    test = {f"test_{k}": v for k, v in metrics.classification(logits, real.test.labels.to(logits.device)).items()}
    mlflow.log_metrics(test)
    log.info("test accuracy %.4f", test["test_acc"])
    model_artifact.log(model, model_name, space, real.test.images[:2])
    return test


def run(cfg: TrainConfig) -> str:
    """Train ``cfg.model`` on ``cfg.dataset``; return the MLflow run id."""
    device = pick_device(cfg.device)
    real = data.load(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.train_limit)
    generator = seed_everything(cfg.seed)
    meta = real.info
    with tracking.stage_run("train", cfg, run_name=f"train-{cfg.model}-{cfg.dataset}") as active:
        model = models.create(cfg.model, meta.channels, meta.num_classes, meta.image_size).to(device)
        recipe = sgd_recipe(cfg)
        train_and_log(model, cfg.model, real.train, real, recipe, generator, device, InputSpace(cfg.dataset),
                      cfg.augment)
        return active.info.run_id


def small_set_source(synthetic_run: str, real: data.RealData) -> tuple[data.Split, float, InputSpace]:
    """The synthetic set of a distill run and its learned step size; ``real`` is mapped into its input space."""
    distilled = synthetic.load(synthetic_run, expect={"dataset": real.info.name})
    distilled.space.enter(real)
    return distilled.split, distilled.lr, distilled.space


def resolve_by_source(cfg: BaseModel, budget: str, small: bool, quick: dict, paper: dict,
                      learned_lr: float | None) -> tuple[BaseModel, dict]:
    table = dict((paper if budget == "paper" else quick)["small" if small else "real"])
    if small and learned_lr is not None:  # a synthetic set comes with the step size it was learned for
        table["lr"] = learned_lr
    return config.resolve(cfg, table)


def run_teacher(asked: TeacherConfig) -> str:
    """Train the teacher on real data or on a distill run's synthetic set; return the run id."""
    device = pick_device(asked.device)
    budget = config.pick_budget(asked.budget, device.type)
    real = data.load(asked.dataset, asked.data_dir, asked.val_size, asked.train_limit)
    wanted = find.input_space(asked.space_run) if asked.space_run else None
    if asked.synthetic_run:
        transfer, learned_lr, space = small_set_source(asked.synthetic_run, real)
        if wanted is not None:
            space.require(wanted, f"the synthetic set of run {asked.synthetic_run}", f"run {asked.space_run}")
    else:
        learned_lr, space = None, (wanted or InputSpace(asked.dataset))
        space.enter(real)
        transfer = real.train if not asked.ipc else \
            real.random_subset(asked.ipc, torch.Generator().manual_seed(asked.seed + 1))
    source = asked.source
    cfg, filled = resolve_by_source(asked, budget, source != "real", config.QUICK_TEACHER, config.PAPER_TEACHER,
                                    learned_lr)
    generator = seed_everything(cfg.seed)
    meta = real.info
    with tracking.stage_run("teacher", asked, run_name=f"teacher-{cfg.model}-{source}", resolved=cfg,
                            tags={"kdd.source": source, "kdd.input_space": space.describe()}) as active:
        tracking.log_params({"budget.resolved": budget, **{f"budget.{k}": v for k, v in filled.items()}})
        model = models.create(cfg.model, meta.channels, meta.num_classes, meta.image_size).to(device)
        recipe = sgd_recipe(cfg)
        train_and_log(model, cfg.model, transfer, real, recipe, generator, device, space, cfg.augment)
        return active.info.run_id
