"""Figures and tables for runs: image grids now; comparison reports build on the same helpers."""

from __future__ import annotations

from pathlib import Path

import plotly.express as px
import torch
import torchvision

from kdd_mlflow.data import DatasetInfo


def write_html(fig, path: str | Path) -> None:
    """Self-contained HTML: plotly.js inlined, so the file renders offline and inside the MLflow UI."""
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)


def image_grid(pixels: torch.Tensor, labels: torch.Tensor, meta: DatasetInfo, png: str | Path, html: str | Path,
               title: str) -> None:
    """One row per class: a PNG and an interactive plotly figure of images in [0, 1] pixel space."""
    order = torch.argsort(labels, stable=True)
    per_class = int(torch.bincount(labels).max())
    pixels = pixels[order].clamp(0, 1)
    grid = torchvision.utils.make_grid(pixels, nrow=per_class, padding=2, pad_value=1.0)
    scale = max(1, 128 // meta.image_size)
    torchvision.utils.save_image(torch.nn.functional.interpolate(grid[None], scale_factor=scale)[0], str(png))
    picture = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    if picture.shape[2] == 1:
        picture = picture[:, :, 0]
    fig = px.imshow(picture, binary_string=False, color_continuous_scale="gray", title=title)
    step = meta.image_size + 2
    names = meta.class_names or tuple(str(c) for c in range(meta.num_classes))
    fig.update_yaxes(tickvals=[step * c + step / 2 for c in range(meta.num_classes)], ticktext=list(names))
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(coloraxis_showscale=False, height=max(400, 40 * meta.num_classes))
    write_html(fig, html)


def log_rows(rows: list[dict], name: str) -> None:
    """Log a list of records as an MLflow table (``name``.json, shown in the UI), CSV and Markdown."""
    import mlflow
    import pandas as pd

    frame = pd.DataFrame(rows)
    mlflow.log_table(frame, f"{name}.json")
    mlflow.log_text(frame.to_csv(index=False), f"{name}.csv")
    mlflow.log_text(markdown_table(rows), f"{name}.md")


def markdown_table(rows: list[dict], floats: str = "{:.4f}") -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [floats.format(row[k]) if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def metric_bars(rows: list[dict], label: str, keys: list[str], title: str):
    """Grouped bars: one group per row, one bar per metric."""
    import plotly.graph_objects as go

    fig = go.Figure([go.Bar(name=k, x=[r[label] for r in rows], y=[r.get(k) for r in rows]) for k in keys])
    fig.update_layout(barmode="group", title=title, yaxis_title="value", xaxis_title=label)
    return fig


def log_comparison(rows: list[dict], cfg) -> None:
    """The parent run's report: per-arm metrics named so MLflow's compare and chart views line the arms up
    (``test_acc/proposal``), the table (MLflow table, CSV, Markdown) and three self-contained figures."""
    import tempfile

    import mlflow
    import plotly.graph_objects as go

    for row in rows:
        arm = row["arm"]
        mlflow.log_metrics({f"{k}/{arm}": float(row[k]) for k in
                            ("test_acc", "test_acc_std", "agreement", "kl", "ece", "nll", "wall_s",
                             "parameters", "train_images")})
    log_rows(rows, "report/comparison")
    arms = [r["arm"] for r in rows]
    title = f"{cfg.dataset}, ipc {cfg.ipc}"
    accuracy = go.Figure(go.Bar(x=arms, y=[r["test_acc"] for r in rows],
                                error_y={"type": "data", "array": [r["test_acc_std"] for r in rows]}))
    accuracy.update_layout(title=f"Test accuracy per arm ({title})", yaxis_title="test accuracy")
    compression = go.Figure(go.Scatter(
        x=[r["parameters"] * r["train_images"] for r in rows], y=[r["test_acc"] for r in rows],
        mode="markers+text", text=arms, textposition="top center"))
    compression.update_layout(title=f"Accuracy against cost: parameters x training images ({title})",
                              xaxis_type="log", xaxis_title="parameters x training images",
                              yaxis_title="test accuracy")
    fidelity = go.Figure([go.Bar(name="agreement with the full-data teacher", x=arms, y=[r["agreement"] for r in rows]),
                          go.Bar(name="KL(teacher || model)", x=arms, y=[r["kl"] for r in rows])])
    fidelity.update_layout(title=f"Fidelity to the full-data teacher, test set ({title})", barmode="group")
    with tempfile.TemporaryDirectory() as tmp:
        for name, fig in (("accuracy", accuracy), ("compression", compression), ("fidelity", fidelity)):
            write_html(fig, f"{tmp}/{name}.html")
        mlflow.log_artifacts(tmp, "report")
