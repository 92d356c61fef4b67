import math

import mlflow
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from kdd_mlflow import cli, data, kd, metrics, models
from kdd_mlflow.config import DistillConfig, EvaluateConfig, ExpertsConfig, KDConfig, TeacherConfig
from kdd_mlflow.stages import distill as distill_stage
from kdd_mlflow.stages import evaluate as evaluate_stage
from kdd_mlflow.stages import experts as experts_stage
from kdd_mlflow.stages import kd as kd_stage
from kdd_mlflow.stages import train as train_stage
from kdd_mlflow.train import SGDRecipe, fit, predict_logits


def softmax(row, t=1.0):
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def test_hinton_loss_by_hand():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], dtype=torch.float64)
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([1, 2])
    T, alpha = 3.0, 0.7
    kl = 0.0
    for srow, trow in zip(s.tolist(), t.tolist(), strict=True):
        ps, pt = softmax(srow, T), softmax(trow, T)
        kl += sum(b * math.log(b / a) for a, b in zip(ps, pt, strict=True))
    kl /= 2  # batch mean
    ce = sum(-math.log(softmax(r)[c]) for r, c in zip(s.tolist(), y.tolist(), strict=True)) / 2
    expected = alpha * T * T * kl + (1 - alpha) * ce
    got = kd.create_loss("hinton", temperature=T, alpha=alpha)(s, t, F.cross_entropy(s, y))
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_logit_mse_by_hand():
    s, t = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]])
    got = kd.create_loss("mse", alpha=0.5)(s, t, torch.tensor(2.0))
    assert got.item() == pytest.approx(0.5 * (1 + 4) / 2 + 0.5 * 2.0)


def test_unknown_loss_and_bad_weights():
    with pytest.raises(ValueError, match="unknown KD loss"):
        kd.create_loss("dark")
    with pytest.raises(ValueError, match="alpha"):
        kd.create_loss("hinton", alpha=1.5)


def test_gradients_reach_the_student_only():
    torch.manual_seed(0)
    teacher, student = models.create("convnet-w16", 1, 10, 28), models.create("convnet-w8", 1, 10, 28)
    objective = kd.kd_objective(teacher, kd.create_loss("hinton"), augment="mixup")
    loss, _ = objective(student, torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)), torch.Generator())
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert not teacher.training  # the teacher labels in eval mode


def test_metrics_against_hand_computed_examples():
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]]))
    labels = torch.tensor([0, 1, 1, 1])
    assert metrics.accuracy(logits, labels) == 0.75
    assert metrics.nll(logits, labels) == pytest.approx(-(math.log(0.9) + math.log(0.4) + 2 * 0) / 4
                                                        - (math.log(0.7) + math.log(0.8)) / 4)
    # confidences 0.9, 0.6, 0.7, 0.8 fall in bins (0.8,0.9], (0.5,0.6], (0.6,0.7], (0.7,0.8]: one each.
    # |acc - conf| per bin: |1-0.9|, |0-0.6|, |1-0.7|, |1-0.8| -> mean 0.3
    assert metrics.ece(logits, labels) == pytest.approx(0.3, abs=1e-6)
    from torchmetrics.functional.classification import multiclass_calibration_error

    g = torch.Generator().manual_seed(0)
    many = torch.randn(2000, 10, generator=g, dtype=torch.float64) * 3
    truth = torch.randint(0, 10, (2000,), generator=g)
    for bins in (10, 15):
        want = multiclass_calibration_error(many.softmax(1), truth, num_classes=10, n_bins=bins, norm="l1").item()
        assert metrics.ece(many, truth, bins) == pytest.approx(want, abs=1e-6)  # float32 sums
    other = torch.log(torch.tensor([[0.5, 0.5], [0.1, 0.9], [0.3, 0.7], [0.9, 0.1]]))
    assert metrics.agreement(logits, other) == 0.5  # argmax of [0.5,0.5] is 0: agrees on rows 0 and 2
    p, q = [0.9, 0.1], [0.5, 0.5]
    kl0 = sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))
    assert metrics.predictive_kl(logits[:1], other[:1]) == pytest.approx(kl0)
    assert metrics.predictive_kl(logits, logits) == pytest.approx(0.0, abs=1e-12)


