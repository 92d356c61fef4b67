"""Configuration: one pydantic model per stage.

Every field is a command-line option of the stage and an MLproject parameter; the resolved model is
logged as params and config.json. Invalid values fail here, before any work, with a one-line reason.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdd_mlflow import data, models
from kdd_mlflow.arms import ARMS
from kdd_mlflow.search_space import TUNABLE, Dimension, parse_dimension


class CommonConfig(BaseModel):
    """Fields every command shares."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    dataset: str = Field("fashion-mnist", description="mnist, fashion-mnist, cifar10 or cifar100")
    data_dir: str | None = Field(None, description="directory searched first for the dataset's files")
    device: str = Field("auto", description="auto (cuda, then mps, then cpu), or a torch device name")
    val_size: int = Field(5000, ge=10, description="training images held out for validation")
    train_limit: int | None = Field(
        None, ge=10, description="use only this many training images (evenly per class); for quick checks"
    )

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        data.info(v)
        return v

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        if v != "auto" and v.split(":")[0] not in {"cpu", "cuda", "mps"}:
            raise ValueError(f"unknown device {v!r}; use auto, cpu, cuda, cuda:N or mps")
        return v


class StageConfig(CommonConfig):
    """Fields every stage shares."""

    seed: int = Field(0, ge=0, description="seed for every random draw of the run")


Precision = Literal["fp32", "bf16"]
Backend = Literal["local", "slurm", "kubernetes"]


# Fields of a command that starts runs of its own entry point (experts --shards, tune --workers): options of
# the command only, not MLproject parameters (a run started by ``mlflow run`` does not start its siblings).
COMMAND_ONLY = {"command_only": True}


def command_only(field_info: dict) -> bool:
    return bool(field_info.json_schema_extra and field_info.json_schema_extra.get("command_only"))


def backend_field(**extra) -> Backend:
    return Field("local", description="where stage runs execute: local (processes here), slurm (a batch job each), "
                                      "kubernetes (a Job each); see README, Scale out", **extra)


def backend_config_field(**extra) -> str | None:
    return Field(None, description="the backend's config, a JSON file (slurm: partition, time, gpus, ...; "
                                   "kubernetes: kube-job-template-path, repository-uri, kube-context)", **extra)


def precision_field() -> Precision:
    return Field("fp32", description="arithmetic of the training loops: fp32, or bf16 autocast (weights, SGD and "
                                     "MTT's unrolled steps stay float32; see README, Performance)")


class TrainingConfig(StageConfig):
    """Stages that train networks."""

    precision: Precision = precision_field()


