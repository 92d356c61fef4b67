"""Optuna studies over the proposal arm, tracked in MLflow.

A trial runs experts -> distill, then the proposal arm with the arms it needs (``kdd_mlflow.arms``: the
teacher on the synthetic set, then KD into the student on that set) as stage runs, reusing any FINISHED
stage run with the same parameters (the experts are shared by every trial of a dataset, or under the
paper budget by the trials whose ipc's published row whitens alike; a distill run is shared by trials
that repeat its parameters). Its value is the proposal student's validation accuracy; test accuracy is
only stored as a trial attribute.

In MLflow: one study run (the first worker's run), a nested run per trial (params, value, state) whose
children are the trial's stage runs, and the study's plots and best parameters on the study run.

Many workers: processes that share the study name and storage cooperate. ``n_trials`` counts trials of
the whole study; a worker reserves a trial (an empty enqueued trial) under a lock on the storage, so the
study ends with exactly ``n_trials`` trials however many workers run. On RDB storage each trial sends a
heartbeat; a trial whose worker died is failed by the next worker that starts a trial and does not
count, so another trial takes its place.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import optuna
from mlflow.tracking import MlflowClient

from kdd_mlflow import arms, backends, budgets, pipeline, report, tracking
from kdd_mlflow.config import TuneConfig
from kdd_mlflow.runtime import first_line
from kdd_mlflow.search_space import TUNABLE, Dimension

log = logging.getLogger(__name__)

STUDY_RUN_ATTR = "mlflow_run_id"
PARENT_TAG = "mlflow.parentRunId"


# --- storage, lock, sampler, pruner -------------------------------------------------------------------------


def is_journal(url: str) -> bool:
    return url.endswith(".log") and "://" not in url


def storage_path(url: str) -> Path | None:
    """The file behind a SQLite URL or a journal, else None."""
    if is_journal(url):
        return Path(url)
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///"))
    return None


def open_storage(url: str, heartbeat: int) -> optuna.storages.BaseStorage:
    """RDB storage with heartbeats (a trial silent for two intervals is failed), or a journal file."""
    if is_journal(url):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url))
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        with storage_lock(url, "schema"):  # workers starting together would race to create the tables
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat,
                                              grace_period=2 * heartbeat)
    except Exception as exc:  # SQLAlchemy's and the driver's errors, a lock file that cannot be made
        raise tracking.StoreUnavailable(f"Optuna storage {tracking.redact(url)} cannot be opened: "
                                        f"{tracking.redact(first_line(exc))}") from None


@contextlib.contextmanager
def storage_lock(url: str, study_name: str, timeout: float = 600) -> Iterator[None]:
    """Mutual exclusion between workers of one study: a lock file next to a file storage, a PostgreSQL
    advisory lock on PostgreSQL; other databases get none (a study may then overshoot n_trials by up to
    the number of workers minus one)."""
    path = storage_path(url)
    if path is not None:
        import filelock

        with filelock.FileLock(f"{path}.{study_name}.lock", timeout=timeout):
            yield
        return
    if url.startswith(("postgresql", "postgres")):
        import sqlalchemy

        key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        engine.dispose()
        return
    log.warning("no cross-worker lock for %s storage: the study may run a few trials more than n_trials",
                url.split(":")[0])
    yield


def make_sampler(cfg: TuneConfig, seed: int) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if cfg.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if cfg.sampler == "nsgaii":
            return optuna.samplers.NSGAIISampler(seed=seed)
        # constant_liar: running trials count as bad guesses, so parallel workers spread out.
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)


def make_pruner(cfg: TuneConfig) -> optuna.pruners.BasePruner:
    # The first value a trial reports is the distill run's evaluation of its initial images (real images
    # drawn by seed), which says nothing about the trial's parameters: no pruning on it.
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.prune_startup, n_warmup_steps=1)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=2, reduction_factor=3)
    return optuna.pruners.NopPruner()


FAIL_REASON = "fail_reason"


def counted_trials(study: optuna.Study) -> int:
    """Trials that count towards n_trials: all but those that failed because their worker died (a FAIL
    without a recorded reason: the heartbeat, or an interrupt, ended it); those are run again."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state != optuna.trial.TrialState.FAIL or FAIL_REASON in t.user_attrs)


