"""Stages ``train`` and ``teacher``: one model trained with SGD on real data or on a synthetic set."""

from __future__ import annotations

import logging

import torch

from kdd_mlflow import budgets, data, models, tracking
from kdd_mlflow.artifacts import find
from kdd_mlflow.artifacts.space import InputSpace
from kdd_mlflow.config import TeacherConfig, TrainConfig
from kdd_mlflow.runtime import pick_device, seed_everything
from kdd_mlflow.supervised import sgd_recipe, small_set_source, train_and_log

log = logging.getLogger(__name__)


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


def run_teacher(asked: TeacherConfig) -> str:
    """Train the teacher on real data or on a distill run's synthetic set; return the run id."""
    device = pick_device(asked.device)
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
    resolved = budgets.resolve(asked, device.type, learned_lr=learned_lr)
    cfg = resolved.cfg
    generator = seed_everything(cfg.seed)
    meta = real.info
    with tracking.stage_run("teacher", asked, run_name=f"teacher-{cfg.model}-{source}", resolved=cfg,
                            tags={"kdd.source": source, "kdd.input_space": space.describe()}) as active:
        budgets.log_resolved(resolved)
        model = models.create(cfg.model, meta.channels, meta.num_classes, meta.image_size).to(device)
        recipe = sgd_recipe(cfg)
        train_and_log(model, cfg.model, transfer, real, recipe, generator, device, space, cfg.augment)
        return active.info.run_id
