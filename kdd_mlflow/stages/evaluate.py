"""Stage ``evaluate``: every metric of several model runs on the test set, side by side."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import mlflow

from kdd_mlflow import data, metrics, models, report, tracking
from kdd_mlflow.config import EvaluateConfig
from kdd_mlflow.runtime import pick_device
from kdd_mlflow.train import predict_logits

log = logging.getLogger(__name__)


def test_logits(run_id: str, real: data.RealData, device):
    """A logged model's test logits, with its inputs whitened if it was trained whitened."""
    model, spec, zca = tracking.load_model(run_id, expect={"dataset": real.info.name})
    images = zca(real.test.images) if zca is not None else real.test.images
    return predict_logits(model.to(device), images.to(device)), spec, models.count_parameters(model)


def run(cfg: EvaluateConfig) -> str:
    """Compute accuracy, NLL, ECE (and agreement and KL with the reference) for each model run."""
    device = pick_device(cfg.device)
    for run_id in cfg.run_ids + ([cfg.reference] if cfg.reference else []):
        tracking.require_run(run_id)
    real = data.load(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.train_limit)
    labels = real.test.labels.to(device)
    with tracking.stage_run("evaluate", cfg, run_name=f"evaluate-{cfg.dataset}") as active:
        reference = test_logits(cfg.reference, real, device)[0] if cfg.reference else None
        rows = []
        for run_id in cfg.run_ids:
            logits, spec, params = test_logits(run_id, real, device)
            name = mlflow.get_run(run_id).info.run_name or run_id
            row = {"run": name, "run_id": run_id, "model": spec["model"], "parameters": params,
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
