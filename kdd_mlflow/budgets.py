"""Budgets: the published settings (``paper``) and the CPU-sized ones (``quick``), and the one way a
config's unset fields are filled from them.

    resolved = budgets.resolve(cfg, device.type, **what_the_stage_knows)
    budgets.log_resolved(resolved)      # budget.resolved and budget.* params of the active run

``auto`` means paper on a GPU and quick elsewhere. A value given explicitly always wins; what the budget
filled in is logged, so every run says which settings it ran with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from pydantic import BaseModel

from kdd_mlflow import data, tracking
from kdd_mlflow.config import DistillConfig, ExpertsConfig, KDConfig, PipelineConfig, TeacherConfig

log = logging.getLogger(__name__)

# The published MTT settings (Cazenavette et al., CVPR 2022, supplementary table of hyper-parameters):
# (dataset, ipc) -> syn_steps, expert_epochs, max_start_epoch, lr_img, lr_lr, lr_teacher, batch_syn, zca.
# CIFAR-10 ipc 10 lists lr_img 1e5 there; its authors confirmed that is a typo (the reference repository's
# issue 31: it explodes), and 1e3 is what trains stably, so 1e3 is used.
PAPER_DISTILL: dict[tuple[str, int], dict] = {
    ("cifar10", 1): dict(syn_steps=50, expert_epochs=2, max_start_epoch=2, lr_img=1e3, lr_lr=1e-7,
                         lr_teacher=1e-2, batch_syn=None, zca=True),
    ("cifar10", 10): dict(syn_steps=30, expert_epochs=2, max_start_epoch=20, lr_img=1e3, lr_lr=1e-5,
                          lr_teacher=1e-2, batch_syn=None, zca=True),
    ("cifar10", 50): dict(syn_steps=30, expert_epochs=2, max_start_epoch=40, lr_img=1e2, lr_lr=1e-5,
                          lr_teacher=1e-2, batch_syn=None, zca=False),
    ("cifar100", 1): dict(syn_steps=20, expert_epochs=3, max_start_epoch=20, lr_img=1e3, lr_lr=1e-5,
                          lr_teacher=1e-2, batch_syn=None, zca=True),
    ("cifar100", 10): dict(syn_steps=20, expert_epochs=2, max_start_epoch=20, lr_img=1e3, lr_lr=1e-5,
                           lr_teacher=1e-2, batch_syn=None, zca=False),
    ("cifar100", 50): dict(syn_steps=80, expert_epochs=2, max_start_epoch=40, lr_img=1e3, lr_lr=1e-5,
                           lr_teacher=1e-2, batch_syn=125, zca=True),
}
# MNIST and Fashion-MNIST are not in the MTT paper: CIFAR-10's unrolling without ZCA, with a pixel
# learning rate for un-whitened [0,1]-normalised inputs.
for _name in ("mnist", "fashion-mnist"):
    PAPER_DISTILL[(_name, 1)] = dict(syn_steps=50, expert_epochs=2, max_start_epoch=2, lr_img=1e2, lr_lr=1e-7,
                                     lr_teacher=1e-2, batch_syn=None, zca=False)
    PAPER_DISTILL[(_name, 10)] = dict(syn_steps=30, expert_epochs=2, max_start_epoch=20, lr_img=1e2, lr_lr=1e-5,
                                      lr_teacher=1e-2, batch_syn=None, zca=False)
    PAPER_DISTILL[(_name, 50)] = dict(syn_steps=30, expert_epochs=2, max_start_epoch=40, lr_img=1e2, lr_lr=1e-5,
                                      lr_teacher=1e-2, batch_syn=None, zca=False)

PAPER_EXPERTS = dict(model="convnet", num_experts=100, epochs=50, lr_teacher=1e-2)
# What MTT fixes for every row: no window below the bound (start epochs from 0), hard labels.
MTT_MATCHING = dict(min_start_epoch=0, labels="hard", lr_label=2.0)
PAPER_RUN = dict(iterations=5000, eval_every=500, num_eval=5, eval_epochs=1000, checkpoint_every=100)

# The published DATM settings (Guo et al., ICLR 2024; the authors' configurations for the instance-norm ConvNet,
# configs/CIFAR-*/ConvIN/IPC*.yaml of their repository): (dataset, ipc) -> syn_steps, expert_epochs, the start-epoch
# window [min_start_epoch, bound) whose bound grows from window_start (their current_max_start_epoch) to
# max_start_epoch by iteration window_iterations (their expansion_end_epoch; a row without window_start keeps the
# bound at max_start_epoch: their Sequential_Generation off), pixel, step-size and label (their lr_y) learning
# rates, synthetic batch (None: all of it) and ZCA. Every row learns soft labels, for 10,000 iterations. The
# CIFAR-100 ipc 50 row starts at epoch 20 and reaches epoch 72, beyond the 50 epochs of the paper budget's experts:
# train them longer (kdd experts --epochs 72) to use it.
PAPER_DATM: dict[tuple[str, int], dict] = {
    ("cifar10", 1): dict(syn_steps=80, expert_epochs=2, min_start_epoch=0, max_start_epoch=4, lr_img=1e2,
                         lr_lr=1e-7, lr_teacher=1e-2, lr_label=5.0, batch_syn=None, zca=True),
    ("cifar10", 10): dict(syn_steps=80, expert_epochs=2, min_start_epoch=0, window_start=10, max_start_epoch=20,
                          window_iterations=1000, lr_img=1e2, lr_lr=1e-5, lr_teacher=1e-2, lr_label=2.0,
                          batch_syn=None, zca=True),
    ("cifar10", 50): dict(syn_steps=80, expert_epochs=2, min_start_epoch=0, window_start=20, max_start_epoch=40,
                          window_iterations=2000, lr_img=1e3, lr_lr=1e-5, lr_teacher=1e-2, lr_label=2.0,
                          batch_syn=None, zca=True),
    ("cifar100", 1): dict(syn_steps=40, expert_epochs=3, min_start_epoch=0, window_start=20, max_start_epoch=30,
                          window_iterations=3000, lr_img=1e3, lr_lr=1e-5, lr_teacher=1e-2, lr_label=2.0,
                          batch_syn=None, zca=True),
    ("cifar100", 10): dict(syn_steps=80, expert_epochs=2, min_start_epoch=0, window_start=30, max_start_epoch=50,
                           window_iterations=2000, lr_img=1e3, lr_lr=1e-5, lr_teacher=1e-2, lr_label=10.0,
                           batch_syn=None, zca=True),
    ("cifar100", 50): dict(syn_steps=80, expert_epochs=2, min_start_epoch=20, max_start_epoch=70, lr_img=1e3,
                           lr_lr=1e-5, lr_teacher=1e-2, lr_label=10.0, batch_syn=1000, zca=True),
}
DATM_RUN = dict(iterations=10000, labels="learned")

# Quick: 2 CPU cores, minutes. A narrow ConvNet (16x fewer multiply-adds than W128), few short experts on
# a subset, short unrolls.
QUICK_EXPERTS = dict(model="convnet-w32", num_experts=3, epochs=6, train_limit=10000, zca=False)
# Natural images (CIFAR) train their quick experts as the long budget does: 14 epochs at 0.01, whitened. The 6-epoch
# experts' 240 SGD steps ended at 0.37 test accuracy on CIFAR-10, barely above their own 100-image set; these reach
# 0.41-0.43, and over three seeds the quick set gained 11.9 points over (unwhitened) random real images at ipc 10 and
# 17.0 at ipc 1, against 8.6 and 11.4 from the 6-epoch experts with learned labels (README, "The quick budget's sets").
QUICK_BY_KIND = {"grayscale": {}, "natural": dict(epochs=14, zca=True)}
# The CPU budgets' expert learning rate, by kind of image. The quick experts' 240 SGD steps at 0.01 end below what
# a 10-image-per-class set reaches; on Fashion-MNIST the set matched from experts at 0.1 had the best validation
# accuracy of four rates (0.01 / 0.03 / 0.1 / 0.3), on CIFAR-10 it lost 4.2 points at 0.1. Digits and clothes
# (one channel, mostly background, a normalised ConvNet) train stably at 0.1; natural images keep MTT's 0.01.
EXPERTS_LR = {"grayscale": 1e-1, "natural": 1e-2}
# except for one image per class: there the set inherits the experts' rate as its step size, ten images do not bear
# 0.1, and the grayscale quick set lost 3-5 points of validation accuracy from experts at 0.1 (three seeds, hard
# and learned labels). Experts alone do not know the ipc; a pipeline does and passes this (experts_lr_for_ipc).
SMALL_SET_EXPERTS_LR = 1e-2
# The set matches the experts' whole trajectories: max_start_epoch is their epochs - expert_epochs where known (4 for
# the 6-epoch experts; on CIFAR-10 at ipc 1, start epochs 0-11 beat DATM's early 0-3 by validation, 0.3274 to 0.3122).
QUICK_DISTILL = dict(syn_steps=10, expert_epochs=2, max_start_epoch=4, lr_img=1e2, lr_lr=1e-5, lr_teacher=1e-2,
                     batch_syn=None, iterations=100, eval_every=50, num_eval=3, eval_epochs=200,
                     checkpoint_every=25, **MTT_MATCHING)
# The grayscale sets with hard labels above one image per class (their experts train at 0.1) stop at 50 iterations: on
# Fashion-MNIST at ipc 10 the set chosen by validation was iteration 50's in all four runs measured (three seeds of the
# quality table and the main job: validation 0.7990 / 0.8089 / 0.8095 / 0.7983 at 50, 0.7937 / 0.8004 / 0.8079 / 0.7951
# at 100), so 50 more iterations and their evaluation round bought nothing. Learned labels, one image per class and
# CIFAR-10 gained from 50 to 100 in every run, and keep 100 (README, "How many iterations").
QUICK_GRAYSCALE_HARD = dict(iterations=50)

# Long: the quick budget with experts that train long enough for the matched segments to reach past their first few
# hundred SGD steps (the quick experts' 240 steps end below the accuracy a 10-image-per-class set reaches), and a
# start-epoch bound that follows them (max_start_epoch = the experts' epochs - expert_epochs). The grayscale sets
# train their experts at 0.1 (Fashion-MNIST preferred it by validation, 4 rates), natural images at 0.01 (CIFAR-10
# lost 4.2 points at 0.1) and whitened (ZCA, as MTT's published CIFAR-10 rows at ipc 1 and 10: the set gained 3.2
# points of validation accuracy with it under the quick budget). README, "Two CPU budgets", has the figures.
LONG_EXPERTS = {"grayscale": dict(epochs=20), "natural": QUICK_BY_KIND["natural"]}  # CIFAR: quick's experts
# and twice the quick budget's iterations, evaluated every 100: matching these experts, Fashion-MNIST's validation
# accuracy still rose from iteration 100 to 200 (0.8071 / 0.8157 / 0.8197 at 100 / 150 / 200), as CIFAR-10's did with
# the quick experts up to 300; two fewer evaluation rounds pay for part of the extra iterations. Evaluation networks
# keep 200 epochs: at 500, the set and random real images both gained about half a point of validation accuracy
# (0.8187 -> 0.8231 against 0.7462 -> 0.7515), so the gap did not grow for 2.5x the evaluation time.
LONG_DISTILL = dict(iterations=200, eval_every=100)
# The grayscale sets with hard labels above one image per class unroll 15 steps per 2-epoch segment instead of 10: on
# Fashion-MNIST at ipc 10, three seeds on the same experts, the sets chosen by validation reached 0.8215 / 0.8302 /
# 0.8297 (mean 0.8271) against 0.8245 / 0.8261 / 0.8202 (0.8236), for about 70 s more of distillation per run, within
# the 10 minutes of experts + distill (README, "Two CPU budgets"). CIFAR was not measured at 15 and keeps 10.
# They run 250 iterations, evaluated at 0, 200 and 250: at 15 steps validation accuracy still rose from 100 to 200 in
# all three seeds, and with 50 more iterations the chosen sets reached 0.8263 / 0.8302 / 0.8297 (mean 0.8287; seed 0
# chose iteration 250's, the others kept 200's), testing at 0.8214 +- 0.0037, +8.2 points over random real images, in
# 8.9-9.3 minutes of experts + distill. No seed's best set was iteration 100's, so that round (about 20 s) is left out.
LONG_GRAYSCALE_HARD = dict(syn_steps=15, iterations=250, eval_every=200)

# Teacher and KD, by training set: the full real data, or a small set (synthetic or a random subset).
# Quick teacher: a ConvNet twice as wide as the student (3.2x its parameters); W64 trains 3.5x slower on
# 2 cores and does not fit the combined pipeline's 20 minutes.
QUICK_TEACHER = {"real": dict(model="convnet-w32", epochs=3, lr=0.05, schedule="cosine", augment="none"),
                 "small": dict(model="convnet-w32", epochs=200, lr=0.01, schedule="step", augment="dsa")}
PAPER_TEACHER = {"real": dict(model="resnet18", epochs=100, lr=0.05, schedule="cosine", augment="dsa"),
                 "small": dict(model="resnet18", epochs=1000, lr=0.01, schedule="step", augment="dsa")}
QUICK_KD = {"real": dict(student="convnet-w16", epochs=3, lr=0.05, schedule="cosine", augment="none"),
            "small": dict(student="convnet-w16", epochs=200, lr=0.01, schedule="step", augment="dsa")}
PAPER_KD = {"real": dict(student="convnet-w32", epochs=100, lr=0.05, schedule="cosine", augment="dsa"),
            "small": dict(student="convnet-w32", epochs=1000, lr=0.01, schedule="step", augment="dsa")}
# A teacher trained on the transfer set itself (with DSA) has been fitted to its DSA views, so its labels
# there add little to the hard labels; on mixed pairs it has not seen, they do (README, Knowledge distillation).
OWN_SET_AUGMENT = "mixup"


def pick_budget(budget: str, device_type: str) -> str:
    """``auto`` means the published settings on a GPU and the quick ones elsewhere (``long`` is asked for by name)."""
    if budget != "auto":
        return budget
    return "paper" if device_type == "cuda" else "quick"


def grayscale(dataset: str) -> bool:
    """One channel (MNIST, Fashion-MNIST), as the dataset table says."""
    return data.DATASETS[dataset].channels == 1


def quick_labels(dataset: str, ipc: int, zca: bool = False) -> str:
    """The CPU budgets' synthetic labels: learned (DATM) on natural images at every ipc and on the grayscale sets at
    one image per class; hard on the grayscale sets above that, and hard on whitened (ZCA) data.

    Chosen by the validation accuracy of the chosen sets, 3 seeds each (README, "The quick budget's sets against
    random real images"): learned labels won on CIFAR-10 at ipc 1 and 10 and on Fashion-MNIST at ipc 1, and lost on
    Fashion-MNIST at ipc 10, where the quick experts' soft labels make even random real images worse than their hard
    labels. One image per class says little through its hard label alone, and natural images carry the class
    similarities soft labels encode; on a grayscale set with ten images per class the weak quick experts' labels cost
    more than they add. On whitened CIFAR-10 the quick experts label worse still (test accuracy 0.32 against 0.37),
    and learned labels lost to hard ones at ipc 10 (validation 0.3715 against 0.3879, one run each).
    """
    if zca:
        return "hard"
    return "hard" if grayscale(dataset) and ipc > 1 else "learned"


def paper_distill_row(dataset: str, ipc: int, recipe: str = "mtt") -> tuple[int, dict]:
    """The published row of ``recipe`` (mtt or datm) for the nearest ipc (1, 10 or 50)."""
    nearest = min((1, 10, 50), key=lambda k: abs(k - ipc))
    if recipe == "datm":
        if (dataset, nearest) not in PAPER_DATM:
            raise ValueError(f"recipe datm: the published DATM settings cover cifar10 and cifar100, not {dataset}; "
                             "use recipe mtt, or set the window (--window-start) and --labels learned yourself")
        return nearest, dict(PAPER_DATM[(dataset, nearest)])
    return nearest, dict(PAPER_DISTILL[(dataset, nearest)])


def experts_zca(budget: str, dataset: str, ipc: int, recipe: str = "mtt") -> bool | None:
    """The ZCA flag a pipeline gives its experts for distilling ``ipc`` images per class: the published
    row's (of ``recipe``) under the paper budget; None (the experts' own budget decides) under quick."""
    return paper_distill_row(dataset, ipc, recipe)[1]["zca"] if budget == "paper" else None


def experts_lr_for_ipc(budget: str, dataset: str, ipc: int) -> float | None:
    """The expert learning rate a pipeline gives its experts for distilling ``ipc`` images per class, where it is not
    what the experts' budget would choose alone: MTT's 0.01 for one image per class on the grayscale sets under the
    CPU budgets; None elsewhere (the experts' budget decides)."""
    return SMALL_SET_EXPERTS_LR if budget in ("quick", "long") and grayscale(dataset) and ipc == 1 else None


C = TypeVar("C", bound=BaseModel)


@dataclass(frozen=True)
class Resolved(Generic[C]):
    """A config resolved against its budget."""

    budget: str  # quick, long or paper
    cfg: C  # every unset field the budget decides, filled in
    filled: dict[str, object]  # what the budget filled in, and which published row it used


def resolve(cfg: C, device_type: str, **context: object) -> Resolved[C]:
    """Fill ``cfg``'s unset fields from its budget. ``context`` is what the stage knows that its config
    does not: distill, the experts' ``experts_model``, ``experts_zca``, ``experts_lr`` and ``experts_epochs``; teacher
    and kd, the synthetic
    set's ``learned_lr``; kd, ``teacher_on_transfer`` (its teacher was trained on this transfer set)."""
    budget = pick_budget(cfg.budget, device_type)
    defaults = next(make for kind, make in DEFAULTS.items() if isinstance(cfg, kind))
    table = defaults(cfg, budget, **context)
    fields = type(cfg).model_fields
    filled = {k: v for k, v in table.items() if k in fields and getattr(cfg, k) is None}
    facts = {k: v for k, v in table.items() if k not in fields}
    # validated again: checks across fields (e.g. a start-epoch window) see the values the budget filled in
    return Resolved(budget, type(cfg).model_validate({**cfg.model_dump(), **filled}), {**filled, **facts})


def log_resolved(resolved: Resolved) -> None:
    """Log the budget and what it filled in (``budget.*``) as params of the active run."""
    tracking.log_params({"budget.resolved": resolved.budget,
                         **{f"budget.{k}": v for k, v in resolved.filled.items()}})


def experts_defaults(cfg: ExpertsConfig, budget: str) -> dict:
    if budget != "paper":
        kind = "grayscale" if grayscale(cfg.dataset) else "natural"
        return dict(QUICK_EXPERTS, lr_teacher=EXPERTS_LR[kind], **(LONG_EXPERTS if budget == "long" else
                                                                    QUICK_BY_KIND)[kind])
    # Experts alone do not know the ipc they will be distilled at: ZCA for CIFAR, as most published rows
    # are. A pipeline knows, and passes its row's flag (experts_zca).
    return dict(PAPER_EXPERTS, zca=cfg.dataset.startswith("cifar"))


def distill_defaults(cfg: DistillConfig, budget: str, *, experts_model: str, experts_zca: bool,
                     experts_lr: float | None = None, experts_epochs: int | None = None) -> dict:
    # MTT starts the synthetic step size at the experts' learning rate (the published rows' 1e-2 is the paper
    # experts' rate): a set distilled from experts trained at another rate starts from theirs
    follow = {} if experts_lr is None else {"lr_teacher": experts_lr}
    if budget != "paper":
        if cfg.recipe != "mtt":
            raise ValueError(f"recipe {cfg.recipe}: its published settings are a paper-budget table (--budget paper); "
                             f"under the {budget} budget set the window (--window-start) and --labels learned "
                             "yourself")
        table = dict(QUICK_DISTILL, labels=quick_labels(cfg.dataset, cfg.ipc, experts_zca), eval_model=experts_model,
                     **follow)
        grayscale_hard = grayscale(cfg.dataset) and cfg.ipc > 1 and (cfg.labels or table["labels"]) == "hard"
        if grayscale_hard:
            table.update(QUICK_GRAYSCALE_HARD)
        wanted = experts_lr_for_ipc(budget, cfg.dataset, cfg.ipc)
        if wanted is not None and experts_lr not in (None, wanted) and cfg.lr_teacher is None:
            log.warning("the experts trained at %g; for %s at ipc %d the %s budget trains them at %g (a pipeline does; "
                        "kdd experts --lr-teacher %g to follow it)", experts_lr, cfg.dataset, cfg.ipc, budget,
                        wanted, wanted)
        if budget == "long":
            table.update(LONG_DISTILL, **(LONG_GRAYSCALE_HARD if grayscale_hard else {}))
        if experts_epochs is not None:  # segments from anywhere along the experts' epochs
            table["max_start_epoch"] = max(experts_epochs - (cfg.expert_epochs or table["expert_epochs"]), 1)
        return table
    row_ipc, row = paper_distill_row(cfg.dataset, cfg.ipc, cfg.recipe)
    row_zca = row.pop("zca")  # ZCA is the experts' choice: the set is distilled in their input space
    if row_zca != experts_zca:  # a user may want that; say so rather than refuse
        log.warning("the experts are %sZCA-whitened, but the published row for %s ipc %d is %s ZCA; distilling "
                    "as the experts are (experts --zca %s would follow the paper)", "" if experts_zca else "not ",
                    cfg.dataset, row_ipc, "with" if row_zca else "without", str(row_zca).lower())
    run = {**PAPER_RUN, **DATM_RUN} if cfg.recipe == "datm" else {**PAPER_RUN, **MTT_MATCHING}
    return {**run, **row, "eval_model": experts_model, "paper_row_ipc": row_ipc, **follow}


def by_source(tables: dict[str, dict], small: bool, learned_lr: float | None) -> dict:
    table = dict(tables["small" if small else "real"])
    if small and learned_lr is not None:  # a synthetic set comes with the step size it was learned for
        table["lr"] = learned_lr
    return table


def teacher_defaults(cfg: TeacherConfig, budget: str, *, learned_lr: float | None = None) -> dict:
    return by_source(PAPER_TEACHER if budget == "paper" else QUICK_TEACHER, cfg.source != "real", learned_lr)


def kd_defaults(cfg: KDConfig, budget: str, *, learned_lr: float | None = None,
                teacher_on_transfer: bool = False) -> dict:
    table = by_source(PAPER_KD if budget == "paper" else QUICK_KD, cfg.transfer != "real", learned_lr)
    if teacher_on_transfer:
        table["augment"] = OWN_SET_AUGMENT
    return table


def pipeline_defaults(cfg: PipelineConfig, budget: str) -> dict:
    """The pipeline's teacher and student: the budget's real-data architectures."""
    teacher, kd = (PAPER_TEACHER, PAPER_KD) if budget == "paper" else (QUICK_TEACHER, QUICK_KD)
    return {"teacher_model": teacher["real"]["model"], "student_model": kd["real"]["student"]}


DEFAULTS: dict[type[BaseModel], Callable[..., dict]] = {
    ExpertsConfig: experts_defaults, DistillConfig: distill_defaults, TeacherConfig: teacher_defaults,
    KDConfig: kd_defaults, PipelineConfig: pipeline_defaults,
}
