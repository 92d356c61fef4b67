from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from kdd_mlflow import budgets, cli, data, report, tracking
from kdd_mlflow.artifacts import experts as buffer
from kdd_mlflow.artifacts import synthetic
from kdd_mlflow.config import DistillConfig, ExpertsConfig, TeacherConfig
from kdd_mlflow.distill.evaluate import mean_std, train_nets
from kdd_mlflow.stages import distill as distill_stage
from kdd_mlflow.stages import experts as experts_stage
from kdd_mlflow.stages import train as train_stage
from kdd_mlflow.train import evaluate


def experts_config(fake_fashion: Path, **kw) -> ExpertsConfig:
    values = dict(dataset="fashion-mnist", data_dir=str(fake_fashion), val_size=100, budget="quick",
                  model="convnet-w8", num_experts=2, epochs=3)
    return ExpertsConfig(**{**values, **kw})


def distill_config(fake_fashion: Path, experts_run: str, **kw) -> DistillConfig:
    values = dict(dataset="fashion-mnist", data_dir=str(fake_fashion), experts_run=experts_run, budget="quick",
                  ipc=2, iterations=6, syn_steps=4, expert_epochs=1, max_start_epoch=2, eval_every=3, num_eval=2,
                  eval_epochs=15, checkpoint_every=2, lr_img=100.0)
    return DistillConfig(**{**values, **kw})


def artifact_names(run_id: str, path: str = "") -> set[str]:
    return {Path(a.path).name for a in mlflow.MlflowClient().list_artifacts(run_id, path)}


def test_experts_then_distill_end_to_end(fake_fashion):
    experts_run = experts_stage.run(experts_config(fake_fashion))
    assert artifact_names(experts_run, "trajectories") == {"expert_0000.safetensors", "expert_0001.safetensors"}
    manifest = mlflow.artifacts.load_dict(f"runs:/{experts_run}/manifest.json")
    assert manifest["model"] == "convnet-w8" and manifest["epochs"] == 3 and len(manifest["experts"]) == 2
    assert all(0 <= e["test_acc"] <= 1 for e in manifest["experts"])
    params = mlflow.get_run(experts_run).data.params
    assert params["budget.resolved"] == "quick" and params["budget.lr_teacher"] == "0.1"  # grayscale
    assert params["dsa_strategy"] == "color_crop_cutout_flip_scale_rotate"  # clothes: every group

    run_id = distill_stage.run(distill_config(fake_fashion, experts_run))
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["dsa_strategy"] == params["dsa_strategy"]  # the inner loop augments as the experts did
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(run_id, "matching_loss")) == 6
    assert [m.step for m in client.get_metric_history(run_id, "val_acc")] == [0, 3, 6]
    assert [m.value for m in client.get_metric_history(run_id, "syn_lr")][-1] > 0
    for key in ("test_acc_mean", "test_acc_std", "random_subset_test_acc_mean", "best_val_acc", "skipped_updates"):
        assert key in run.data.metrics
    assert {"synthetic.safetensors", "synthetic.json", "grid.png", "grid.html"} <= artifact_names(run_id, "synthetic")
    html = mlflow.artifacts.load_text(f"runs:/{run_id}/synthetic/grid.html")
    assert 'src="https://' not in html and len(html) > 1_000_000  # plotly.js inlined: renders offline

    distilled = synthetic.load(run_id, expect={"dataset": "fashion-mnist"})
    lr, zca, spec = distilled.lr, distilled.space.zca, distilled.spec()
    assert distilled.images.shape == (20, 1, 28, 28) and distilled.labels.tolist() == [c for c in range(10)
                                                                                       for _ in range(2)]
    assert lr == pytest.approx(run.data.metrics["learned_lr"]) and zca is None and spec["ipc"] == 2
    # the set's test figure is that of the networks of its validation round (seeded by the round), not new ones
    cfg, best = distill_config(fake_fashion, experts_run), int(run.data.metrics["best_iteration"])
    real = data.load("fashion-mnist", fake_fashion, val_size=100)
    nets = list(train_nets(distilled.split, "convnet-w8", real.info, lr, cfg.eval_epochs, cfg.num_eval,
                           seed=cfg.seed + best))
    for split, logged in ((real.val, "best_val_acc"), (real.test, "test_acc_mean")):
        mean = mean_std([evaluate(net, split)["acc"] for net in nets])[0]
        assert mean == pytest.approx(run.data.metrics[logged], abs=1e-9)
    with pytest.raises(tracking.ArtifactError, match="expected 'mnist'"):
        synthetic.load(run_id, expect={"dataset": "mnist"})