class TrainConfig(TrainingConfig):
    """Supervised training of one model on real data (teachers and baselines)."""

    model: str = Field("convnet", description="registry name, e.g. convnet, convnet-w32, resnet18")
    epochs: int = Field(10, ge=1, description="passes over the training set")
    batch_size: int = Field(256, ge=1, description="images per SGD step")
    lr: float = Field(0.01, gt=0, description="initial learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="L2 weight decay")
    schedule: Literal["cosine", "step", "constant"] = Field(
        "cosine", description="learning-rate schedule: cosine to zero, halve at half-time (step), constant"
    )
    augment: Literal["none", "dsa"] = Field("none", description="training augmentation")

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        return models.check_name(v)


def one_line(error: ValidationError) -> str:
    """A pydantic error as one line: ``field: reason; field: reason``."""
    parts = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown parameter"
        elif e["type"] == "missing":
            msg = "required, and not given"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


Budget = Literal["auto", "quick", "long", "paper"]
BUDGET_HELP = ("quick (CPU minutes: the main job in 10), long (CPU: longer experts and twice the iterations, a better "
               "set for 12-18 minutes of experts + distill on 2 cores), paper (published settings), auto (paper on a "
               "GPU, else quick)")


def parse_shard(shard: str | None, num_experts: int) -> list[int]:
    """Expert indices of a shard: ``i/n`` (every n-th from i), ``a:b`` (a range), or all."""
    if not shard:
        return list(range(num_experts))
    if "/" in shard:
        i, n = (int(v) for v in shard.split("/"))
        return list(range(i, num_experts, n))
    a, b = (int(v) for v in shard.split(":"))
    return list(range(a, min(b, num_experts)))


class ExpertsConfig(TrainingConfig):
    """Expert trajectories for MTT: N networks trained on real data, parameters saved every epoch.

    Unset values come from the budget (quick or paper) and are logged as ``budget.*`` params.
    """

    budget: Budget = Field("auto", description=BUDGET_HELP)
    model: str | None = Field(None, description="expert architecture (quick: convnet-w32, paper: convnet)")
    num_experts: int | None = Field(None, ge=1, description="experts to train (quick: 3, paper: 100)")
    epochs: int | None = Field(None, ge=1, description="epochs per expert (quick: 6, paper: 50)")
    lr_teacher: float | None = Field(None, gt=0, description="expert SGD learning rate (paper 0.01; quick and long: "
                                    "0.1 on grayscale sets, 0.01 on natural images)")
    batch_size: int = Field(256, ge=1, description="expert mini-batch size")
    momentum: float = Field(0.0, ge=0, lt=1, description="expert SGD momentum (0, as the reference)")
    weight_decay: float = Field(0.0, ge=0, description="expert weight decay (0, as the reference)")
    augment: Literal["none", "dsa"] = Field("dsa", description="augmentation on every expert batch")
    zca: bool | None = Field(None, description="ZCA-whiten the data (paper: CIFAR as published; quick: no)")
    shard: str | None = Field(None, description="this process's experts: i/n (every n-th from i) or a:b (range)")
    run_id: str | None = Field(None, description="continue this experts run: train only its missing experts")
    shards: int | None = Field(None, ge=1, le=10_000, json_schema_extra=COMMAND_ONLY,
                               description="start this many shard runs (i/N) on --backend and wait; prints their "
                                           "run ids, one buffer for distill")
    backend: Backend = backend_field(json_schema_extra=COMMAND_ONLY)
    backend_config: str | None = backend_config_field(json_schema_extra=COMMAND_ONLY)

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str | None) -> str | None:
        return None if v is None else models.check_name(v)

    @field_validator("shard")
    @classmethod
    def _shard_format(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            if "/" in v:
                i, n = (int(p) for p in v.split("/"))
                ok = 0 <= i < n
            else:
                a, b = (int(p) for p in v.split(":"))
                ok = 0 <= a < b
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"shard {v!r} must be i/n with 0 <= i < n, or a:b with 0 <= a < b")
        return v

    @model_validator(mode="after")
    def _fan_out(self) -> ExpertsConfig:
        if self.shards is not None and (self.shard is not None or self.run_id is not None):
            raise ValueError("--shards starts shard runs of its own; it does not combine with --shard or --run-id")
        if self.shards is None and (self.backend != "local" or self.backend_config):
            raise ValueError("--backend runs shards elsewhere: give --shards N too")
        return self


