"""The combined pipeline: every stage as an MLflow child run of one parent, then the comparison.

The arms, and what each needs, are the table in ``kdd_mlflow.arms``. Each stage runs through
``mlflow.projects.run`` (the stage's MLproject entry point, with the parent's environment manager), so
the pipeline hands work on only through run ids, exactly as a user running the stages one by one. A
stage whose parameters (compared as strings) and code version match a FINISHED run is reused instead
of re-run, unless ``force`` names it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import mlflow
import torch
from mlflow.tracking import MlflowClient

from kdd_mlflow import arms, backends, budgets, data, metrics, report, schedule, tracking
from kdd_mlflow.artifacts import find, synthetic
from kdd_mlflow.artifacts import model as model_artifact
from kdd_mlflow.backends import Backend, StageFailed, StageRun, failure_reason, project_dir
from kdd_mlflow.config import STAGE_CONFIGS, CombinedConfig, PipelineConfig
from kdd_mlflow.runtime import environment, first_line, pick_device

log = logging.getLogger(__name__)

ARM_TAG = "kdd.arm"
Watch = Callable[[str], None]


def full_params(stage: str, params: dict[str, object]) -> dict[str, str]:
    """Every parameter of the stage's entry point as a string, defaults filled in (control fields left out)."""
    out = {}
    for name, f in STAGE_CONFIGS[stage].model_fields.items():
        if name in tracking.CONTROL_FIELDS:
            continue
        value = params.get(name, None if f.is_required() else f.default)
        out[name] = "" if value is None else str(value)
    return out


def find_finished(stage: str, params: dict[str, str], experiment_id: str) -> str | None:
    """The newest FINISHED run of ``stage`` with these parameters and this code version."""
    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=(f"tags.`{tracking.STAGE_TAG}` = '{stage}' and attributes.status = 'FINISHED' "
                       f"and tags.`{tracking.CODE_TAG}` = '{tracking.code_version()}'"),
        order_by=["attributes.start_time DESC"], max_results=200,
    )
    for run in runs:
        logged = run.data.params
        if all(k in logged and tracking.same_value(logged[k], v) for k, v in params.items()):
            return run.info.run_id
    return None


@dataclass
class Runner:
    """Runs (or reuses) stage runs as children of the active parent run."""

    experiment_id: str
    env_manager: str
    force: set[str]
    overrides: dict[str, dict[str, str]] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    poll_s: float = 2.0
    backend: Backend = field(default_factory=Backend)  # where started stages run
    launched: dict[tuple, StageRun] = field(default_factory=dict)  # the runs this runner started

    def merged(self, stage: str, params: dict[str, object], arm: str | None = None) -> dict[str, object]:
        """``params`` with the user's overrides for the stage and then for the arm on top."""
        return {**params, **self.overrides.get(stage, {}), **self.overrides.get(arm or stage, {})}

    def start(self, stage: str, params: dict[str, object], name: str, arm: str | None = None,
              env: dict[str, str] | None = None):
        """A FINISHED ``stage`` run with these parameters (its run id), or a run started asynchronously (its
        ``mlflow.projects.SubmittedRun``, tagged with its arm). ``env`` is set for the stage's process."""
        full = full_params(stage, self.merged(stage, params, arm))
        same = (stage, tuple(sorted(full.items())))
        leader = self.launched.get(same)
        if leader is not None:  # two tasks of this pipeline that are one run (the same stage and parameters)
            status = leader.get_status()
            if status in ("RUNNING", "SCHEDULED"):
                log.info("%s: the same run as %s, already going", name, leader.run_id)
                return Follower(leader)
            if status == "FINISHED":
                log.info("%s: the same run as %s, finished", name, leader.run_id)
                return leader.run_id
        if not ({"all", stage} & self.force):
            found = find_finished(stage, full, self.experiment_id)
            if found:
                log.info("%s: reusing finished run %s", name, found)
                self.reused.append(found)
                return found
        log.info("%s: starting stage %s", name, stage)
        try:
            with environment(env):
                submitted = self.backend.submit(stage, full, self.experiment_id, name, self.env_manager)
        except mlflow.projects.ExecutionException as exc:
            raise StageFailed(f"stage {name} could not start: {first_line(exc)}") from None
        if arm:
            MlflowClient().set_tag(submitted.run_id, ARM_TAG, arm)
        self.started.append(submitted.run_id)
        self.launched[same] = StageRun(submitted)
        return self.launched[same]

    def __call__(self, stage: str, params: dict[str, object], name: str, arm: str | None = None,
                 watch: Watch | None = None) -> str:
        """The run id of a FINISHED ``stage`` run with these parameters: found, or started and waited for.

        ``watch(run_id)`` is called every ``poll_s`` while a started stage runs and once when it ends (or
        once for a reused run); if it raises, a running stage is cancelled and the exception propagates.
        """
        got = self.start(stage, params, name, arm)
        if isinstance(got, str):
            if watch:
                watch(got)
            return got
        try:
            wait_watching(got, watch or (lambda run_id: None), self.poll_s)
        except StageFailed as exc:
            raise StageFailed(f"stage {name} failed: {exc}") from None
        return got.run_id


