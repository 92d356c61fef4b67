"""Stage ``kd``: a small student distilled from a teacher run on a transfer set.

Besides the student's own accuracy, NLL and ECE, the run logs fidelity to its teacher (top-1 agreement
and KL(teacher || student) at T = 1) on the transfer data and on the test data, and the compression
ratios (teacher / student parameters; full / transfer images).
"""

from __future__ import annotations

import logging

import mlflow
import torch

from kdd_mlflow import budgets, data, kd, metrics, models, tracking
from kdd_mlflow.artifacts import model as model_artifact
from kdd_mlflow.artifacts.space import InputSpace
from kdd_mlflow.augment import DSA
from kdd_mlflow.config import KDConfig
from kdd_mlflow.runtime import pick_device, seed_everything
from kdd_mlflow.supervised import sgd_recipe, small_set_source, train_and_log
from kdd_mlflow.train import predict_logits

log = logging.getLogger(__name__)

# The last feature block of each family: where a hint is taken when no layer is named.
FEATURE_LAYERS = {"convnet": "features", "resnet18": "layer4", "mlp": "4"}


def feature_layer(model_name: str) -> str:
    return FEATURE_LAYERS[model_name.split("-")[0]]


def transfer_set(cfg: KDConfig, real: data.RealData, teacher_space: InputSpace) -> tuple[data.Split, float | None]:
    """The transfer images and a learned step size if any; ``real`` is mapped into the teacher's input space,
    and a synthetic set must live in that same space."""
    if cfg.transfer == "synthetic":
        synthetic, lr, space = small_set_source(cfg.synthetic_run, real)
        space.require(teacher_space, f"the synthetic set of run {cfg.synthetic_run}", f"teacher run {cfg.teacher_run}")
        return synthetic, lr
    teacher_space.enter(real)
    if cfg.transfer == "subset":
        return real.random_subset(cfg.ipc, torch.Generator().manual_seed(cfg.seed + 1)), None
    return real.train, None


def teacher_trained_on_transfer(cfg: KDConfig) -> bool:
    """Whether the teacher run was trained on this very transfer set (the synthetic set, or the subset)."""
    if cfg.transfer == "real":
        return False
    params = mlflow.get_run(cfg.teacher_run).data.params
    if cfg.transfer == "synthetic":
        return tracking.same_value(params.get("synthetic_run", ""), cfg.synthetic_run or "")
    same = {"ipc": str(cfg.ipc), "seed": str(cfg.seed), "dataset": cfg.dataset, "synthetic_run": ""}
    return all(tracking.same_value(params.get(k, "?"), v) for k, v in same.items())


def run(asked: KDConfig) -> str:
    """Distil the teacher run into a small student on the transfer set; return the run id."""
    device = pick_device(asked.device)
    loaded = model_artifact.load(asked.teacher_run, expect={"dataset": asked.dataset})
    real = data.load(asked.dataset, asked.data_dir, asked.val_size, asked.train_limit)
    full_images = len(real.train)
    transfer, learned_lr = transfer_set(asked, real, loaded.space)
    resolved = budgets.resolve(asked, device.type, learned_lr=learned_lr,
                               teacher_on_transfer=teacher_trained_on_transfer(asked))
    cfg = resolved.cfg
    meta = real.info
    generator = seed_everything(cfg.seed)
    teacher = loaded.module.to(device)
    student = models.create(cfg.student, meta.channels, meta.num_classes, meta.image_size).to(device)
    if cfg.init_from_teacher:
        copied = kd.init_from_teacher(student, teacher)
        log.info("student initialised from %d teacher tensors", copied)
    loss = kd.create_loss(cfg.loss, temperature=cfg.temperature, alpha=cfg.alpha, beta=cfg.beta,
                          student_layer=cfg.hint_student_layer or feature_layer(cfg.student),
                          teacher_layer=cfg.hint_teacher_layer or feature_layer(loaded.name))
    with tracking.stage_run("kd", asked, run_name=f"kd-{loaded.name}-to-{cfg.student}-{cfg.transfer}",
                            resolved=cfg, tags={"kdd.transfer": cfg.transfer}) as active:
        budgets.log_resolved(resolved)
        tracking.log_params({"teacher_model": loaded.name})
        recipe = sgd_recipe(cfg)
        transfer_on_device = transfer.to(device)
        with recipe.autocast(device):  # the teacher's logits as training would see them
            objective = kd.kd_objective(teacher, loss, cfg.augment, DSA.for_dataset(cfg.dataset),
                                        label_once=transfer_on_device.images)
        with loss.attach(student, teacher, example=transfer_on_device.images[:2]):
            train_and_log(student, cfg.student, transfer_on_device, real, recipe, generator, device, loaded.space,
                          objective=objective, extra_parameters=loss.extra_parameters())
        fid = fidelity_metrics(teacher, student, transfer_on_device, real.test.to(device),
                               objective.teacher_logits if recipe.precision == "fp32" else None,
                               loaded.stored_test_logits(real.test.labels, device))  # as the teacher's run measured
        fid.update(metrics.compression(models.count_parameters(teacher), models.count_parameters(student),
                                       full_images, len(transfer)))
        fid["teacher_parameters"] = models.count_parameters(teacher)
        mlflow.log_metrics(fid)
        log.info("agreement with the teacher: test %.4f, transfer %.4f", fid["test_agreement"],
                 fid["transfer_agreement"])
        return active.info.run_id


def fidelity_metrics(teacher, student, transfer: data.Split, test: data.Split,
                     transfer_teacher: torch.Tensor | None = None, test_teacher: torch.Tensor | None = None
                     ) -> dict[str, float]:
    """Agreement and KL on the transfer and test images; ``transfer_teacher`` and ``test_teacher``: the teacher's
    float32 logits on them when already at hand."""
    out = {}
    for name, split, known in (("transfer", transfer, transfer_teacher), ("test", test, test_teacher)):
        t = known if known is not None else predict_logits(teacher, split.images)
        s = predict_logits(student, split.images)
        out.update({f"{name}_{k}": v for k, v in metrics.fidelity(t, s).items()})
        if name == "test":
            out["teacher_test_acc"] = metrics.accuracy(t, split.labels.to(t.device))
    return out
