"""The ``kdd`` command: one subcommand per stage, options generated from the stage's config model."""

from __future__ import annotations

import importlib
import logging
import signal
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
    TuneConfig,
    one_line,
)
from kdd_mlflow.data import DataUnavailableError
from kdd_mlflow.runtime import first_line, keep_freed_memory

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt(f"terminated by signal {signum}")

# Stage name -> config model; the MLproject file is rendered from this (kdd_mlflow.mlproject).
STAGES: dict[str, type[BaseModel]] = {}


def fail(command: str, reason: str, code: int) -> None:
    """Print a one-line (or one-paragraph) reason, record it on an ``mlflow run`` run, and exit."""
    click.echo(f"{' '.join(['kdd', command]).strip()}: error: {reason}", err=True)
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


def add_stage(group: click.Group, name: str, config_cls: type[BaseModel], target: str, help: str) -> None:
    """Register ``kdd NAME``: options from ``config_cls``; ``target`` ("module:function") runs the stage.

    The stage's module is imported only when the command runs, so ``kdd --help`` and bad input stay fast.
    """
    STAGES[name] = config_cls

    @group.command(name, help=help)
    @config_options(config_cls)
    def command(**values: str | None) -> None:
        cfg = build_config(name, config_cls, values)
        module, function = target.split(":")
        from mlflow.exceptions import MlflowException

        try:
            tracking.check_store()
            run_id = getattr(importlib.import_module(module), function)(cfg)
        except DataUnavailableError as exc:
            fail(name, str(exc), EXIT_FAILED)
        except (ValueError, RuntimeError, OSError, ArithmeticError, MlflowException) as exc:
            fail(name, tracking.redact(first_line(exc)), EXIT_FAILED)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the run is already marked KILLED; checkpoints stay
            click.echo(f"kdd {name}: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        click.echo(f"run_id: {run_id}")


class OneLineErrors(click.Group):
    """Usage errors (an unknown option, a missing value) as one line and exit 2, like every other bad input."""

    def main(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)
        try:
            code = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.UsageError as exc:
            command = exc.ctx.info_name if exc.ctx is not None and exc.ctx.parent is not None else ""
            fail(command, f"{exc.format_message().rstrip('.')} (see --help)", EXIT_BAD_INPUT)
        except click.Abort:
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=OneLineErrors,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="kdd")
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def main(verbose: bool) -> None:
    """Distil data (MTT) and models (knowledge distillation), tracked end to end in MLflow.

    Each command is one stage and one MLflow run; stages hand work on through run ids.
    MLFLOW_TRACKING_URI is respected; otherwise MLflow's local SQLite store is used.
    """
    signal.signal(signal.SIGTERM, _terminated)  # a cancelled stage ends its run KILLED, as Ctrl-C does
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    keep_freed_memory()  # large tensors reuse freed memory instead of fresh pages (trajectory matching)
    for noisy in ("alembic", "mlflow.store", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


add_stage(main, "train", TrainConfig, "kdd_mlflow.stages.train:run",
          "Train one model on real data (teachers and baselines); logs per-epoch metrics and the model.")
add_stage(main, "experts", ExpertsConfig, "kdd_mlflow.stages.experts:run",
          "Train expert networks and log their trajectories (parameters at init and after every epoch). "
          "Shard with --shard i/n or a:b; continue a run's missing experts with --run-id.")
add_stage(main, "distill", DistillConfig, "kdd_mlflow.stages.distill:run",
          "Distil a synthetic set from experts run(s) by matching training trajectories (MTT).")
add_stage(main, "teacher", TeacherConfig, "kdd_mlflow.stages.train:run_teacher",
          "Train the bigger (teacher) model on real data, on a distill run's synthetic set, or on a random "
          "real subset.")
add_stage(main, "kd", KDConfig, "kdd_mlflow.stages.kd:run",
          "Distil a teacher run into a small student on real data, a synthetic set or a random subset. "
          "Losses: hinton = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE; mse = alpha * logit "
          "MSE + (1 - alpha) * CE; hint = hinton + beta * FitNets feature hint. alpha weighs the distillation "
          "term.")
add_stage(main, "evaluate", EvaluateConfig, "kdd_mlflow.stages.evaluate:run",
          "Every test metric of several model runs side by side, with fidelity to a reference teacher.")
add_stage(main, "combined", CombinedConfig, "kdd_mlflow.pipeline:run",
          "The whole study: experts, distill and every comparison arm as child runs of one parent, then the "
          "comparison report (table and figures) on the parent. Finished stages with the same parameters and "
          "code version are reused (--force all, or stage names, re-runs them).")
add_stage(main, "tune", TuneConfig, "kdd_mlflow.tune:run",
          "An Optuna study over the proposal arm: the synthetic step size (lr_teacher, lr_lr), images per class "
          "and the KD temperature (alpha optional). Each search option takes LOW:HIGH, A,B,C or one value. "
          "Workers with the same --study-name and --storage share the study; --n-trials counts all of them.")


if __name__ == "__main__":
    main()
