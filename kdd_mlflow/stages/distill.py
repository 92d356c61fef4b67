"""Stage ``distill``: MTT trajectory matching from experts runs into a synthetic set.

The run logs the matching loss, step size and skipped updates per iteration; validation accuracy of
fresh networks every ``eval_every`` iterations (the best set by validation accuracy is kept); a
checkpoint every ``checkpoint_every`` iterations (``resume`` continues from it bit for bit); and at
the end the synthetic set, its test accuracy (mean and std of K networks) and the same protocol on a
random real subset of the same size, with an image grid. A hard-labelled set starts as such a subset, so its
first validation round is the baseline's: K networks, each on its own random subset, measured on both splits.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import torch
from tqdm.auto import tqdm

from kdd_mlflow import budgets, data, lineage, models, report, tracking
from kdd_mlflow.artifacts import synthetic
from kdd_mlflow.artifacts.experts import ExpertsBuffer
from kdd_mlflow.artifacts.space import InputSpace
from kdd_mlflow.augment import DSA
from kdd_mlflow.config import DistillConfig
from kdd_mlflow.distill import labels as soft_labels
from kdd_mlflow.distill.evaluate import accuracies, evaluate_set, mean_std, train_nets
from kdd_mlflow.distill.mtt import FlatModel, SyntheticSet, Unroll, mtt_iteration, use_compiler
from kdd_mlflow.runtime import pick_device, seed_everything
from kdd_mlflow.train import evaluate

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint/checkpoint.pt"


def check_against_experts(cfg: DistillConfig, manifest: dict) -> None:
    if manifest["dataset"] != cfg.dataset:
        raise ValueError(f"experts are for {manifest['dataset']}, but dataset is {cfg.dataset}")
    needed = cfg.max_start_epoch + cfg.expert_epochs
    if needed > manifest["epochs"]:
        raise ValueError(
            f"max_start_epoch + expert_epochs = {needed} exceeds the experts' {manifest['epochs']} epochs"
        )


def initial_images(real: data.RealData, ipc: int, init: str, generator: torch.Generator) -> data.Split:
    subset = real.random_subset(ipc, generator)
    if init == "noise":
        subset.images = torch.randn(subset.images.shape, generator=generator)
    return subset


def rng_state(generator: torch.Generator) -> dict:
    return {"generator": generator.get_state(), "torch": torch.get_rng_state()}


def run(asked: DistillConfig) -> str:
    """Distil a synthetic set from experts run(s) by matching training trajectories (MTT)."""
    device = pick_device(asked.device)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        # every trajectory and the experts' whitening are fetched and checked before the run starts
        buffer = ExpertsBuffer(asked.experts_runs, Path(tmp))
        manifest = buffer.manifest
        resolved = budgets.resolve(asked, device.type, experts_model=manifest["model"],
                                   experts_zca=buffer.space.zca is not None, experts_lr=manifest.get("lr_teacher"),
                                   experts_epochs=manifest["epochs"])
        cfg = resolved.cfg
        check_against_experts(cfg, manifest)
        compiled = use_compiler(cfg.engine, device.type)
        # the experts' validation split and their stored whitening: the set is learned in the very space their
        # trajectories live in, whichever training images it starts from
        real = buffer.space.enter(data.load(cfg.dataset, cfg.data_dir, manifest["val_size"], cfg.train_limit))
        meta = real.info
        generator = seed_everything(cfg.seed)
        active = stack.enter_context(tracking.stage_run(
            "distill", asked, run_name=f"distill-{cfg.dataset}-ipc{cfg.ipc}", run_id=cfg.resume, resolved=cfg))
        run_id = active.info.run_id
        budgets.log_resolved(resolved)
        tracking.log_params({"experts": len(manifest["experts"]), "zca": manifest["zca"],
                             "dsa_strategy": DSA.for_dataset(cfg.dataset).strategy,
                             "zca_digest": buffer.space.digest, "engine.resolved": "compiled" if compiled else "eager"})
        mlflow.set_tag("kdd.device", str(device))
        lineage.log_inputs(training=real.train, validation=real.val, test=real.test)
        student = FlatModel(models.create(manifest["model"], meta.channels, meta.num_classes, meta.image_size)
                            .to(device), compile=compiled)
        labeller = None
        if cfg.labels == "hard":
            init = initial_images(real, cfg.ipc, cfg.init, generator)
            init_labels = init.labels
        else:
            expert = buffer.final_expert(0).to(device)  # DATM: the first expert, fully trained, labels the set
            labeller = lambda x: student(expert, x.to(device))  # noqa: E731
            init, init_labels, short = soft_labels.expert_labelled_subset(real, cfg.ipc, labeller, generator)
            mlflow.log_metric("init_misclassified", short)
        syn = SyntheticSet(init.images.to(device), init_labels.to(device), cfg.lr_teacher, cfg.lr_img, cfg.lr_lr,
                           learn_labels=cfg.labels == "learned", lr_label=cfg.lr_label)
        state = {"iteration": 0, "skipped": 0, "best_val": -1.0, "best_iteration": -1,
                 "best_images": syn.images.detach().cpu().clone(), "best_lr": syn.syn_lr.detach().cpu().clone(),
                 "best_labels": syn.labels.detach().cpu().clone()}
        if cfg.resume:
            state = restore(run_id, tmp, syn, generator, state)
        unroll = Unroll(cfg.syn_steps, cfg.batch_syn)
        augment = DSA.for_dataset(cfg.dataset)
        val = real.val.to(device)

        timing = {"eval": 0.0, "evals": 0, "iteration": 0.0, "iterations": 0}
        test = real.test.to(device)
        baseline_first = baseline_at_start(cfg)

        def evaluate_now(iteration: int) -> None:
            """Validation accuracy of fresh networks trained on the set now. The best round's networks are kept
            (their weights), so the chosen set is tested on those very networks at the end, with no second
            training; the choice itself sees validation accuracy only.

            Before the first update a hard-labelled set is a random real subset, so that round is the random-subset
            baseline itself (its networks measured on the test split too, for the end) rather than a second
            training of the same protocol."""
            t0 = time.perf_counter()
            nets, accs = [], []
            if iteration == 0 and baseline_first:
                state["baseline_test"] = []
                for net in train_nets(random_subsets(real, cfg, device), cfg.eval_model, meta, cfg.lr_teacher,
                                      cfg.eval_epochs, cfg.num_eval, seed=cfg.seed + BASELINE_SEED,
                                      precision=cfg.precision):
                    accs.append(evaluate(net, val)["acc"])
                    state["baseline_test"].append(evaluate(net, test)["acc"])
                nets = None  # not trained on the set itself: retrained on it at the end should it stay the best
            else:
                for net in train_nets(data.Split(syn.images.detach(), soft_labels.targets(syn.labels.detach())),
                                      cfg.eval_model, meta, syn.syn_lr.item(), cfg.eval_epochs, cfg.num_eval,
                                      seed=cfg.seed + iteration, precision=cfg.precision):
                    accs.append(evaluate(net, val)["acc"])
                    nets.append({k: v.detach().cpu().clone() for k, v in net.state_dict().items()})
            mean, std = mean_std(accs)
            mlflow.log_metrics({"val_acc": mean, "val_acc_std": std}, step=iteration)
            if mean > state["best_val"]:
                state.update(best_val=mean, best_iteration=iteration, best_images=syn.images.detach().cpu().clone(),
                             best_lr=syn.syn_lr.detach().cpu().clone(), best_labels=syn.labels.detach().cpu().clone())
                if nets is None:
                    state.pop("best_nets", None)
                else:
                    state["best_nets"] = nets
            log.info("iteration %d: validation accuracy %.4f +- %.4f (best %.4f at %d)", iteration, mean, std,
                     state["best_val"], state["best_iteration"])
            timing["eval"] += time.perf_counter() - t0
            timing["evals"] += 1

        first = state["iteration"]
        bar = tqdm(range(first, cfg.iterations), desc="distill", initial=first, total=cfg.iterations)
        for it in bar:
            if it % cfg.eval_every == 0:
                evaluate_now(it)
            t0 = time.perf_counter()
            top = start_epoch_bound(cfg, it)
            start, target = buffer.segment(generator, top, cfg.expert_epochs, cfg.min_start_epoch)
            loss, applied = mtt_iteration(syn, student, start.to(device), target.to(device), unroll, augment,
                                          generator, cfg.matching)
            timing["iteration"] += time.perf_counter() - t0
            timing["iterations"] += 1
            state["skipped"] += int(not applied)
            metrics = {"syn_lr": syn.syn_lr.item(), "skipped_updates": state["skipped"], "max_start_epoch_now": top}
            if applied:
                metrics["matching_loss"] = loss
            elif syn.skip_reason == "spike":
                log.warning("iteration %d: the step size's gradient is more than %g times its running mean (an "
                            "unstable unroll); update skipped. If it recurs, unroll fewer --syn-steps or start from a "
                            "lower --lr-teacher", it, syn.spike_ratio)
            else:
                log.warning("iteration %d: non-finite matching loss or gradient; update skipped", it)
            mlflow.log_metrics(metrics, step=it)
            bar.set_postfix(loss=f"{loss:.4f}", syn_lr=f"{syn.syn_lr.item():.4g}", skipped=state["skipped"])
            state["iteration"] = it + 1
            if state["iteration"] % cfg.checkpoint_every == 0 and state["iteration"] < cfg.iterations:
                checkpoint(tmp, syn, generator, state)
            if it == first + 1:
                estimate = remaining_seconds(timing, it + 1, cfg, baseline_left="baseline_test" not in state)
                mlflow.log_metric("estimated_remaining_s", estimate, step=it)
                log.info("estimated time for the remaining %d iterations: %.0f s", cfg.iterations - it - 1, estimate)
        if state["best_iteration"] != cfg.iterations:
            evaluate_now(cfg.iterations)
        finish(cfg, real, buffer.space, state, init.labels.cpu(), tmp, device, labeller)
        return run_id


BASELINE_SEED = 10**6  # the random-subset baseline's networks are seeded apart from every validation round's


def baseline_at_start(cfg: DistillConfig) -> bool:
    """Whether the set before its first update is a random real subset under the baseline's protocol (hard labels,
    real initial images, the baseline's step size), so that the first validation round can be the baseline's."""
    return cfg.labels == "hard" and cfg.init == "real"


def random_subsets(real: data.RealData, cfg: DistillConfig, device: torch.device) -> Callable[[int], data.Split]:
    """The random-subset baseline's training sets: a different random real subset of the set's size per network."""
    return lambda k: real.random_subset(cfg.ipc, torch.Generator().manual_seed(cfg.seed * 1000 + k + 1)).to(device)


def start_epoch_bound(cfg: DistillConfig, iteration: int) -> int:
    """The start epochs' upper bound at ``iteration``: ``max_start_epoch``, or with a difficulty-aligned window
    (DATM), ``window_start`` growing linearly to ``max_start_epoch`` over ``window_iterations``."""
    if cfg.window_start is None:
        return cfg.max_start_epoch
    span = cfg.window_iterations or cfg.iterations
    grown = cfg.window_start + int((cfg.max_start_epoch - cfg.window_start) * iteration / max(span, 1))
    return min(grown, cfg.max_start_epoch)


def remaining_seconds(timing: dict, done: int, cfg: DistillConfig, baseline_left: bool) -> float:
    """Measured seconds per iteration and per evaluation, times what is left (the last round, and the baseline
    when the first round was not it, count as one each)."""
    evals_left = len(range(done, cfg.iterations, cfg.eval_every)) + 1 + int(baseline_left)
    per_eval = timing["eval"] / max(timing["evals"], 1)
    return timing["iteration"] / timing["iterations"] * (cfg.iterations - done) + per_eval * evals_left


def checkpoint(tmp: str, syn: SyntheticSet, generator: torch.Generator, state: dict) -> None:
    path = Path(tmp) / "checkpoint" / "checkpoint.pt"
    path.parent.mkdir(exist_ok=True)
    torch.save({"syn": syn.state_dict(), "rng": rng_state(generator), "state": state}, path)
    mlflow.log_artifact(str(path), "checkpoint")


def restore(run_id: str, tmp: str, syn: SyntheticSet, generator: torch.Generator, state: dict) -> dict:
    path = tracking.download(run_id, CHECKPOINT, Path(tmp) / "resume")
    try:
        saved = torch.load(path, weights_only=True)
        syn.load_state_dict(saved["syn"])
    except Exception as exc:
        raise tracking.ArtifactError(f"run {run_id}: checkpoint is unreadable or does not fit: {exc}") from None
    generator.set_state(saved["rng"]["generator"])
    torch.set_rng_state(saved["rng"]["torch"])
    log.info("resuming run %s at iteration %d", run_id, saved["state"]["iteration"])
    return saved["state"]


def unwhitened_baseline(space: InputSpace, subset: Callable[[int], data.Split], test: data.Split, cfg: DistillConfig,
                        protocol: dict, syn_mean: float) -> dict[str, float]:
    """The random-subset baseline without the whitening: the same subsets, networks and protocol on the normalised
    images. Whitening can weaken random real images more than it helps the set (on CIFAR-10 a student on 100 whitened
    real images lost 7 points), so a whitened set's gain is also stated against this, the stronger baseline."""
    def raw(k: int) -> data.Split:
        split = subset(k)
        return data.Split(space.zca.inverse(split.images), split.labels, split.name, split.source)

    accs = evaluate_set(raw, cfg.eval_model, lr=cfg.lr_teacher, progress="test random subset, unwhitened",
                        **{**protocol, "measure_on": data.Split(space.zca.inverse(test.images), test.labels)})
    mean, std = mean_std(accs)
    log.info("random real subset without whitening: %.4f +- %.4f", mean, std)
    return {"random_subset_unwhitened_test_acc_mean": mean, "random_subset_unwhitened_test_acc_std": std,
            "test_acc_gain_unwhitened": syn_mean - mean}