class Follower:
    """A task whose stage run is the same as an earlier task's (same stage, same parameters): it ends when that
    run ends, and cancelling it leaves that run to its own task."""

    def __init__(self, leader: StageRun):
        self.leader = leader

    @property
    def run_id(self) -> str:
        return self.leader.run_id

    def get_status(self) -> str:
        return self.leader.get_status()

    def cancel(self) -> None:
        pass


def wait_watching(run: StageRun, watch: Watch, poll_s: float) -> None:
    """Wait for a stage started asynchronously, calling ``watch`` while it runs; cancel it if ``watch`` raises
    (a pruned trial) or this process is interrupted. Raise ``StageFailed`` if it ends otherwise than
    FINISHED."""
    try:
        while (status := run.get_status()) in ("RUNNING", "SCHEDULED"):
            watch(run.run_id)
            time.sleep(poll_s)
        watch(run.run_id)
    except BaseException:
        run.cancel()
        raise
    if status != "FINISHED":
        raise StageFailed(failure_reason(run.run_id))


def prepare(cfg: PipelineConfig) -> tuple[torch.device, budgets.Resolved, Backend]:
    """What a command that runs stages checks before any run; returns the device, ``cfg`` resolved against
    its budget (which fills in the teacher and student architectures) and the backend the stages run on.

    The data must be there (fail at once otherwise), the MLproject file found and the backend usable (its
    config valid, its commands there); with the local environment manager, stages run ``python -m ...``,
    which must be this interpreter.
    """
    device = pick_device(cfg.device)
    resolved = budgets.resolve(cfg, device.type)
    data.resolve(cfg.dataset, cfg.data_dir)
    project_dir()
    backend = backends.load(cfg.backend, cfg.backend_config)
    if cfg.env_manager in ("auto", "local"):
        backends.use_this_interpreter()
    return device, resolved, backend


def resolve_env_manager(requested: str) -> str:
    """``auto``: whatever environment manager ran the parent (``mlflow run`` tags it), else local."""
    if requested != "auto":
        return requested
    active = mlflow.active_run()
    tag = mlflow.get_run(active.info.run_id).data.tags.get("mlflow.project.env") if active else None
    return tag if tag in ("virtualenv", "uv", "conda") else "local"


def stage_common(cfg: PipelineConfig, budget: str) -> dict[str, object]:
    """The parameters every stage run of a pipeline shares, the seed aside."""
    return {"dataset": cfg.dataset, "data_dir": cfg.data_dir, "device": cfg.device, "val_size": cfg.val_size,
            "train_limit": cfg.train_limit, "budget": budget, "precision": cfg.precision}


def experts_params(cfg: PipelineConfig, budget: str, ipc: int) -> dict[str, object]:
    """The experts stage's parameters for a synthetic set of ``ipc`` images per class (the seed aside), which the
    experts alone cannot know: under the paper budget, the ZCA flag of the published row (of the distill recipe the
    overrides ask for); under the CPU budgets, the learning rate for a one-image-per-class grayscale set."""
    recipe = cfg.override_map.get("distill", {}).get("recipe", "mtt")
    lr = budgets.experts_lr_for_ipc(budget, cfg.dataset, ipc)
    return {**stage_common(cfg, budget), "zca": budgets.experts_zca(budget, cfg.dataset, ipc, recipe),
            **({} if lr is None else {"lr_teacher": lr})}


def selected_with_needs(names: list[str]) -> list[str]:
    """The arms to train, in dependency order: the requested ones, what they need, and the reference."""
    return arms.with_needs([arms.REFERENCE, *names])


def run_arms(runner: Runner, names: list[str], context: arms.Context, common: dict[str, object],
             stage_params: dict[str, dict[str, object]], run_name: Callable[[str], str],
             watch: Watch | None = None) -> dict[str, str]:
    """Run (or reuse) each arm of ``names`` in order: its stage with ``common``, that stage's entry of
    ``stage_params`` and the arm's own parameters. Return (and keep in ``context.runs``) their run ids."""
    for name in names:
        arm = arms.ARMS[name]
        params = {**common, **stage_params.get(arm.stage, {}), **arm.params(context)}
        context.runs[name] = runner(arm.stage, params, run_name(name), name, watch=watch)
    return context.runs


