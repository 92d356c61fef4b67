"""Figures and tables for runs: image grids now; comparison reports build on the same helpers."""

from __future__ import annotations

import html
import math
from pathlib import Path

import plotly.express as px
import torch

from kdd_mlflow import tracking
from kdd_mlflow.data import DatasetInfo


def write_html(fig, path: str | Path) -> None:
    """Self-contained HTML: plotly.js inlined, so the file renders offline and inside the MLflow UI."""
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)


def image_grid(pixels: torch.Tensor, labels: torch.Tensor, meta: DatasetInfo, png: str | Path, html: str | Path,
               title: str) -> None:
    """One row per class: a PNG and an interactive plotly figure of images in [0, 1] pixel space."""
    import torchvision  # here: its import (torch._dynamo with it) would cost every stage importing this a second

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


# What a model of the comparison trained on, from its stage's tag (teacher: kdd.source, kd: kdd.transfer).
FAMILIES = {"real": "full data", "synthetic": "distilled set", "subset": "random subset"}
COLOURS = {"full data": "#4c72b0", "distilled set": "#dd8452", "random subset": "#8c8c8c"}
NOTE_TAG = "mlflow.note.content"  # the run's description, shown on its Overview tab


def trained_on(run_id: str) -> dict[str, str]:
    """``family``: full data, distilled set or random subset; ``labels``: hard, or soft from a teacher (KD)."""
    from mlflow.tracking import MlflowClient

    from kdd_mlflow.tracking import STAGE_TAG

    def family(run) -> str:
        return FAMILIES[run.data.tags.get("kdd.source") or run.data.tags.get("kdd.transfer") or "real"]

    client = MlflowClient()
    run = client.get_run(run_id)
    labels = "hard"
    synthetic_run = run.data.params.get("synthetic_run")
    if family(run) == "distilled set" and synthetic_run:  # the set's own labels: hard, or soft (distill --labels)
        params = client.get_run(synthetic_run).data.params  # as asked, else as the budget filled it in
        own = tracking.given(params, "labels") or tracking.given(params, "budget.labels") or "hard"
        labels = "hard" if own == "hard" else f"the set's {own} soft labels"
    if run.data.tags.get(STAGE_TAG) == "kd":
        teacher = f"teacher on {family(client.get_run(run.data.params['teacher_run']))}"
        labels = f"soft, {teacher}" if labels == "hard" else f"soft, {teacher} + {labels}"
    return {"family": family(run), "labels": labels}


def summary(rows: list[dict]) -> list[dict]:
    """The comparison as people read it: accuracy with its spread, fidelity, calibration, data and labels."""
    return [{"arm": r["arm"], "model": r["model"], "test acc": f"{r['test_acc']:.4f} ± {r['test_acc_std']:.4f}",
             "agreement": f"{r['agreement']:.4f}", "KL": f"{r['kl']:.4f}", "ECE": f"{r['ece']:.4f}",
             "training images": f"{r['train_images']:,}", "labels": r["labels"]} for r in rows]