def finish(cfg: DistillConfig, real: data.RealData, space: InputSpace, state: dict, classes: torch.Tensor,
           tmp: str, device: torch.device, labeller: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
    """Test the best set against a random real subset under one protocol (the best set's networks are those of its
    validation round, measured on the test split then); log the set and its grid. A set with
    soft labels is also compared with random real images labelled by the same expert (the fair baseline for
    soft labels: the gain of the images themselves, IOR)."""
    meta = real.info
    soft = labeller is not None
    best_labels = state.get("best_labels", classes)
    lr = float(state["best_lr"])
    test = real.test.to(device)
    protocol = dict(meta=meta, measure_on=test, epochs=cfg.eval_epochs, num_nets=cfg.num_eval,
                    seed=cfg.seed + BASELINE_SEED, precision=cfg.precision)
    best_val = state["best_val"]
    if "best_nets" in state:  # the networks that measured the chosen set's validation accuracy
        syn_accs = accuracies(cfg.eval_model, meta, state["best_nets"], test)
    else:  # no update beat the initial set (measured by the baseline's networks), or an older checkpoint: the
        # set's own networks, seeded as its validation round, measured on both splits
        best = data.Split(state["best_images"].to(device), soft_labels.targets(best_labels).to(device))
        nets = list(train_nets(best, cfg.eval_model, meta, lr, cfg.eval_epochs, cfg.num_eval,
                               seed=cfg.seed + state["best_iteration"], progress="test synthetic",
                               precision=cfg.precision))
        syn_accs = [evaluate(net, test)["acc"] for net in nets]
        best_val = mean_std([evaluate(net, real.val.to(device))["acc"] for net in nets])[0]
    mlflow.log_metrics({"best_val_acc": best_val, "best_iteration": state["best_iteration"]})
    subset = random_subsets(real, cfg, device)
    if "baseline_test" in state:  # the first validation round trained the baseline's networks
        real_accs = state["baseline_test"]
    else:
        real_accs = evaluate_set(subset, cfg.eval_model, lr=cfg.lr_teacher, progress="test random subset", **protocol)
    (syn_mean, syn_std), (real_mean, real_std) = mean_std(syn_accs), mean_std(real_accs)
    metrics = {"test_acc_mean": syn_mean, "test_acc_std": syn_std, "random_subset_test_acc_mean": real_mean,
               "random_subset_test_acc_std": real_std, "test_acc_gain": syn_mean - real_mean, "learned_lr": lr}
    if space.zca is not None:
        metrics.update(unwhitened_baseline(space, subset, test, cfg, protocol, syn_mean))
    if soft:
        def soft_subset(k: int) -> data.Split:  # the same subsets, labelled by the expert that labelled the set
            split = subset(k)
            with torch.no_grad():
                return data.Split(split.images, labeller(split.images).softmax(1), split.name, split.source)

        soft_accs = evaluate_set(soft_subset, cfg.eval_model, lr=cfg.lr_teacher, progress="test random soft subset",
                                 **protocol)
        soft_mean, soft_std = mean_std(soft_accs)
        metrics.update({"random_subset_soft_test_acc_mean": soft_mean, "random_subset_soft_test_acc_std": soft_std,
                        "ior": syn_mean - soft_mean})
        log.info("random real subset with the expert's soft labels: %.4f +- %.4f (IOR %.4f)", soft_mean, soft_std,
                 syn_mean - soft_mean)
    mlflow.log_metrics(metrics)
    log.info("synthetic set: test %.4f +- %.4f; random real subset: %.4f +- %.4f", syn_mean, syn_std,
             real_mean, real_std)
    distilled = synthetic.DistilledSet(state["best_images"], classes, lr, cfg.ipc, cfg.eval_model, space,
                                       soft_labels=best_labels.float() if soft else None)
    out = Path(tmp) / synthetic.DIRECTORY
    out.mkdir()
    distilled.save(out)
    report.image_grid(space.pixels(state["best_images"]), classes, meta, out / "grid.png", out / "grid.html",
                      title=f"{meta.name} synthetic set, ipc {cfg.ipc} (iteration {state['best_iteration']})")
    mlflow.log_artifacts(str(out), synthetic.DIRECTORY)