def test_the_first_round_is_the_baseline_and_an_unimproved_set_gets_its_own_networks(fake_fashion, monkeypatch):
    """Before any update a hard-labelled set is a random real subset: the first validation round trains the
    random-subset baseline's networks (their test accuracy is the baseline's figure), and a set that no update
    improved is tested on networks trained on it, seeded as its round."""
    experts_run = experts_stage.run(experts_config(fake_fashion))

    def spoil(syn, *args, **kwargs):  # every update ruins the set, so the first round stays the best
        with torch.no_grad():
            syn.images.copy_(torch.randn_like(syn.images) * 50)
        return 1.0, True

    monkeypatch.setattr(distill_stage, "mtt_iteration", spoil)
    cfg = distill_config(fake_fashion, experts_run)
    run = mlflow.get_run(distill_stage.run(cfg))
    metrics = run.data.metrics
    assert metrics["best_iteration"] == 0
    real = data.load("fashion-mnist", fake_fashion, val_size=100)
    lr = metrics["learned_lr"]  # never updated: the budget's initial step size, the baseline's
    baseline = list(train_nets(distill_stage.random_subsets(real, cfg, torch.device("cpu")), "convnet-w8", real.info,
                               lr, cfg.eval_epochs, cfg.num_eval, seed=cfg.seed + distill_stage.BASELINE_SEED))
    first = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_acc")[0]
    assert first.step == 0
    assert first.value == pytest.approx(mean_std([evaluate(n, real.val)["acc"] for n in baseline])[0], abs=1e-9)
    assert metrics["random_subset_test_acc_mean"] == pytest.approx(
        mean_std([evaluate(n, real.test)["acc"] for n in baseline])[0], abs=1e-9)
    distilled = synthetic.load(run.info.run_id)
    own = list(train_nets(distilled.split, "convnet-w8", real.info, lr, cfg.eval_epochs, cfg.num_eval, seed=cfg.seed))
    for split, logged in ((real.val, "best_val_acc"), (real.test, "test_acc_mean")):
        assert metrics[logged] == pytest.approx(mean_std([evaluate(n, split)["acc"] for n in own])[0], abs=1e-9)