def test_unaugmented_transfer_is_labelled_by_the_teacher_once():
    torch.manual_seed(0)
    teacher, student = models.create("convnet-w16", 1, 10, 28), models.create("convnet-w8", 1, 10, 28)
    images, labels = torch.randn(40, 1, 28, 28), torch.randint(0, 10, (40,))
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    loss = kd.create_loss("hinton", temperature=2.0)
    once = kd.kd_objective(teacher, loss, label_once=images)
    assert len(calls) == 1 and once.teacher_logits.shape == (40, 10)
    every = kd.kd_objective(teacher, loss)
    idx = torch.tensor([3, 17, 5, 0])
    cached, _ = once(student, images[idx], labels[idx], torch.Generator(), idx=idx)
    assert len(calls) == 1  # no teacher pass per batch
    fresh, _ = every(student, images[idx], labels[idx], torch.Generator())
    assert len(calls) == 2 and cached.item() == pytest.approx(fresh.item(), rel=1e-5)
    # augmented inputs, and losses that read the teacher's features, need the teacher on every batch
    assert kd.kd_objective(teacher, loss, augment="dsa", label_once=images).teacher_logits is None
    assert kd.kd_objective(teacher, kd.create_loss("hint"), label_once=images).teacher_logits is None


def test_feature_hints_attach_to_named_layers():
    torch.manual_seed(0)
    teacher, student = models.create("convnet-w16", 1, 10, 28), models.create("convnet-w8", 1, 10, 28)
    loss = kd.create_loss("hint", student_layer="features.4", teacher_layer="features")
    x = torch.randn(4, 1, 28, 28)
    with loss.attach(student, teacher, example=x[:2]):
        assert isinstance(loss.adapter, torch.nn.Conv2d)
        assert (loss.adapter.in_channels, loss.adapter.out_channels) == (8, 16)
        total, _ = kd.kd_objective(teacher, loss)(student, x, torch.randint(0, 10, (4,)), torch.Generator())
        caught = loss._student.outputs["features.4"]
        assert caught.shape == (4, 8, 16, 16)  # block 2's conv output, before its pool
        total.backward()
    assert loss.adapter.weight.grad is not None and loss.adapter.weight.grad.abs().sum() > 0
    assert loss.extra_parameters() == list(loss.adapter.parameters())
    student(x)  # hooks are gone after the context
    assert loss._student.outputs["features.4"] is caught
    with pytest.raises(ValueError, match="no layer named"):
        with kd.create_loss("hint", student_layer="nope").attach(student, teacher):
            pass


def test_init_from_teacher_copies_matching_tensors():
    teacher, student = models.create("convnet-w8", 1, 10, 28), models.create("convnet-w8", 1, 10, 28)
    assert kd.init_from_teacher(student, teacher) == len(teacher.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), teacher.parameters(), strict=True))
    with pytest.raises(ValueError, match="share no parameter"):
        kd.init_from_teacher(models.create("mlp", 1, 10, 28), teacher)


def test_kd_config_needs_its_transfer_source():
    result = CliRunner().invoke(cli.main, ["kd", "--teacher-run", "x", "--transfer", "synthetic"])
    assert result.exit_code == 2 and "needs synthetic_run" in result.stderr
    result = CliRunner().invoke(cli.main, ["kd", "--teacher-run", "x", "--transfer", "subset"])
    assert result.exit_code == 2 and "needs ipc" in result.stderr
    result = CliRunner().invoke(cli.main, ["kd", "--teacher-run", "x", "--alpha", "2"])
    assert result.exit_code == 2 and "alpha" in result.stderr