class DistillConfig(TrainingConfig):
    """MTT distillation of a synthetic set from one or more experts runs.

    Unset values come from the budget (the published table for CIFAR at ipc 1/10/50) and are logged
    as ``budget.*`` params.
    """

    experts_run: str = Field(description="experts run id(s), comma-separated (required)")
    budget: Budget = Field("auto", description=BUDGET_HELP)
    recipe: Literal["mtt", "datm"] = Field(
        "mtt", description="whose published settings the paper budget fills in: mtt (Cazenavette et al. 2022) or datm "
                           "(Guo et al. 2024: difficulty-aligned window, learned soft labels; CIFAR-10/100 only)")
    ipc: int = Field(10, ge=1, description="synthetic images per class")
    iterations: int | None = Field(None, ge=0, description="distillation iterations (paper: 5000, datm: 10000)")
    syn_steps: int | None = Field(None, ge=1, description="student SGD steps unrolled on the synthetic set")
    expert_epochs: int | None = Field(None, ge=1, description="expert epochs the student must cover")
    max_start_epoch: int | None = Field(None, ge=1, description="start epoch drawn uniformly in [min_start_epoch, "
                                                               "this)")
    min_start_epoch: int | None = Field(None, ge=0, description="the earliest start epoch (default 0)")
    window_start: int | None = Field(
        None, ge=1, description="difficulty-aligned window (DATM): the start epochs' upper bound begins here and grows "
                                "linearly to max_start_epoch by window_iterations (default: no window, the bound is "
                                "max_start_epoch throughout)")
    window_iterations: int | None = Field(None, ge=1, description="iterations over which the window's upper bound "
                                                                  "grows (default: all of them)")
    lr_img: float | None = Field(None, gt=0, description="learning rate of the synthetic pixels")
    lr_lr: float | None = Field(None, gt=0, description="learning rate of the learnable step size")
    lr_teacher: float | None = Field(None, gt=0, description="initial synthetic step size")
    batch_syn: int | None = Field(None, ge=1, description="synthetic mini-batch per unrolled step (default all)")
    init: Literal["real", "noise"] = Field("real", description="initialise from random real images or noise")
    eval_every: int | None = Field(None, ge=1, description="evaluate (validation) every this many iterations")
    num_eval: int | None = Field(None, ge=1, description="fresh networks per evaluation (K)")
    eval_epochs: int | None = Field(None, ge=1, description="epochs each evaluation network trains on the set")
    eval_model: str | None = Field(None, description="evaluation architecture (default: the experts' model)")
    matching: Literal["unrolled", "recompute", "first-order"] = Field(
        "unrolled", description="gradient of the matching loss: unrolled (autograd through every step), "
                                "recompute (the same, exactly, in one step's memory), first-order (TESLA)")
    labels: Literal["hard", "soft", "learned"] | None = Field(
        None, description="synthetic labels (default hard; learned under recipe datm): hard (the class), soft (an "
                          "expert's logits on the initial images, drawn among those it classifies correctly), learned "
                          "(soft, then learned by the matching loss; DATM)")
    lr_label: float | None = Field(None, gt=0, description="learning rate of learned labels (SGD, momentum 0.9; "
                                                           "default 2)")
    engine: Literal["eager", "compiled"] = Field(
        "eager", description="inner-step derivatives: eager (autograd) or compiled (torch.func under torch.compile: "
                             "fused kernels, compiles once per shape; README, Performance)")
    checkpoint_every: int | None = Field(None, ge=1, description="checkpoint every this many iterations")
    resume: str | None = Field(None, description="distill run id to resume from its last checkpoint")

    @field_validator("experts_run")
    @classmethod
    def _has_runs(cls, v: str) -> str:
        ids = [r.strip() for r in v.split(",") if r.strip()]
        if not ids:
            raise ValueError("give the experts run id(s) to distil from (--experts-run ID[,ID...])")
        return ",".join(ids)

    @field_validator("eval_model")
    @classmethod
    def _known_model(cls, v: str | None) -> str | None:
        return None if v is None else models.check_name(v)

    @model_validator(mode="after")
    def _window_is_ordered(self) -> DistillConfig:
        top, low = self.max_start_epoch, self.min_start_epoch or 0
        if top is not None and low >= top:
            raise ValueError(f"min_start_epoch {low} must be below max_start_epoch {top}")
        if self.window_start is not None and (self.window_start <= low
                                              or (top is not None and self.window_start > top)):
            raise ValueError(f"window_start {self.window_start} must lie in (min_start_epoch, max_start_epoch]")
        return self

    @model_validator(mode="after")
    def _soft_labels_need_real_images(self) -> DistillConfig:
        if self.labels not in (None, "hard") and self.init != "real":
            raise ValueError(f"labels '{self.labels}' come from an expert's logits on real images; use init 'real'")
        return self

    @model_validator(mode="after")
    def _engine_fits_matching(self) -> DistillConfig:
        if self.engine == "compiled" and self.matching == "unrolled":
            raise ValueError("engine 'compiled' serves matching 'recompute' and 'first-order' (the same gradients as "
                             "unrolled); the unrolled loop runs eager")
        return self

    @property
    def experts_runs(self) -> list[str]:
        return self.experts_run.split(",")