def run(cfg: CombinedConfig) -> str:
    """Run the whole comparison; return the parent run id."""
    device, resolved, backend = prepare(cfg)
    with tracking.stage_run("combined", cfg, run_name=f"combined-{cfg.dataset}-ipc{cfg.ipc}") as parent:
        budgets.log_resolved(resolved)
        runner = Runner(parent.info.experiment_id, resolve_env_manager(cfg.env_manager),
                        {f for f in cfg.force.split(",") if f}, cfg.override_map, backend=backend,
                        poll_s=backend.poll_s)
        mlflow.set_tags({"kdd.env_manager": runner.env_manager, "kdd.backend": backend.name})
        common = stage_common(cfg, resolved.budget)
        selected = selected_with_needs(cfg.arm_list)
        started = time.perf_counter()

        jobs, chain, arm = shares(cfg.jobs, os.cpu_count() or 1) if backend.local else (cfg.jobs, Share(), Share())
        tasks = plan(cfg, runner, resolved, device, common, selected, chain, arm)
        log.info("%d stage runs to run or reuse on the %s backend: %s", len(tasks), backend.describe(),
                 f"{jobs} slot(s); the synthetic chain takes {chain.slots} with {chain.describe()}, an arm "
                 f"{arm.slots} with {arm.describe()}" if jobs else "every ready one at once")
        each = [str(share.threads or "default") for share in (chain, arm)]
        mlflow.set_tag("kdd.threads_per_stage", each[0] if chain == arm else f"chain {each[0]}, arms {each[1]}")
        try:
            done = schedule.run(tasks, jobs, poll_s=runner.poll_s)
        except schedule.TaskFailed as exc:
            raise StageFailed(f"stage {exc.key} failed: {failure_reason(exc.run_id)}") from None
        runs = {name: {seed: done[f"{name}/seed{seed}"] for seed in cfg.seed_list} for name in selected}
        synthetic_run = done.get("distill")

        mlflow.set_tags({"kdd.reused_runs": ",".join(runner.reused) or "-",
                         "kdd.started_runs": ",".join(runner.started) or "-"})
        if synthetic_run:
            mlflow.set_tag("kdd.distill_run", synthetic_run)
        rows = compare(cfg, runs, device)
        mlflow.log_metric("pipeline_wall_s", time.perf_counter() - started)
        report.log_comparison(rows, cfg)
        by_arm = {row["arm"]: row for row in rows}
        if {"student-full", "student-synthetic"} <= by_arm.keys():
            # DD-Ranking's hard-label recovery: what the set still lacks of the full data, one architecture, hard
            # labels on both sides (0: the set teaches what the full data does)
            mlflow.log_metric("hlr", by_arm["student-full"]["test_acc"] - by_arm["student-synthetic"]["test_acc"])
        return parent.info.run_id


@dataclass(frozen=True)
class Share:
    """How one stage run shares a machine with the others of its pipeline: the scheduler's slots it takes, and the
    threads its process may use (None: PyTorch's default, one per core)."""

    slots: int = 1
    threads: int | None = None

    @property
    def env(self) -> dict[str, str] | None:
        return None if self.threads is None else {"OMP_NUM_THREADS": str(self.threads),
                                                  "MKL_NUM_THREADS": str(self.threads)}

    def describe(self) -> str:
        return "every core's thread" if self.threads is None else f"{self.threads} thread(s)"