def test_shards_fill_one_buffer_and_a_rerun_trains_only_missing_experts(fake_fashion, monkeypatch):
    first = experts_stage.run(experts_config(fake_fashion, num_experts=3, shard="0/2"))
    second = experts_stage.run(experts_config(fake_fashion, num_experts=3, shard="1/2"))
    assert artifact_names(first, "trajectories") == {"expert_0000.safetensors", "expert_0002.safetensors"}
    assert artifact_names(second, "trajectories") == {"expert_0001.safetensors"}
    assert len(buffer.load_manifests([first, second])["experts"]) == 3
    # after its first expert, a run with more to train logs how long the rest will take
    assert mlflow.get_run(first).data.metrics["estimated_remaining_s"] > 0
    assert "estimated_remaining_s" not in mlflow.get_run(second).data.metrics  # nothing left after the one

    trained = []
    real_train = experts_stage.train_expert

    def crash_on_second(*args, **kwargs):
        if len(trained) == 1:
            raise KeyboardInterrupt
        trained.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(experts_stage, "train_expert", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        experts_stage.run(experts_config(fake_fashion, num_experts=2))
    crashed = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.status = 'KILLED'")
    crashed_id = crashed["run_id"][0]
    assert artifact_names(crashed_id, "trajectories") == {"expert_0000.safetensors"}

    monkeypatch.setattr(experts_stage, "train_expert", lambda *a, **k: (trained.append(2), real_train(*a, **k))[1])
    assert experts_stage.run(experts_config(fake_fashion, num_experts=2, run_id=crashed_id)) == crashed_id
    assert trained == [1, 2]  # only expert 1 was trained again
    assert artifact_names(crashed_id, "trajectories") == {"expert_0000.safetensors", "expert_0001.safetensors"}
    assert mlflow.get_run(crashed_id).info.status == "FINISHED"


# learned labels: images, step size and labels all resume; hard labels: the baseline measured in the first round
@pytest.mark.parametrize("labels", ["hard", "learned"])
def test_distill_resume_equals_uninterrupted(fake_fashion, monkeypatch, labels):
    experts_run = experts_stage.run(experts_config(fake_fashion))
    whole = distill_stage.run(distill_config(fake_fashion, experts_run, labels=labels))

    calls = []
    real_iteration = distill_stage.mtt_iteration

    def crash_at_fifth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_iteration(*args, **kwargs)

    monkeypatch.setattr(distill_stage, "mtt_iteration", crash_at_fifth)
    with pytest.raises(KeyboardInterrupt):
        distill_stage.run(distill_config(fake_fashion, experts_run, labels=labels))
    monkeypatch.setattr(distill_stage, "mtt_iteration", real_iteration)
    crashed = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.status = 'KILLED'")
    resumed = distill_stage.run(distill_config(fake_fashion, experts_run, labels=labels, resume=crashed["run_id"][0]))

    def final(run_id):
        return load_file(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/synthetic/synthetic.safetensors"))

    a, b = final(whole), final(resumed)
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["lr"], b["lr"])
    assert ("soft_labels" in a) == (labels != "hard") and torch.equal(a.get("soft_labels", a["labels"]),
                                                                       b.get("soft_labels", b["labels"]))
    losses = [[m.value for m in mlflow.MlflowClient().get_metric_history(r, "matching_loss")] for r in (whole, resumed)]
    assert sorted(losses[0]) == sorted(losses[1])
    ends = [mlflow.get_run(r).data.metrics for r in (whole, resumed)]
    for key in ("random_subset_test_acc_mean", "test_acc_mean", "best_val_acc"):
        assert ends[0][key] == ends[1][key]


def test_distill_rejects_bad_experts_before_work(fake_fashion):
    result = CliRunner().invoke(cli.main, ["distill", "--experts-run", "0123456789abcdef"])
    assert result.exit_code == 1 and "experts run '0123456789abcdef' not found" in result.stderr
    result = CliRunner().invoke(cli.main, ["distill"])
    assert result.exit_code == 2 and "experts_run: required, and not given" in result.stderr
    result = CliRunner().invoke(cli.main, ["distill", "--experts-run", " , "])
    assert result.exit_code == 2 and "give the experts run id" in result.stderr

    experts_run = experts_stage.run(experts_config(fake_fashion))
    with pytest.raises(ValueError, match="exceeds the experts' 3 epochs"):
        distill_stage.run(distill_config(fake_fashion, experts_run, max_start_epoch=3))
    assert mlflow.search_runs(search_all_experiments=True, filter_string="tags.`kdd.stage` = 'distill'").empty


def test_shard_syntax_is_checked():
    result = CliRunner().invoke(cli.main, ["experts", "--shard", "3/2"])
    assert result.exit_code == 2 and "shard '3/2' must be" in result.stderr


@pytest.mark.parametrize("ipc, row", [(1, 1), (10, 10), (50, 50), (20, 10), (40, 50)])
def test_paper_budget_uses_the_published_row(ipc, row):
    cfg = DistillConfig(dataset="cifar100", experts_run="x", budget="paper", ipc=ipc)
    got = budgets.resolve(cfg, "cpu", experts_model="convnet", experts_zca=False)
    resolved, filled = got.cfg, got.filled
    assert got.budget == "paper" and filled["paper_row_ipc"] == row
    if row == 50:
        assert (resolved.syn_steps, resolved.batch_syn, resolved.max_start_epoch) == (80, 125, 40)
    assert resolved.iterations == 5000 and resolved.eval_model == "convnet"
    explicit = DistillConfig(dataset="cifar100", experts_run="x", budget="paper", ipc=ipc, syn_steps=7)
    assert budgets.resolve(explicit, "cpu", experts_model="convnet", experts_zca=False).cfg.syn_steps == 7


def test_auto_budget_follows_the_device():
    cfg = DistillConfig(experts_run="x")
    assert budgets.resolve(cfg, "cuda", experts_model="convnet", experts_zca=False).budget == "paper"
    assert budgets.resolve(cfg, "cpu", experts_model="convnet", experts_zca=False).budget == "quick"


def test_zca_whitening_is_recorded_with_the_set(fake_fashion):
    real = data.load("fashion-mnist", fake_fashion, val_size=100)
    raw = real.train.images.clone()
    zca = data.whiten(real)
    torch.testing.assert_close(zca.inverse(real.train.images), raw, rtol=1e-3, atol=2e-3)


@pytest.mark.slow
def test_mlflow_run_experts_then_distill(fake_fashion, tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "KDD_DATA_DIR": str(fake_fashion.parent),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def mlflow_run(entry: str, *params: str) -> str:
        cmd = [sys.executable, "-m", "mlflow", "run", str(root), "-e", entry, "--env-manager", "local"]
        for p in ("dataset=fashion-mnist", "val_size=100", "budget=quick", *params):
            cmd += ["-P", p]
        done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stderr.split("=== Run (ID '")[-1].split("'")[0]

    experts_run = mlflow_run("experts", "model=convnet-w8", "num_experts=1", "epochs=3")
    distill_run = mlflow_run("distill", f"experts_run={experts_run}", "ipc=1", "iterations=2", "syn_steps=2",
                             "expert_epochs=1", "max_start_epoch=2", "eval_every=2", "num_eval=1", "eval_epochs=5")
    run = mlflow.get_run(distill_run)
    assert run.info.status == "FINISHED" and run.data.params["syn_steps"] == "2"
    assert run.data.params["budget.lr_img"] == "100.0" and "test_acc_mean" in run.data.metrics
    params = mlflow.get_run(experts_run).data.params
    assert "budget.model" not in params and params["model"] == "convnet-w8" and params["budget.lr_teacher"] == "0.1"


def test_learned_soft_labels_and_the_window_in_one_run(fake_fashion):
    experts_run = experts_stage.run(experts_config(fake_fashion))
    run_id = distill_stage.run(distill_config(fake_fashion, experts_run, labels="learned", lr_label=50.0,
                                              max_start_epoch=2, window_start=1, window_iterations=3))
    run = mlflow.get_run(run_id)
    assert run.data.params["labels"] == "learned"
    for key in ("random_subset_soft_test_acc_mean", "ior", "init_misclassified"):
        assert key in run.data.metrics
    assert run.data.metrics["ior"] == pytest.approx(run.data.metrics["test_acc_mean"]
                                                    - run.data.metrics["random_subset_soft_test_acc_mean"])
    distilled = synthetic.load(run_id)
    assert distilled.spec()["labels"] == "soft" and distilled.soft_labels.shape == (20, 10)
    assert distilled.labels.tolist() == [c for c in range(10) for _ in range(2)]  # the classes stay
    assert distilled.soft_labels.std() > 0
    # what trains on the set fits its soft labels (as probabilities), and the report says so
    split = distilled.split
    assert split.labels.shape == (20, 10) and torch.allclose(split.labels.sum(1), torch.ones(20))
    assert torch.equal(split.labels, distilled.soft_labels.softmax(1))
    teacher = train_stage.run_teacher(TeacherConfig(dataset="fashion-mnist", data_dir=str(fake_fashion), val_size=100,
                                                    budget="quick", synthetic_run=run_id, model="convnet-w8",
                                                    epochs=2))
    assert report.trained_on(teacher) == {"family": "distilled set", "labels": "the set's learned soft labels"}
    assert mlflow.get_run(teacher).data.metrics["test_acc"] > 0
    # the window: the bound starts at window_start and reaches max_start_epoch at window_iterations
    history = mlflow.MlflowClient().get_metric_history(run_id, "max_start_epoch_now")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [1, 1, 1, 2, 2, 2]


def test_soft_labels_need_real_initial_images():
    with pytest.raises(ValueError, match="use init 'real'"):
        DistillConfig(experts_run="abc", labels="soft", init="noise")


def test_the_difficulty_aligned_window_grows_to_max_start_epoch():
    cfg = DistillConfig(experts_run="abc", iterations=100, max_start_epoch=20, min_start_epoch=2, window_start=10,
                        window_iterations=50)
    bounds = [distill_stage.start_epoch_bound(cfg, it) for it in (0, 25, 49, 50, 99)]
    assert bounds == [10, 15, 19, 20, 20]
    plain = DistillConfig(experts_run="abc", iterations=100, max_start_epoch=20)
    assert {distill_stage.start_epoch_bound(plain, it) for it in range(100)} == {20}
    with pytest.raises(ValueError, match="window_start 30 must lie"):
        DistillConfig(experts_run="abc", max_start_epoch=20, window_start=30)
    with pytest.raises(ValueError, match="min_start_epoch 20 must be below"):
        DistillConfig(experts_run="abc", max_start_epoch=20, min_start_epoch=20)