class SGDStageConfig(TrainingConfig):
    """Stages that train one network with SGD; unset values come from the budget and the training set
    (the full real data, or a small set: synthetic or a random subset)."""

    budget: Budget = Field("auto", description=BUDGET_HELP)
    epochs: int | None = Field(None, ge=1, description="epochs (real: quick 3 / paper 100; small sets: 200 / 1000)")
    batch_size: int = Field(256, ge=1, description="images per SGD step")
    lr: float | None = Field(
        None, gt=0, description="learning rate (real: 0.05; synthetic: the learned step size; subset: 0.01)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="L2 weight decay")
    schedule: Literal["cosine", "step", "constant"] | None = Field(
        None, description="learning-rate schedule (real: cosine; small sets: step, x0.1 at half-time)")


class TeacherConfig(SGDStageConfig):
    """The bigger model, trained on real data or on a distill run's synthetic set.

    Unset values depend on the budget and the source: on a synthetic set, DSA, the learned step size
    and the MTT evaluation schedule (x0.1 at half-time) for many epochs; on real data, cosine SGD.
    """

    model: str | None = Field(None, description="teacher architecture (quick: convnet-w32, paper: resnet18)")
    synthetic_run: str | None = Field(None, description="distill run id: train on its synthetic set, not real data")
    ipc: int | None = Field(None, ge=1, description="train on a random real subset of ipc images per class instead")
    space_run: str | None = Field(None, description="experts, distill or model run whose input space (its ZCA "
                                                    "whitening) the data is mapped into; a synthetic set must agree")
    augment: Literal["none", "dsa"] | None = Field(None, description="augmentation (real: none; synthetic: dsa)")

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str | None) -> str | None:
        return None if v is None else models.check_name(v)

    def model_post_init(self, _context) -> None:
        if self.synthetic_run and self.ipc:
            raise ValueError("give synthetic_run or ipc (a random real subset), not both")

    @property
    def source(self) -> str:
        return "synthetic" if self.synthetic_run else "subset" if self.ipc else "real"


class KDConfig(SGDStageConfig):
    """A small student distilled from a teacher run on a transfer set (real data, a synthetic set, or a
    random real subset). ``alpha`` weighs the distillation term, ``1 - alpha`` the hard-label loss."""

    teacher_run: str = Field(description="teacher run id (a teacher or train run) (required)")
    student: str | None = Field(None, description="student architecture (quick: convnet-w16, paper: convnet-w32)")
    transfer: Literal["real", "synthetic", "subset"] = Field(
        "real", description="transfer set: real training data, a distill run's synthetic set, or a random subset")
    synthetic_run: str | None = Field(None, description="distill run id (transfer=synthetic)")
    ipc: int | None = Field(None, ge=1, description="images per class of the random subset (transfer=subset)")
    loss: Literal["hinton", "mse", "hint"] = Field(
        "hinton", description="Hinton KD, logit MSE, or Hinton + FitNets hint")
    temperature: float = Field(2.0, gt=0, description="softmax temperature T of the Hinton term")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation term; 1 - alpha on hard labels")
    beta: float = Field(1.0, ge=0, description="weight of the feature-hint term (loss=hint)")
    hint_student_layer: str | None = Field(None, description="student layer for the hint (default: its last block)")
    hint_teacher_layer: str | None = Field(None, description="teacher layer for the hint (default: its last block)")
    augment: Literal["none", "dsa", "mixup"] | None = Field(
        None, description="transfer-set augmentation, labelled online by the teacher (real: none; small sets: dsa, "
                     "or mixup when the teacher was trained on that same set)")
    init_from_teacher: bool = Field(
        False, description="start the student from the teacher's weights where shapes match")

    @field_validator("student")
    @classmethod
    def _known_model(cls, v: str | None) -> str | None:
        return None if v is None else models.check_name(v)

    def model_post_init(self, _context) -> None:
        if self.transfer == "synthetic" and not self.synthetic_run:
            raise ValueError("transfer=synthetic needs synthetic_run (a distill run id)")
        if self.transfer == "subset" and not self.ipc:
            raise ValueError("transfer=subset needs ipc (images per class)")


# The stages a pipeline runs, by entry-point name.
STAGE_CONFIGS: dict[str, type[BaseModel]] = {
    "experts": ExpertsConfig, "distill": DistillConfig, "teacher": TeacherConfig, "kd": KDConfig,
}


class EvaluateConfig(StageConfig):
    """Every metric of several model runs on the test set, side by side, with fidelity to a reference."""

    runs: str = Field(description="model run ids (train, teacher or kd runs), comma-separated (required)")
    reference: str | None = Field(None, description="reference (teacher) run id for agreement and KL")

    @property
    def run_ids(self) -> list[str]:
        return [r.strip() for r in self.runs.split(",") if r.strip()]


