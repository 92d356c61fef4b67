"""Stage ``evaluate``: every metric of several model runs on the test set, side by side."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import mlflow

from kdd_mlflow import data, metrics, report, tracking
from kdd_mlflow.artifacts import model as model_artifact
from kdd_mlflow.config import EvaluateConfig
from kdd_mlflow.runtime import pick_device

log = logging.getLogger(__name__)


def run(cfg: EvaluateConfig) -> str:
    """Compute accuracy, NLL, ECE (and agreement and KL with the reference) for each model run."""
    device = pick_device(cfg.device)
    for run_id in cfg.run_ids + ([cfg.reference] if cfg.reference else []):
        tracking.require_run(run_id)
    real = data.load(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.train_limit)
    labels = real.test.labels.to(device)
    with tracking.stage_run("evaluate", cfg, run_name=f"evaluate-{cfg.dataset}") as active:
        expect = {"dataset": cfg.dataset}
        reference = model_artifact.load(cfg.reference, expect).logits(real.test.images, device) if cfg.reference \
            else None
        rows = []
        for run_id in cfg.run_ids:
            trained = model_artifact.load(run_id, expect)
            logits = trained.logits(real.test.images, device)
            name = mlflow.get_run(run_id).info.run_name or run_id
            row = {"run": name, "run_id": run_id, "model": trained.name, "parameters": trained.parameters,
                   **metrics.classification(logits, labels)}
            if reference is not None:
                row.update(metrics.fidelity(reference, logits))
            rows.append(row)
            mlflow.log_metrics({f"{name}.{k}": v for k, v in row.items() if isinstance(v, float)})
        report.log_rows(rows, "evaluation")
        with tempfile.TemporaryDirectory() as tmp:
            report.write_html(report.metric_bars(rows, "run", ["acc", "agreement", "ece"] if reference is not None
                                                 else ["acc", "ece"], f"{cfg.dataset}: test metrics"),
                              Path(tmp) / "evaluation.html")
            mlflow.log_artifact(str(Path(tmp) / "evaluation.html"))
        return active.info.run_id
