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
