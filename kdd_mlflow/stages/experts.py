"""Stage ``experts``: expert trajectories for MTT, one artifact per expert plus a manifest.

Experts are indexed 0..N-1 and expert k is seeded by (seed, k), so shards (``i/n`` or ``a:b``) run in
separate processes or machines fill one buffer without overlap, and re-running a run (``run_id``)
trains only the experts it is missing: a crash loses at most the expert in progress.
"""

from __future__ import annotations

import logging
import time

import mlflow
from tqdm.auto import tqdm

from kdd_mlflow import backends, budgets, config, data, lineage, models, tracking
from kdd_mlflow.artifacts import experts as buffer
from kdd_mlflow.artifacts.space import InputSpace
from kdd_mlflow.augment import DSA
from kdd_mlflow.config import ExpertsConfig
from kdd_mlflow.distill.experts import train_expert
from kdd_mlflow.runtime import pick_device, seed_everything
from kdd_mlflow.train import SGDRecipe

log = logging.getLogger(__name__)


def run(asked: ExpertsConfig) -> str:
    """Train expert networks on real data and log their trajectories (parameters every epoch); with
    ``shards``, start that many shard runs on the backend instead and return their ids, comma-separated."""
    if asked.shards:
        return start_shards(asked)
    device = pick_device(asked.device)
    resolved = budgets.resolve(asked, device.type)
    cfg = resolved.cfg
    real = data.load(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.train_limit)
    mine = config.parse_shard(cfg.shard, cfg.num_experts)
    with tracking.stage_run("experts", asked, run_name=f"experts-{cfg.model}-{cfg.dataset}",
                            run_id=cfg.run_id, resolved=cfg) as active:
        run_id = active.info.run_id
        budgets.log_resolved(resolved)
        tracking.log_params({"dsa_strategy": augment_strategy(cfg)})
        space = input_space(cfg, real, run_id if cfg.run_id else None)
        space.enter(real)
        lineage.log_inputs(training=real.train, test=real.test)
        meta = real.info
        done = buffer.existing_experts(run_id)
        todo = [k for k in mine if k not in done]
        log.info("experts run %s: %d of this shard's %d experts to train (%s budget, %s)", run_id, len(todo),
                 len(mine), resolved.budget, space.describe())
        train, test = real.train.to(device), real.test.to(device)
        recipe = SGDRecipe(cfg.epochs, cfg.batch_size, cfg.lr_teacher, cfg.momentum, cfg.weight_decay, "constant",
                           cfg.precision)
        augment = DSA.for_dataset(cfg.dataset) if cfg.augment == "dsa" else None
        started = time.perf_counter()
        for n, k in enumerate(tqdm(todo, desc="experts"), start=1):
            generator = seed_everything(cfg.seed * 1_000_003 + k)
            model = models.create(cfg.model, meta.channels, meta.num_classes, meta.image_size).to(device)
            trajectory, test_acc = train_expert(model, train, test, recipe, generator, augment,
                                                progress=f"expert {k}")
            entry = buffer.TrajectoryMeta(cfg.dataset, cfg.model, cfg.epochs, space.zca is not None,
                                          buffer.layout(model), k, test_acc)
            done[k] = {"index": k, "file": buffer.log_trajectory(trajectory, entry), "test_acc": test_acc}
            mlflow.log_metric("expert_test_acc", test_acc, step=k)
            buffer.log_manifest(settings(cfg), space, entry, done)
            log.info("expert %d: test accuracy %.4f", k, test_acc)
            if n == 1 and len(todo) > 1:  # measured seconds per expert x experts left, before the long part
                estimate = (time.perf_counter() - started) * (len(todo) - 1)
                mlflow.log_metric("estimated_remaining_s", estimate, step=k)
                log.info("estimated time for the remaining %d experts: %.0f s", len(todo) - 1, estimate)
        accs = [e["test_acc"] for e in done.values()]
        if accs:
            mlflow.log_metrics({"experts": len(accs), "expert_test_acc_mean": sum(accs) / len(accs)})
        return run_id


def start_shards(asked: ExpertsConfig) -> str:
    """``shards`` runs of this stage, shard i/N each, on the backend (N local processes at once, or N
    Slurm jobs); wait for all. Their ids, comma-separated, are one buffer for ``kdd distill --experts-run``."""
    budgets.resolve(asked, pick_device(asked.device).type)  # a config the shards will accept, before any job
    data.resolve(asked.dataset, asked.data_dir)
    backend = backends.load(asked.backend, asked.backend_config)
    n = asked.shards
    log.info("starting %d experts shard run(s) on the %s backend", n, backend.describe())
    backends.use_this_interpreter()
    runs = {f"experts-shard{i}of{n}": {"shard": f"{i}/{n}"} for i in range(n)}
    done = backends.start_copies(asked, "experts", "--shards", backend, runs, f"kdd-{asked.dataset}", "local")
    return ",".join(done[name] for name in runs)


def augment_strategy(cfg: ExpertsConfig) -> str:
    return DSA.for_dataset(cfg.dataset).strategy if cfg.augment == "dsa" else "none"


def settings(cfg: ExpertsConfig) -> dict:
    """What the manifest records of the run's configuration."""
    return {"dataset": cfg.dataset, "model": cfg.model, "epochs": cfg.epochs, "lr_teacher": cfg.lr_teacher,
            "train_limit": cfg.train_limit, "val_size": cfg.val_size}


def input_space(cfg: ExpertsConfig, real: data.RealData, continued: str | None) -> InputSpace:
    """The run's input space: the one a continued run stored, else ZCA fitted on this training split
    (when asked) and stored, so every later stage whitens with this very matrix."""
    if continued:
        try:
            manifest = tracking.load_json(continued, buffer.MANIFEST)
        except tracking.ArtifactError:
            manifest = None  # no expert finished before the crash: nothing was stored
        if manifest is not None:
            return buffer.stored_space(continued, manifest)
    space = InputSpace(cfg.dataset, data.ZCA.fit(real.train.images) if cfg.zca else None)
    buffer.log_space(space)
    return space