def recording_failures(objective: Callable[[optuna.Trial], object]) -> Callable[[optuna.Trial], object]:
    """The objective, recording why a trial failed (a failure of the trial itself, which counts)."""

    def run(trial: optuna.Trial):
        try:
            return objective(trial)
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            trial.set_user_attr(FAIL_REASON, (str(exc).splitlines() or [type(exc).__name__])[0][:1000])
            raise

    return run


def work(study: optuna.Study, objective: Callable[[optuna.Trial], float | tuple[float, float]],
         n_trials: int | None, timeout: float | None, lock: Callable[[], contextlib.AbstractContextManager],
         catch: tuple[type[Exception], ...] = ()) -> int:
    """Run trials of ``study`` until it holds ``n_trials`` (over every worker) or ``timeout`` passes.

    Under ``lock``, trials whose worker died are failed (heartbeat), the study's trials are counted,
    and one trial is reserved (enqueued, empty); ``optimize`` then takes a reserved trial. Every worker
    reserves exactly one trial per trial it takes, so together they run exactly ``n_trials``.
    Return how many trials this worker ran.
    """
    started, ran = time.monotonic(), 0
    objective = recording_failures(objective)
    while timeout is None or time.monotonic() - started < timeout:
        if n_trials is not None:
            with lock():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(study)
                if counted_trials(study) >= n_trials:
                    break
                study.enqueue_trial({}, skip_if_exists=False)
        study.optimize(objective, n_trials=1, catch=catch, gc_after_trial=True)
        ran += 1
    return ran


# --- the objective ------------------------------------------------------------------------------------------


def suggest(trial: optuna.Trial, dim: Dimension) -> float | int:
    if dim.kind == "fixed":
        return dim.cast(dim.values[0])
    if dim.kind == "choice":
        return trial.suggest_categorical(dim.name, [dim.cast(v) for v in dim.values])
    low, high = dim.values
    if dim.integer:
        return trial.suggest_int(dim.name, int(low), int(high), log=dim.log)
    return trial.suggest_float(dim.name, low, high, log=dim.log)


class Reporter:
    """Feeds a trial the validation accuracies its stage runs log, in order, as intermediate values
    (step = how many values came before), and stops the trial when the pruner says so."""

    def __init__(self, trial: optuna.Trial, enabled: bool):
        self.trial, self.enabled = trial, enabled
        self.step = 0
        self.seen: dict[str, int] = {}

    def __call__(self, run_id: str) -> None:
        if not self.enabled:
            return
        history = sorted(MlflowClient().get_metric_history(run_id, "val_acc"), key=lambda m: (m.step, m.timestamp))
        new = history[self.seen.get(run_id, 0):]
        self.seen[run_id] = len(history)
        for m in new:
            self.trial.report(m.value, self.step)
            self.step += 1
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"validation accuracy {m.value:.4f} at step {self.step - 1}")