def html_table(rows: list[dict]) -> str:
    """Records as an HTML table, every cell escaped."""
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def accuracy_figure(rows: list[dict], title: str):
    """Test accuracy per arm, coloured by family, with the random-subset baseline; a second panel zooms on the
    small-set arms, whose differences a shared axis from 0 would hide."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    small = [r for r in rows if r["family"] != "full data"]
    panels = [rows, small] if small else [rows]
    fig = make_subplots(1, len(panels), column_widths=[0.55, 0.45][:len(panels)], horizontal_spacing=0.08,
                        subplot_titles=["all arms", "small-set arms (zoomed)"][:len(panels)])
    for col, panel in enumerate(panels, start=1):
        for name, colour in COLOURS.items():
            members = [r for r in panel if r["family"] == name]
            if members:
                fig.add_trace(go.Bar(
                    x=[r["arm"] for r in members], y=[r["test_acc"] for r in members], name=name, marker_color=colour,
                    error_y={"type": "data", "array": [r["test_acc_std"] for r in members]}, legendgroup=name,
                    showlegend=col == 1, hovertemplate="%{x}: %{y:.4f}<extra>" + name + "</extra>"), 1, col)
        fig.update_xaxes(categoryorder="array", categoryarray=[r["arm"] for r in panel], row=1, col=col)
    if small:
        low = min(r["test_acc"] - r["test_acc_std"] for r in small)
        high = max(r["test_acc"] + r["test_acc_std"] for r in small)
        margin = max(0.25 * (high - low), 0.005)
        fig.update_yaxes(range=[max(low - margin, 0), min(high + margin, 1)], row=1, col=2)
    baseline = next((r for r in rows if r["family"] == "random subset" and r["labels"] == "hard"), None)
    if baseline:
        fig.add_hline(y=baseline["test_acc"], line_dash="dash", line_color="#333", row=1, col="all")
        fig.add_annotation(x=1, xref=f"x{len(panels)} domain", y=baseline["test_acc"], yref=f"y{len(panels)}",
                           text=f"random-subset baseline<br>{baseline['arm']}: {baseline['test_acc']:.4f}",
                           xanchor="right", yanchor="top", showarrow=False, bgcolor="rgba(255, 255, 255, 0.85)",
                           font_size=11)
    fig.update_yaxes(title_text="test accuracy", row=1, col=1)
    fig.update_layout(title=f"Test accuracy per arm ({title}); error bars: std over seeds", barmode="overlay",
                      height=500, legend_title_text="trained on")
    return fig


def fidelity_figure(rows: list[dict], title: str):
    import plotly.graph_objects as go

    arms = [r["arm"] for r in rows]
    fig = go.Figure([go.Bar(name="agreement with the full-data teacher", x=arms, y=[r["agreement"] for r in rows]),
                     go.Bar(name="KL(teacher || model)", x=arms, y=[r["kl"] for r in rows])])
    fig.update_layout(title=f"Fidelity to the full-data teacher, test set ({title})", barmode="group", height=450)
    return fig


def compression_figure(rows: list[dict], title: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, colour in COLOURS.items():
        members = [r for r in rows if r["family"] == name]
        if members:
            fig.add_trace(go.Scatter(
                x=[r["parameters"] * r["train_images"] for r in members], y=[r["test_acc"] for r in members],
                error_y={"type": "data", "array": [r["test_acc_std"] for r in members]}, name=name,
                mode="markers+text", text=[r["arm"] for r in members], textposition="middle right",
                marker={"color": colour, "size": 10}))
    costs = [math.log10(r["parameters"] * r["train_images"]) for r in rows]
    fig.update_layout(title=f"Accuracy against cost: parameters x training images ({title})", height=450,
                      xaxis_type="log", xaxis_title="parameters x training images", yaxis_title="test accuracy",
                      xaxis_range=[min(costs) - 0.3, max(costs) + 1.2],  # room for the labels right of the points
                      legend_title_text="trained on")
    return fig


def report_page(rows: list[dict], title: str, figures: list) -> str:
    """One self-contained HTML page: the table and the figures, plotly.js inlined once, no network needed."""
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    divs = "\n".join(pio.to_html(f, full_html=False, include_plotlyjs=False, config={"displaylogo": False})
                      for f in figures)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px 32px; color: #222; }}
table {{ border-collapse: collapse; margin: 12px 0 24px; font-size: 14px; }}
th, td {{ padding: 4px 12px; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }}
th:first-child, td:first-child, th:nth-child(2), td:nth-child(2), th:last-child, td:last-child {{ text-align: left; }}
th {{ border-bottom: 2px solid #888; }}
</style>
<script>{get_plotlyjs()}</script>
</head><body>
<h1>{html.escape(title)}</h1>
<p>Test accuracy is the mean ± std over seeds; agreement and KL(teacher || model) are against the full-data
teacher on the test set.</p>
{html_table(summary(rows))}
{divs}
</body></html>
"""


def log_comparison(rows: list[dict], cfg) -> None:
    """The parent run's report: per-arm metrics named so MLflow's compare and chart views line the arms up
    (``test_acc/proposal``), the table (MLflow table, CSV, Markdown, and the run's description) and one
    self-contained page with the table and figures (``report/report.html``)."""
    import tempfile

    import mlflow

    for row in rows:
        arm = row["arm"]
        mlflow.log_metrics({f"{k}/{arm}": float(row[k]) for k in
                            ("test_acc", "test_acc_std", "agreement", "kl", "ece", "nll", "wall_s",
                             "parameters", "train_images")})
    rows = [{**row, **trained_on(row["runs"].split(",")[0])} for row in rows]
    log_rows(rows, "report/comparison")
    title = f"{cfg.dataset}, ipc {cfg.ipc}, seeds {cfg.seeds}"
    mlflow.set_tag(NOTE_TAG, f"**{title}**: test accuracy is the mean ± std over seeds; agreement and KL are "
                             "against the full-data teacher on the test set. Figures: Artifacts, "
                             f"`report/report.html`.\n\n{markdown_table(summary(rows))}")
    figures = [accuracy_figure(rows, title), fidelity_figure(rows, title), compression_figure(rows, title)]
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "report.html").write_text(report_page(rows, f"Comparison: {title}", figures), encoding="utf-8")
        mlflow.log_artifact(f"{tmp}/report.html", "report")