def test_teacher_kd_and_evaluate_stages(fake_fashion):
    common = dict(dataset="fashion-mnist", data_dir=str(fake_fashion), val_size=100, budget="quick")
    teacher_run = train_stage.run_teacher(TeacherConfig(**common, model="convnet-w16", epochs=2))
    run = mlflow.get_run(teacher_run)
    assert run.data.params["budget.lr"] == "0.05" and run.data.tags["kdd.source"] == "real"

    student_run = kd_stage.run(KDConfig(**common, teacher_run=teacher_run, student="convnet-w8", loss="hint",
                                        epochs=2, augment="dsa"))
    m = mlflow.get_run(student_run).data.metrics
    for key in ("test_acc", "test_nll", "test_ece", "test_agreement", "test_kl", "transfer_agreement",
                "transfer_kl", "param_compression", "data_compression"):
        assert key in m
    assert m["data_compression"] == 1.0 and m["param_compression"] > 1

    experts_run = experts_stage.run(ExpertsConfig(**common, model="convnet-w8", num_experts=1, epochs=3))
    distill_run = distill_stage.run(DistillConfig(**common, experts_run=experts_run, ipc=2, iterations=2,
                                                  syn_steps=2, expert_epochs=1, max_start_epoch=2, eval_every=2,
                                                  num_eval=1, eval_epochs=5))
    syn_teacher = train_stage.run_teacher(TeacherConfig(**common, model="convnet-w16", synthetic_run=distill_run,
                                                        epochs=5))
    params = mlflow.get_run(syn_teacher).data.params
    assert params["train_images"] == "20" and params["budget.augment"] == "dsa"
    assert float(params["budget.lr"]) == pytest.approx(mlflow.get_run(distill_run).data.metrics["learned_lr"])
    syn_student = kd_stage.run(KDConfig(**common, teacher_run=syn_teacher, transfer="synthetic",
                                        synthetic_run=distill_run, student="convnet-w8", epochs=5))
    assert mlflow.get_run(syn_student).data.metrics["data_compression"] == pytest.approx(1100 / 20)
    # the teacher was fitted to this set's DSA views: its labels are asked on mixed pairs instead
    assert mlflow.get_run(syn_student).data.params["budget.augment"] == "mixup"
    subset_student = kd_stage.run(KDConfig(**common, teacher_run=teacher_run, transfer="subset", ipc=3,
                                           student="convnet-w8", epochs=5, loss="mse"))
    assert mlflow.get_run(subset_student).data.params["train_images"] == "30"
    assert mlflow.get_run(subset_student).data.params["budget.augment"] == "dsa"  # a teacher of the full data

    eval_run = evaluate_stage.run(EvaluateConfig(**{k: v for k, v in common.items() if k != "budget"},
                                                 runs=f"{student_run},{syn_student}", reference=teacher_run))
    table = mlflow.MlflowClient().load_table(mlflow.get_run(eval_run).info.experiment_id, "evaluation.json",
                                              [eval_run])
    assert len(table) == 2 and {"acc", "nll", "ece", "agreement", "kl"} <= set(table.columns)
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(eval_run)}
    assert {"evaluation.csv", "evaluation.md", "evaluation.html"} <= names


@pytest.mark.real_data
def test_kd_student_agrees_with_its_teacher_more_than_an_independent_student(real_fashion):
    real = data.load("fashion-mnist", val_size=1000, train_limit=6000)
    torch.manual_seed(0)
    teacher = models.create("convnet-w32", 1, 10, 28)
    fit(teacher, real.train, SGDRecipe(3, 128, 0.05), torch.Generator().manual_seed(0), progress=False)
    recipe = SGDRecipe(6, 128, 0.05)  # soft targets need a few epochs to pay off; at 3 they have not yet
    torch.manual_seed(1)
    distilled = models.create("convnet-w8", 1, 10, 28)
    fit(distilled, real.train, recipe, torch.Generator().manual_seed(1), progress=False,
        objective=kd.kd_objective(teacher, kd.create_loss("hinton", temperature=2, alpha=0.9)))
    torch.manual_seed(1)
    independent = models.create("convnet-w8", 1, 10, 28)
    fit(independent, real.train, recipe, torch.Generator().manual_seed(1), progress=False)
    t = predict_logits(teacher, real.test.images)
    kd_agree = metrics.agreement(t, predict_logits(distilled, real.test.images))
    ind_agree = metrics.agreement(t, predict_logits(independent, real.test.images))
    assert kd_agree > ind_agree
