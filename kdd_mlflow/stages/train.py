"""Stage ``train``: one model trained on real data with SGD (teachers and baselines)."""

from __future__ import annotations

import logging

import mlflow

from kdd_mlflow import data, models, tracking
from kdd_mlflow.augment import DSA
from kdd_mlflow.config import TrainConfig
from kdd_mlflow.runtime import pick_device, seed_everything
from kdd_mlflow.train import SGDRecipe, evaluate, fit

log = logging.getLogger(__name__)


def model_spec(name: str, meta: data.DatasetInfo) -> dict:
    """What a logged model is, checked again when a later stage loads it."""
    return {
        "model": name, "dataset": meta.name, "channels": meta.channels,
        "num_classes": meta.num_classes, "image_size": meta.image_size,
        "mean": list(meta.mean), "std": list(meta.std),
    }


def run(cfg: TrainConfig) -> str:
    """Train ``cfg.model`` on ``cfg.dataset``; return the MLflow run id."""
    device = pick_device(cfg.device)
    real = data.load(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.train_limit)
    generator = seed_everything(cfg.seed)
    meta = real.info
    with tracking.stage_run("train", cfg, run_name=f"train-{cfg.model}-{cfg.dataset}") as active:
        model = models.create(cfg.model, meta.channels, meta.num_classes, meta.image_size).to(device)
        mlflow.log_params({"parameters": models.count_parameters(model), "train_images": len(real.train)})
        mlflow.set_tag("kdd.device", str(device))
        log.info("training %s (%d parameters) on %d %s images, device %s", cfg.model,
                 models.count_parameters(model), len(real.train), cfg.dataset, device)
        recipe = SGDRecipe(cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.schedule)
        fit(
            model, real.train.to(device), recipe, generator,
            augment=DSA() if cfg.augment == "dsa" else None,
            val=real.val.to(device),
            on_epoch=lambda epoch, metrics: mlflow.log_metrics(metrics, step=epoch + 1),
            progress=f"train {cfg.model}",
        )
        test = evaluate(model, real.test.to(device))
        mlflow.log_metrics({"test_acc": test["acc"], "test_loss": test["loss"]})
        log.info("test accuracy %.4f", test["acc"])
        tracking.log_model(model, model_spec(cfg.model, meta), real.test.images[:2])
        return active.info.run_id