class Objective:
    """One trial: the tuned arm's stages as children of the trial's MLflow run."""

    def __init__(self, resolved: budgets.Resolved[TuneConfig], study_run: str, worker_run: str, experiment_id: str,
                 env_manager: str, experts: dict[int, str], backend: backends.Backend):
        self.cfg, self.budget, self.study_run, self.worker_run = resolved.cfg, resolved.budget, study_run, worker_run
        self.experiment_id, self.env_manager, self.experts = experiment_id, env_manager, experts  # ipc -> run
        self.backend = backend

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        values = {d.name: suggest(trial, d) for d in self.cfg.space}
        name = f"trial-{trial.number}"
        run = mlflow.start_run(run_name=name, nested=True, experiment_id=self.experiment_id)
        mlflow.set_tags({PARENT_TAG: self.study_run, tracking.STAGE_TAG: "trial", "kdd.worker_run": self.worker_run,
                         "optuna.study": trial.study.study_name, "optuna.trial_number": str(trial.number)})
        mlflow.log_params(values)
        trial.set_user_attr(STUDY_RUN_ATTR, run.info.run_id)
        try:
            value, test_acc = self.evaluate(trial, values, name)
        except optuna.TrialPruned as exc:
            self.finish("PRUNED", "KILLED", str(exc))
            raise
        except BaseException as exc:
            self.finish("FAIL", "FAILED", first_line(exc))
            raise
        trial.set_user_attr("test_acc", test_acc)
        mlflow.log_metrics({"val_acc": value, "test_acc": test_acc})
        self.finish("COMPLETE", "FINISHED", None)
        if self.cfg.multi_objective:
            return value, values["ipc"]
        return value

    @staticmethod
    def finish(state: str, status: str, reason: str | None) -> None:
        mlflow.set_tag("optuna.state", state)
        if reason:
            mlflow.set_tag(tracking.ERROR_TAG, reason[:5000])
        mlflow.end_run(status)

    def evaluate(self, trial: optuna.Trial, values: dict[str, float | int], name: str) -> tuple[float, float]:
        cfg = self.cfg
        runner = pipeline.Runner(self.experiment_id, self.env_manager, set(), cfg.override_map, backend=self.backend,
                                 poll_s=self.backend.poll_s)
        watch = Reporter(trial, enabled=not cfg.multi_objective)
        common = {**pipeline.stage_common(cfg, self.budget), "seed": cfg.seed}
        searched = by_stage(values)
        experts = self.experts[values["ipc"]]
        distill = runner("distill", {**common, **searched["distill"], "experts_run": experts}, f"{name}/distill",
                         watch=watch)
        context = arms.Context(cfg.teacher_model, cfg.student_model, values["ipc"], synthetic_run=distill,
                               eval_model=pipeline.distill_eval_model(distill))
        runs = pipeline.run_arms(runner, arms.with_needs([arms.TUNED]), context, common, searched,
                                 lambda arm: f"{name}/{arm}", watch)
        tuned, teacher = runs[arms.TUNED], runs[arms.ARMS[arms.TUNED].teacher]
        for key, run_id in (("experts", experts), ("distill", distill), ("teacher", teacher), (arms.TUNED, tuned)):
            trial.set_user_attr(f"{key}_run", run_id)
        got = MlflowClient().get_run(tuned).data.metrics
        if "val_acc" not in got:
            raise RuntimeError(f"{arms.TUNED} run {tuned} logged no val_acc")
        return got["val_acc"], got["test_acc"]


def experts_params(cfg: TuneConfig, budget: str) -> dict[int, dict[str, object]]:
    """The experts stage's parameters for every ipc the search space can draw: one set, unless (paper
    budget) the space spans published rows that whiten differently."""
    ipc = next(d for d in cfg.space if d.name == "ipc")
    return {n: {**pipeline.experts_params(cfg, budget, n), "seed": cfg.seed} for n in ipc.whole_values()}


def by_stage(values: dict[str, float | int]) -> dict[str, dict[str, float | int]]:
    """A trial's values grouped by the stage each sets."""
    grouped: dict[str, dict[str, float | int]] = {}
    for name, value in values.items():
        grouped.setdefault(TUNABLE[name][0], {})[name] = value
    return grouped


# --- the study run ------------------------------------------------------------------------------------------


