"""Stage ``experts``: expert trajectories for MTT, one artifact per expert plus a manifest.

Experts are indexed 0..N-1 and expert k is seeded by (seed, k), so shards (``i/n`` or ``a:b``) run in
separate processes or machines fill one buffer without overlap, and re-running a run (``run_id``)
trains only the experts it is missing: a crash loses at most the expert in progress.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import mlflow
from tqdm.auto import tqdm

from kdd_mlflow import config, data, lineage, models, tracking
from kdd_mlflow.augment import DSA
from kdd_mlflow.config import ExpertsConfig
from kdd_mlflow.distill.experts import TrajectoryMeta, layout, save_trajectory, train_expert
from kdd_mlflow.runtime import pick_device, seed_everything
from kdd_mlflow.train import SGDRecipe

log = logging.getLogger(__name__)

TRAJECTORY_DIR = "trajectories"
MANIFEST = "manifest.json"


def expert_file(index: int) -> str:
    return f"expert_{index:04d}.safetensors"


def resolve_budget(cfg: ExpertsConfig, device_type: str) -> tuple[str, ExpertsConfig, dict]:
    budget = config.pick_budget(cfg.budget, device_type)
    if budget == "paper":
        table = dict(config.PAPER_EXPERTS, zca=cfg.dataset.startswith("cifar"))
    else:
        table = dict(config.QUICK_EXPERTS)
    return (budget, *config.resolve(cfg, table))


def existing_experts(run_id: str) -> dict[int, dict]:
    """Manifest entries of the experts a run already holds."""
    client = mlflow.MlflowClient()
    names = {Path(a.path).name for a in client.list_artifacts(run_id, TRAJECTORY_DIR)}
    try:
        manifest = mlflow.artifacts.load_dict(f"runs:/{run_id}/{MANIFEST}")
    except Exception:
        return {}
    return {e["index"]: e for e in manifest.get("experts", []) if e["file"] in names}


def run(asked: ExpertsConfig) -> str:
    """Train expert networks on real data and log their trajectories (parameters every epoch)."""
    device = pick_device(asked.device)
    budget, cfg, filled = resolve_budget(asked, device.type)
    real = data.load(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.train_limit)
    if cfg.zca:
        data.whiten(real)
    meta = real.info
    mine = config.parse_shard(cfg.shard, cfg.num_experts)
    with tracking.stage_run("experts", asked, run_name=f"experts-{cfg.model}-{cfg.dataset}",
                            run_id=cfg.run_id, resolved=cfg) as active:
        run_id = active.info.run_id
        tracking.log_params({"budget.resolved": budget, **{f"budget.{k}": v for k, v in filled.items()}})
        lineage.log_inputs(training=real.train, test=real.test)
        done = existing_experts(run_id)
        todo = [k for k in mine if k not in done]
        log.info("experts run %s: %d of this shard's %d experts to train (%s budget)", run_id, len(todo),
                 len(mine), budget)
        train, test = real.train.to(device), real.test.to(device)
        recipe = SGDRecipe(cfg.epochs, cfg.batch_size, cfg.lr_teacher, cfg.momentum, cfg.weight_decay, "constant",
                           cfg.precision)
        augment = DSA() if cfg.augment == "dsa" else None
        started = time.perf_counter()
        for n, k in enumerate(tqdm(todo, desc="experts"), start=1):
            generator = seed_everything(cfg.seed * 1_000_003 + k)
            model = models.create(cfg.model, meta.channels, meta.num_classes, meta.image_size).to(device)
            trajectory, test_acc = train_expert(model, train, test, recipe, generator, augment,
                                                progress=f"expert {k}")
            entry = TrajectoryMeta(cfg.dataset, cfg.model, cfg.epochs, bool(cfg.zca), layout(model), k, test_acc)
            with tempfile.TemporaryDirectory() as tmp:
                save_trajectory(Path(tmp) / expert_file(k), trajectory, entry)
                mlflow.log_artifact(str(Path(tmp) / expert_file(k)), TRAJECTORY_DIR)
            done[k] = {"index": k, "file": expert_file(k), "test_acc": test_acc}
            mlflow.log_metric("expert_test_acc", test_acc, step=k)
            mlflow.log_dict(manifest(cfg, entry, done), MANIFEST)
            log.info("expert %d: test accuracy %.4f", k, test_acc)
            if n == 1 and len(todo) > 1:  # measured seconds per expert x experts left, before the long part
                estimate = (time.perf_counter() - started) * (len(todo) - 1)
                mlflow.log_metric("estimated_remaining_s", estimate, step=k)
                log.info("estimated time for the remaining %d experts: %.0f s", len(todo) - 1, estimate)
        accs = [e["test_acc"] for e in done.values()]
        if accs:
            mlflow.log_metrics({"experts": len(accs), "expert_test_acc_mean": sum(accs) / len(accs)})
        return run_id


def manifest(cfg: ExpertsConfig, entry: TrajectoryMeta, done: dict[int, dict]) -> dict:
    return {
        "dataset": cfg.dataset, "model": cfg.model, "epochs": cfg.epochs, "zca": bool(cfg.zca),
        "num_params": entry.num_params, "dtype": "float32", "layout": entry.layout,
        "lr_teacher": cfg.lr_teacher, "train_limit": cfg.train_limit, "val_size": cfg.val_size,
        "experts": [done[k] for k in sorted(done)],
    }


def load_manifests(run_ids: list[str]) -> dict:
    """Merge the manifests of one or more experts runs, checking they describe one buffer."""
    merged: dict | None = None
    for run_id in run_ids:
        tracking.require_run(run_id, "experts run", ("experts",))
        m = tracking.load_json(run_id, MANIFEST)
        for e in m["experts"]:
            e["run_id"] = run_id
        if merged is None:
            merged = m
            continue
        for key in ("dataset", "model", "epochs", "zca", "num_params", "train_limit", "val_size"):
            if m[key] != merged[key]:
                raise tracking.ArtifactError(
                    f"experts run {run_id} has {key}={m[key]!r}, but {run_ids[0]} has {merged[key]!r}"
                )
        merged["experts"] += m["experts"]
    if not merged or not merged["experts"]:
        raise tracking.ArtifactError(f"experts run(s) {', '.join(run_ids)} hold no finished experts")
    return merged