def shares(jobs: int | None, cores: int) -> tuple[int, Share, Share]:
    """The local backend's slots (one per core, or ``jobs``) and the shares of the synthetic chain (experts,
    distill) and of an arm.

    ``jobs`` given: that many stage runs at a time, ``cores / jobs`` threads each (one thread-less run alone).
    Unset: the chain, which every synthetic-set arm waits for, runs alone on every core; the arms then run two at
    a time on half the cores each. An arm's process spends seconds single-threaded (imports, data, logging) and
    trains small sets in batches too small for two threads to halve, so two arms side by side finish sooner than
    one after the other (README, "The combined pipeline": the figures).
    """
    if jobs:
        threads = max(1, cores // jobs)
        share = Share(1, threads if jobs > 1 else None)
        return jobs, share, share
    return cores, Share(cores, None), Share(max(1, cores // 2), max(1, cores // 2))


def plan(cfg: CombinedConfig, runner: Runner, resolved: budgets.Resolved, device: torch.device,
         common: dict[str, object], selected: list[str], chain: Share = Share(), arm_share: Share = Share()
         ) -> list[schedule.Task]:
    """The stage runs of a combined study as a dependency graph, from the arm table: experts -> distill ->
    the arms on the synthetic set; an arm taught by another after it; and when the experts whiten (ZCA), every
    arm after them, since it trains in their input space. Listed experts first, then the arms in table order
    per seed: the order runs start in when several are ready. The chain's tasks take ``chain``'s share of the
    machine, the arms' ``arm_share``."""
    tasks: list[schedule.Task] = []
    whitened = False
    if any(arms.ARMS[name].synthetic for name in selected):
        first = cfg.seed_list[0]  # one synthetic set; the arms on it vary by seed
        experts = {**experts_params(cfg, resolved.budget, cfg.ipc), "seed": first}
        whitened = experts_whiten(runner.merged("experts", experts), device)
        tasks.append(schedule.Task("experts", (), lambda done: runner.start("experts", experts, "experts",
                                                                            env=chain.env), chain.slots))

        def distill(done: dict[str, str]):
            if (find.input_space(done["experts"]).zca is not None) != whitened:  # the arms were ordered by it
                raise RuntimeError(f"experts run {done['experts']} is {'not ' if whitened else ''}ZCA-whitened, "
                                   f"but its parameters resolve to zca={whitened}")
            return runner.start("distill", {**common, "seed": first, "experts_run": done["experts"], "ipc": cfg.ipc},
                                "distill", env=chain.env)

        tasks.append(schedule.Task("distill", ("experts",), distill, chain.slots))
    stage_params = {"kd": {"temperature": cfg.temperature, "alpha": cfg.alpha}}

    def launch(name: str, seed: int, done: dict[str, str]):
        arm = arms.ARMS[name]
        context = arms.Context(resolved.cfg.teacher_model, resolved.cfg.student_model, cfg.ipc,
                               runs={need: done[f"{need}/seed{seed}"] for need in arm.needs})
        if arm.synthetic:
            context.synthetic_run = done["distill"]
            context.eval_model = distill_eval_model(done["distill"])
        params = {**common, "seed": seed, **stage_params.get(arm.stage, {}), **arm.params(context)}
        if whitened:
            # every arm trains in the experts' whitened space, so the full-data teacher can be distilled on the
            # synthetic set and fidelity compares models that saw the same inputs (kd arms take their teacher's)
            params["space_run"] = done["experts"]
        return runner.start(arm.stage, params, f"{name}/seed{seed}", name, env=arm_share.env)

    for seed in cfg.seed_list:
        for name in selected:
            arm = arms.ARMS[name]
            needs = tuple(f"{need}/seed{seed}" for need in arm.needs)
            needs += ("distill",) if arm.synthetic else ("experts",) if whitened else ()
            tasks.append(schedule.Task(f"{name}/seed{seed}", needs, partial(launch, name, seed), arm_share.slots))
    return tasks


def experts_whiten(params: dict[str, object], device: torch.device) -> bool:
    """Whether an experts run with these parameters whitens its inputs: what the stage itself will resolve."""
    fields = STAGE_CONFIGS["experts"].model_fields
    cfg = STAGE_CONFIGS["experts"](**{k: v for k, v in params.items() if k in fields and v is not None})
    return bool(budgets.resolve(cfg, device.type).cfg.zca)


def distill_eval_model(distill_run: str) -> str:
    """The network a distill run's set was distilled for."""
    return synthetic.spec(distill_run)["model"]


def compare(cfg: CombinedConfig, runs: dict[str, dict[int, str]], device) -> list[dict]:
    """One row per arm: accuracy (mean and std over seeds), fidelity to the full-data teacher, and costs."""
    real = data.load(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.train_limit)
    labels = real.test.labels.to(device)
    full_images = len(real.train)
    client = MlflowClient()
    expect = {"dataset": cfg.dataset}
    reference = {s: model_artifact.load(r, expect).test_logits(real.test.images, real.test.labels, device)
                 for s, r in runs[arms.REFERENCE].items()}
    rows = []
    for arm in (name for name in arms.ARMS if name == arms.REFERENCE or name in cfg.arm_list):
        per_seed = []
        for seed, run_id in runs[arm].items():
            trained = model_artifact.load(run_id, expect)
            logits = trained.test_logits(real.test.images, real.test.labels, device)
            run = client.get_run(run_id)
            per_seed.append({
                **metrics.classification(logits, labels), **metrics.fidelity(reference[seed], logits),
                "parameters": trained.parameters, "train_images": int(run.data.params.get("train_images", 0)),
                "wall_s": (run.info.end_time - run.info.start_time) / 1000, "model": trained.name,
            })
        accs = [r["acc"] for r in per_seed]
        mean = sum(accs) / len(accs)
        std = (sum((a - mean) ** 2 for a in accs) / len(accs)) ** 0.5
        first = per_seed[0]

        def avg(key, rows=per_seed):
            return sum(r[key] for r in rows) / len(rows)

        rows.append({
            "arm": arm, "model": first["model"], "test_acc": mean, "test_acc_std": std,
            "agreement": avg("agreement"), "kl": avg("kl"), "ece": avg("ece"), "nll": avg("nll"),
            "parameters": first["parameters"], "train_images": first["train_images"],
            "data_compression": full_images / max(first["train_images"], 1), "wall_s": avg("wall_s"),
            "seeds": len(per_seed), "runs": ",".join(runs[arm].values()),
        })
    return rows