def study_plots(study: optuna.Study, multi: bool) -> dict[str, object]:
    """The study's plotly figures that its trials allow (importances need two finished trials, ...)."""
    vis = optuna.visualization
    target = {"target": (lambda t: t.values[0]), "target_name": "val_acc"} if multi else {"target_name": "val_acc"}
    makers = {
        "optimization_history": lambda: vis.plot_optimization_history(study, **target),
        "param_importances": lambda: vis.plot_param_importances(study, **target),
        "parallel_coordinate": lambda: vis.plot_parallel_coordinate(study, **target),
        "contour": lambda: vis.plot_contour(study, **target),
        "intermediate_values": lambda: vis.plot_intermediate_values(study),
    }
    if multi:
        makers["pareto_front"] = lambda: vis.plot_pareto_front(study, target_names=["val_acc", "ipc"])
        del makers["intermediate_values"]
    figures = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, make in makers.items():
            try:
                figures[name] = make()
            except (ValueError, RuntimeError, ZeroDivisionError) as exc:
                log.info("plot %s skipped: %s", name, exc)
    return figures


def summarise(study: optuna.Study, study_run: str, multi: bool) -> None:
    """Plots (self-contained HTML), the trials table, best parameters as tags, on the study run."""
    client = MlflowClient()
    # every worker summarises the shared study run when it stops: two may write the same tag at once

    def write(method, *args):
        tracking.retry_concurrent(getattr(client, method), study_run, *args)

    trials = study.get_trials(deepcopy=False)
    states = {s.name: sum(1 for t in trials if t.state == s) for s in optuna.trial.TrialState}
    for state, n in states.items():
        write("log_metric", f"trials_{state.lower()}", n)
    with tempfile.TemporaryDirectory() as tmp:
        for name, fig in study_plots(study, multi).items():
            report.write_html(fig, Path(tmp) / f"{name}.html")
        if trials:
            study.trials_dataframe().to_csv(Path(tmp) / "trials.csv", index=False)
        write("log_artifacts", tmp, "study")
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return
    if multi:
        front = study.best_trials
        write("set_tag", "best.pareto_trials", ",".join(str(t.number) for t in front))
        return
    best = study.best_trial
    write("log_metric", "best_value", best.value)
    write("set_tag", "best.trial", str(best.number))
    for k, v in best.params.items():
        write("set_tag", f"best.{k}", str(v))
    if "test_acc" in best.user_attrs:
        write("log_metric", "best_trial_test_acc", best.user_attrs["test_acc"])


def join_study(cfg: TuneConfig, storage, study_name: str, my_run: str) -> tuple[optuna.Study, str, bool]:
    """Create or load the study; return it, its MLflow study run, and whether this worker created it."""
    existed = study_name in optuna.study.get_all_study_names(storage)
    if existed and not cfg.load_if_exists:
        raise ValueError(f"study {study_name!r} exists in {tracking.redact(cfg.storage)}; "
                         "pass --load-if-exists true to join it or choose another --study-name")
    seed = cfg.seed if not existed else cfg.seed + 1 + os.getpid() % 100_000  # joiners must not copy the creator
    directions = ["maximize", "minimize"] if cfg.multi_objective else [cfg.direction]
    study = optuna.create_study(storage=storage, study_name=study_name, directions=directions,
                                sampler=make_sampler(cfg, seed), pruner=make_pruner(cfg), load_if_exists=True)
    held = [d.name.lower() for d in study.directions]
    if held != directions:
        raise ValueError(f"study {study_name!r} has directions {held}, not {directions}")
    study_run = study.user_attrs.get(STUDY_RUN_ATTR)
    if study_run:
        try:
            MlflowClient().get_run(study_run)
        except Exception:
            study_run = None  # another tracking store: this worker's run becomes the study run here
    if not study_run:
        study.set_user_attr(STUDY_RUN_ATTR, my_run)
        study_run = my_run
    for name in TUNABLE:
        study.set_user_attr(f"space.{name}", getattr(cfg, name))
    return study, study_run, not existed