class PipelineConfig(CommonConfig):
    """Commands that run stages as child runs (combined, tune): the models, stage overrides, and the
    environment manager of the stage runs."""

    dataset: str = Field("mnist", description="mnist, fashion-mnist, cifar10 or cifar100")
    budget: Budget = Field("auto", description=BUDGET_HELP)
    teacher_model: str | None = Field(None, description="teacher architecture (default: the budget's)")
    student_model: str | None = Field(None, description="student architecture (default: the budget's)")
    overrides: str = Field("", description="stage or arm parameters, e.g. distill.iterations=500,teacher-full.epochs=5")
    env_manager: str = Field("auto", description="environment manager of the stage runs (auto: the parent's)")
    precision: Precision = precision_field()
    backend: Backend = backend_field()
    backend_config: str | None = backend_config_field()

    @field_validator("teacher_model", "student_model")
    @classmethod
    def _known_model(cls, v: str | None) -> str | None:
        return None if v is None else models.check_name(v)

    @field_validator("env_manager")
    @classmethod
    def _env_manager(cls, v: str) -> str:
        if v not in ("auto", "local", "virtualenv", "uv", "conda"):
            raise ValueError(f"env_manager {v!r} must be auto, local, virtualenv, uv or conda")
        return v

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, v: str) -> str:
        parse_overrides(v)
        return v

    @property
    def override_map(self) -> dict[str, dict[str, str]]:
        return parse_overrides(self.overrides)


class CombinedConfig(PipelineConfig):
    """The whole study as one parent run: experts -> distill -> every arm as a child run -> comparison."""

    ipc: int = Field(10, ge=1, description="synthetic images per class (and size of the random real subset)")
    seeds: str = Field("0", description="comma-separated seeds; every model arm is trained once per seed")
    arms: str = Field("all", description=f"comma-separated arms, or all: {', '.join(ARMS)}")
    temperature: float = Field(2.0, gt=0, description="KD temperature T")
    alpha: float = Field(0.5, ge=0, le=1, description="KD weight of the distillation term (1 - alpha on hard labels)")
    force: str = Field("", description="re-run instead of reusing finished stages: all, or stage names (experts,...)")
    jobs: int | None = Field(None, ge=1, le=1024, description="stage runs at a time, the CPU cores divided among them "
                             "(default on the local backend: experts and distill alone on every core, then the arms "
                             "two at a time on half the cores each; every ready stage on slurm or kubernetes)")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: str) -> str:
        try:
            seeds = [int(s) for s in v.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"seeds {v!r} must be comma-separated non-negative integers") from None
        if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds {v!r} must be distinct non-negative integers")
        return ",".join(str(s) for s in seeds)

    @field_validator("arms")
    @classmethod
    def _arms(cls, v: str) -> str:
        names = [a.strip() for a in v.split(",") if a.strip()]
        if names == ["all"]:
            return "all"
        unknown = [a for a in names if a not in ARMS]
        if unknown or not names:
            raise ValueError(f"unknown arm(s) {unknown}; choose from all, {', '.join(ARMS)}")
        return ",".join(names)

    @field_validator("force")
    @classmethod
    def _force(cls, v: str) -> str:
        names = list(dict.fromkeys(a.strip() for a in v.split(",") if a.strip()))  # as given: `mlflow run` logs it so
        unknown = sorted(set(names) - {"all", "experts", "distill", "teacher", "kd"})
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; use all, or some of experts, distill, teacher, kd")
        return ",".join(names)

    @property
    def seed_list(self) -> list[int]:
        return [int(s) for s in self.seeds.split(",")]

    @property
    def arm_list(self) -> list[str]:
        return list(ARMS) if self.arms == "all" else self.arms.split(",")


def parse_overrides(text: str) -> dict[str, dict[str, str]]:
    """``stage.param=value`` or ``arm.param=value`` pairs, comma-separated, checked against the stage configs
    (an arm's against its stage's)."""
    from pydantic import TypeAdapter

    out: dict[str, dict[str, str]] = {}
    for item in (i.strip() for i in text.split(",") if i.strip()):
        target, _, rest = item.partition(".")
        name, eq, value = rest.partition("=")
        stage = target if target in STAGE_CONFIGS else ARMS[target].stage if target in ARMS else None
        if not eq or stage is None:
            raise ValueError(f"override {item!r} must be STAGE.PARAM=VALUE or ARM.PARAM=VALUE "
                             f"(stages: {', '.join(STAGE_CONFIGS)}; arms: {', '.join(ARMS)})")
        fields = STAGE_CONFIGS[stage].model_fields
        if name not in fields or name in {"dataset", "seed", "budget"}:
            raise ValueError(f"override {item!r}: {stage} has no parameter {name!r} that the pipeline lets you set")
        try:
            TypeAdapter(fields[name].annotation).validate_python(value)
        except ValidationError as exc:
            raise ValueError(f"override {item!r}: {exc.errors()[0]['msg']}") from None
        out.setdefault(target, {})[name] = value
    return out


