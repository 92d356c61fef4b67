"""Supervised training inside the active MLflow run, shared by the stages that train one model (train,
teacher and kd): the SGD recipe a stage config asks for, the training with its per-epoch and test metrics and
the logged model, and the synthetic set as a training source."""

from __future__ import annotations

import logging

import mlflow
import torch
from torch import nn

from kdd_mlflow import data, lineage, metrics, models
from kdd_mlflow.artifacts import model as model_artifact
from kdd_mlflow.artifacts import synthetic
from kdd_mlflow.artifacts.space import InputSpace
from kdd_mlflow.augment import DSA, strategy_for
from kdd_mlflow.config import SGDStageConfig, TrainConfig
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
    mlflow.log_params({"parameters": models.count_parameters(model), "train_images": len(transfer),
                       "dsa_strategy": strategy_for(real.info.name)})
    mlflow.set_tag("kdd.device", str(device))
    lineage.log_inputs(training=transfer, validation=real.val, test=real.test)
    log.info("training %s (%d parameters) on %d images, device %s", model_name, models.count_parameters(model),
             len(transfer), device)
    fit(
        model, transfer.to(device), recipe, generator,
        augment=DSA.for_dataset(real.info.name) if augment == "dsa" else None,
        val=real.val.to(device),
        on_epoch=lambda epoch, m: mlflow.log_metrics(m, step=epoch + 1),
        progress=f"train {model_name}",
        objective=objective, extra_parameters=extra_parameters,
    )
    logits = predict_logits(model, real.test.images)
    test = {f"test_{k}": v for k, v in metrics.classification(logits, real.test.labels.to(logits.device)).items()}
    mlflow.log_metrics(test)
    log.info("test accuracy %.4f", test["test_acc"])
    model_artifact.log(model, model_name, space, real.test.images[:2], test=(logits, real.test.labels))
    return test


def small_set_source(synthetic_run: str, real: data.RealData) -> tuple[data.Split, float, InputSpace]:
    """The synthetic set of a distill run and its learned step size; ``real`` is mapped into its input space."""
    distilled = synthetic.load(synthetic_run, expect={"dataset": real.info.name})
    distilled.space.enter(real)
    return distilled.split, distilled.lr, distilled.space