def run(cfg: TuneConfig) -> str:
    """Run (or join) the study; return this worker's MLflow run id (with ``workers``: start that many
    workers on the backend, wait for them, and return the study run's id)."""
    if cfg.workers and tracking.redact(cfg.storage) != cfg.storage:  # on every worker's command line and job script
        raise ValueError(f"--workers passes --storage to each worker: give the database password through PGPASSWORD "
                         f"or ~/.pgpass, not in {tracking.redact(cfg.storage)}")
    _, resolved, backend = pipeline.prepare(cfg)  # before any study or run
    budget = resolved.budget
    study_name = cfg.study_name or f"kdd-{cfg.dataset}-{budget}"
    storage = open_storage(cfg.storage, cfg.heartbeat)
    if cfg.workers:
        return start_workers(cfg, backend, study_name, storage)
    with tracking.stage_run("tune", cfg, run_name=f"tune-{study_name}", experiment=study_name) as mine:
        my_run = mine.info.run_id
        with storage_lock(cfg.storage, study_name):
            study, study_run, created = join_study(cfg, storage, study_name, my_run)
        role = "study" if study_run == my_run else "worker"
        mlflow.set_tags({"optuna.study": study_name, "optuna.storage": tracking.redact(cfg.storage),
                         "kdd.role": role})
        budgets.log_resolved(resolved)
        if role == "worker":
            mlflow.set_tag(PARENT_TAG, study_run)
        log.info("%s study %r in %s (%s run %s)", "created" if created else "joined", study_name,
                 tracking.redact(cfg.storage), role, study_run)
        env_manager = pipeline.resolve_env_manager(cfg.env_manager)
        # Trials share experts runs, one per distinct set of experts parameters (usually one for the whole
        # study); workers starting together wait for the first to train them.
        with storage_lock(cfg.storage, f"{study_name}.experts", timeout=-1):
            runner = pipeline.Runner(mine.info.experiment_id, env_manager, set(), cfg.override_map, backend=backend,
                                     poll_s=backend.poll_s)
            runs: dict[tuple, str] = {}
            experts = {}
            for ipc, params in experts_params(cfg, budget).items():
                key = tuple(params.items())
                if key not in runs:
                    runs[key] = runner("experts", params, "experts")
                experts[ipc] = runs[key]
        objective = Objective(resolved, study_run, my_run, mine.info.experiment_id, env_manager, experts, backend)
        ran = work(study, objective, cfg.n_trials, cfg.timeout, lambda: storage_lock(cfg.storage, study_name),
                   catch=(Exception,))
        mlflow.log_metric("trials_run_here", ran)
        summarise(study, study_run, cfg.multi_objective)
        log.info("this worker ran %d trial(s); the study holds %d", ran, len(study.trials))
        return my_run


def start_workers(cfg: TuneConfig, backend: backends.Backend, study_name: str, storage) -> str:
    """``workers`` runs of the tune entry point on ``backend``, each a worker of the study that runs its trials'
    stages where it runs (the local backend inside its job); wait for all and return the study run's id."""
    if not backend.local and (cfg.storage.startswith("sqlite:") or is_journal(cfg.storage)):
        log.warning("workers on %s share %s: every node must see that file (a PostgreSQL or MySQL storage is "
                    "what many nodes share safely)", backend.name, tracking.redact(cfg.storage))
    log.info("starting %d tuning worker(s) of study %r on the %s backend", cfg.workers, study_name,
             backend.describe())
    workers = {f"tune-{study_name}-worker{i}": {"study_name": study_name} for i in range(cfg.workers)}
    ran = backends.start_copies(cfg, "tune", "--workers", backend, workers, study_name,
                                pipeline.resolve_env_manager(cfg.env_manager))
    study = optuna.load_study(study_name=study_name, storage=storage)
    log.info("%d worker run(s) finished: %s", len(ran), ", ".join(ran.values()))
    return study.user_attrs.get(STUDY_RUN_ATTR, next(iter(ran.values())))