class TuneConfig(PipelineConfig):
    """An Optuna study over the proposal arm (experts -> distill -> teacher on the synthetic set -> KD)."""

    study_name: str | None = Field(None, description="study name (default kdd-DATASET-BUDGET); workers sharing it "
                                                     "and the storage cooperate")
    storage: str = Field("sqlite:///optuna.db", description="Optuna storage: an RDB URL (sqlite:///FILE, "
                                                            "postgresql://...) or a journal file (FILE.log)")
    load_if_exists: bool = Field(True, description="join the study if it exists (false: refuse)")
    n_trials: int | None = Field(None, ge=1, description="trials in the whole study, over every worker")
    timeout: float | None = Field(None, gt=0, description="seconds after which this worker starts no new trial")
    sampler: Literal["tpe", "random", "nsgaii"] = Field("tpe", description="sampler (seeded by --seed)")
    pruner: Literal["median", "hyperband", "none"] = Field("median", description="pruner of poor trials")
    prune_startup: int = Field(2, ge=0, description="trials finished before the median pruner prunes")
    direction: Literal["maximize", "minimize"] = Field("maximize", description="direction of validation accuracy")
    multi_objective: bool = Field(False, description="also minimise images per class (a Pareto front)")
    seed: int = Field(0, ge=0, description="seed of the sampler and of every stage run")
    lr_teacher: str = Field("1e-3:1e-1", description="initial synthetic step size: LOW:HIGH (log), A,B,C or V")
    lr_lr: str = Field("1e-6:1e-4", description="learning rate of the step size: LOW:HIGH (log), A,B,C or V")
    ipc: str = Field("1,10", description="images per class: A,B,C, LOW:HIGH (log, whole numbers) or V")
    temperature: str = Field("1:20", description="KD temperature: LOW:HIGH (log), A,B,C or V")
    alpha: str = Field("0.5", description="KD weight of the distillation term: V, A,B,C or LOW:HIGH")
    heartbeat: int = Field(60, ge=1, description="seconds between trial heartbeats (RDB storage); a trial silent for "
                                                 "2x this is failed, does not count, and another takes its place")
    workers: int | None = Field(None, ge=1, le=1024, json_schema_extra=COMMAND_ONLY,
                                description="start this many workers on --backend (each runs its trials' stages "
                                            "where it runs) and wait for them; default: this process works")

    @field_validator("lr_teacher", "lr_lr", "ipc", "temperature", "alpha")
    @classmethod
    def _dimension(cls, v: str, info) -> str:
        try:
            parse_dimension(info.field_name, v)
        except ValueError as exc:
            raise ValueError(str(exc).removeprefix(f"{info.field_name}: ")) from None
        return v

    @field_validator("overrides")
    @classmethod
    def _no_search_parameter(cls, v: str) -> str:
        parsed = parse_overrides(v)
        tuned = {f"{d[0]}.{n}" for n, d in TUNABLE.items()}
        clash = sorted(f"{stage}.{name}" for stage, values in parsed.items() for name in values
                       if f"{stage}.{name}" in tuned)
        if clash:
            raise ValueError(f"{', '.join(clash)} is a search parameter; set it with its own option")
        return v

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str) -> str:
        if "://" not in v and not v.endswith(".log"):
            raise ValueError(f"storage {v!r} must be an RDB URL (sqlite:///FILE, postgresql://...) or a FILE.log "
                             "journal")
        return v

    @model_validator(mode="after")
    def _stops(self) -> TuneConfig:
        if self.n_trials is None and self.timeout is None:
            raise ValueError("give --n-trials and/or --timeout; a study without either never ends")
        return self

    @property
    def space(self) -> list[Dimension]:
        return [parse_dimension(n, getattr(self, n)) for n in TUNABLE]
