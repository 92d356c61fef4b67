"""Stages ``train`` and ``teacher``: one model trained with SGD on real data or on a synthetic set."""

from __future__ import annotations

import logging

import mlflow
import torch
from pydantic import BaseModel
from torch import nn

from kdd_mlflow import config, data, lineage, metrics, models, tracking
from kdd_mlflow.augment import DSA
from kdd_mlflow.config import SGDStageConfig, TeacherConfig, TrainConfig
from kdd_mlflow.runtime import pick_device, seed_everything
from kdd_mlflow.train import Objective, SGDRecipe, fit, predict_logits

log = logging.getLogger(__name__)


def model_spec(name: str, meta: data.DatasetInfo) -> dict:
    """What a logged model is, checked again when a later stage loads it."""
    return {
        "model": name, "dataset": meta.name, "channels": meta.channels,
        "num_classes": meta.num_classes, "image_size": meta.image_size,
        "mean": list(meta.mean), "std": list(meta.std),
    }


def sgd_recipe(cfg: TrainConfig | SGDStageConfig) -> SGDRecipe:
    """The SGD recipe a training stage's (resolved) config asks for."""
    return SGDRecipe(cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.schedule, cfg.precision)


def train_and_log(model: nn.Module, model_name: str, transfer: data.Split, real: data.RealData, recipe: SGDRecipe,
                  generator: torch.Generator, device: torch.device, augment: str = "none",
                  zca: data.ZCA | None = None, objective: Objective | None = None,
                  extra_parameters: list | None = None) -> dict[str, float]:
    """Train ``model`` on ``transfer`` inside the active run: per-epoch metrics, test metrics, the model.

    ``real`` supplies validation and test splits (already in the model's input space).
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
    tracking.log_model(model, model_spec(model_name, real.info), real.test.images[:2], zca=zca)
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
        train_and_log(model, cfg.model, real.train, real, recipe, generator, device, cfg.augment)
        return active.info.run_id


def small_set_source(synthetic_run: str, real: data.RealData) -> tuple[data.Split, float, data.ZCA | None]:
    """The synthetic set of a distill run, its learned step size and whitening (applied to ``real`` too)."""
    from kdd_mlflow.stages.distill import load_synthetic

    synthetic, lr, _, zca = load_synthetic(synthetic_run, expect={"dataset": real.info.name})
    if zca is not None:
        for split in (real.train, real.val, real.test):
            split.images = zca(split.images)
    return synthetic, lr, zca


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
    transfer, learned_lr, zca = real.train, None, None
    if asked.synthetic_run:
        transfer, learned_lr, zca = small_set_source(asked.synthetic_run, real)
    elif asked.ipc:
        transfer = real.random_subset(asked.ipc, torch.Generator().manual_seed(asked.seed + 1))
    source = asked.source
    cfg, filled = resolve_by_source(asked, budget, source != "real", config.QUICK_TEACHER, config.PAPER_TEACHER,
                                    learned_lr)
    generator = seed_everything(cfg.seed)
    meta = real.info
    with tracking.stage_run("teacher", asked, run_name=f"teacher-{cfg.model}-{source}", resolved=cfg,
                            tags={"kdd.source": source}) as active:
        tracking.log_params({"budget.resolved": budget, **{f"budget.{k}": v for k, v in filled.items()}})
        model = models.create(cfg.model, meta.channels, meta.num_classes, meta.image_size).to(device)
        recipe = sgd_recipe(cfg)
        train_and_log(model, cfg.model, transfer, real, recipe, generator, device, cfg.augment, zca=zca)
        return active.info.run_id
