"""The ``kdd`` command: one subcommand per stage, options generated from the stage's config model."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable

import click
from pydantic import BaseModel, ValidationError

from kdd_mlflow import __version__, tracking
from kdd_mlflow.config import (
    CombinedConfig,
    DistillConfig,
    EvaluateConfig,
    ExpertsConfig,
    KDConfig,
    TeacherConfig,
    TrainConfig,
    one_line,
)
from kdd_mlflow.data import DataUnavailableError

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1

# Stage name -> config model; the MLproject file is rendered from this (kdd_mlflow.mlproject).
STAGES: dict[str, type[BaseModel]] = {}


def fail(command: str, reason: str, code: int) -> None:
    """Print a one-line (or one-paragraph) reason, record it on an ``mlflow run`` run, and exit."""
    click.echo(f"kdd {command}: error: {reason}", err=True)
    tracking.mark_failed(reason)
    sys.exit(code)


def config_options(config_cls: type[BaseModel]) -> Callable:
    """Add ``--field-name`` for every field of ``config_cls``; values are validated by pydantic.

    Options arrive as strings (as MLproject parameters do) and an empty string means "unset".
    """

    def decorate(f: Callable) -> Callable:
        for name, field in reversed(list(config_cls.model_fields.items())):
            shown = "unset" if field.default is None else field.default
            default = "" if field.is_required() else f" [default: {shown}]"
            f = click.option(
                f"--{name.replace('_', '-')}", name, type=str, default=None, help=f"{field.description}{default}",
            )(f)
        return f

    return decorate


def build_config(command: str, config_cls: type[BaseModel], values: dict[str, str | None]) -> BaseModel:
    given = {k: v for k, v in values.items() if v not in (None, "")}
    try:
        return config_cls(**given)
    except ValidationError as exc:
        fail(command, one_line(exc), EXIT_BAD_INPUT)
        raise AssertionError("unreachable") from None


def stage_command(group: click.Group, name: str, config_cls: type[BaseModel]):
    """Register ``kdd NAME`` running a stage function that takes the validated config."""

    STAGES[name] = config_cls

    def decorate(stage: Callable[[BaseModel], str]):
        @group.command(name, help=stage.__doc__)
        @config_options(config_cls)
        @functools.wraps(stage)
        def command(**values: str | None) -> None:
            cfg = build_config(name, config_cls, values)
            try:
                run_id = stage(cfg)
            except DataUnavailableError as exc:
                fail(name, str(exc), EXIT_FAILED)
            except (ValueError, RuntimeError, FileNotFoundError, ArithmeticError) as exc:
                fail(name, str(exc).splitlines()[0], EXIT_FAILED)
            click.echo(f"run_id: {run_id}")

        return command

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="kdd")
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def main(verbose: bool) -> None:
    """Distil data (MTT) and models (knowledge distillation), tracked end to end in MLflow.

    Each command is one stage and one MLflow run; stages hand work on through run ids.
    MLFLOW_TRACKING_URI is respected; otherwise MLflow's local SQLite store is used.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("alembic", "mlflow.store", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@stage_command(main, "train", TrainConfig)
def train(cfg: TrainConfig) -> str:
    """Train one model on real data (teachers and baselines); logs per-epoch metrics and the model."""
    from kdd_mlflow.stages import train as stage

    return stage.run(cfg)


@stage_command(main, "experts", ExpertsConfig)
def experts(cfg: ExpertsConfig) -> str:
    """Train expert networks and log their trajectories (parameters at init and after every epoch).

    Shard with --shard i/n or a:b; continue a run's missing experts with --run-id.
    """
    from kdd_mlflow.stages import experts as stage

    return stage.run(cfg)


@stage_command(main, "distill", DistillConfig)
def distill(cfg: DistillConfig) -> str:
    """Distil a synthetic set from experts run(s) by matching training trajectories (MTT)."""
    from kdd_mlflow.stages import distill as stage

    return stage.run(cfg)


@stage_command(main, "teacher", TeacherConfig)
def teacher(cfg: TeacherConfig) -> str:
    """Train the bigger (teacher) model on real data or on a distill run's synthetic set."""
    from kdd_mlflow.stages import train as stage

    return stage.run_teacher(cfg)


@stage_command(main, "kd", KDConfig)
def kd(cfg: KDConfig) -> str:
    """Distil a teacher run into a small student on real data, a synthetic set or a random subset.

    Losses: hinton = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE; mse = alpha * logit MSE +
    (1 - alpha) * CE; hint = hinton + beta * FitNets feature hint. alpha weighs the distillation term.
    """
    from kdd_mlflow.stages import kd as stage

    return stage.run(cfg)


@stage_command(main, "evaluate", EvaluateConfig)
def evaluate(cfg: EvaluateConfig) -> str:
    """Every test metric of several model runs side by side, with fidelity to a reference teacher."""
    from kdd_mlflow.stages import evaluate as stage

    return stage.run(cfg)


@stage_command(main, "combined", CombinedConfig)
def combined(cfg: CombinedConfig) -> str:
    """The whole study: experts, distill and every comparison arm as child runs of one parent, then the
    comparison report (table and figures) on the parent. Finished stages with the same parameters and
    code version are reused (--force all, or stage names, re-runs them)."""
    from kdd_mlflow import pipeline

    return pipeline.run(cfg)


if __name__ == "__main__":
    main()
