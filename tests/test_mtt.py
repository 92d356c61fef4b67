import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from kdd_mlflow import data, models
from kdd_mlflow.artifacts.experts import Trajectory, TrajectoryMeta, layout, save_trajectory
from kdd_mlflow.augment import DSA
from kdd_mlflow.distill.experts import flat_parameters, train_expert
from kdd_mlflow.distill.mtt import (
    FlatModel,
    SyntheticSet,
    Unroll,
    matching_gradients,
    matching_loss,
    minibatch_schedule,
    mtt_iteration,
    plan_steps,
    student_endpoint,
)
from kdd_mlflow.train import SGDRecipe


def tiny_problem(seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = models.create("convnet-w8-d2", 1, 4, 16).to(dtype)
    student = FlatModel(model)
    start = flat_parameters(model).to(dtype)
    target = start + 0.05 * torch.randn(start.shape, dtype=dtype)
    images = torch.randn(8, 1, 16, 16, dtype=dtype)
    labels = torch.arange(4).repeat_interleave(2)
    return student, start, target, images, labels


def test_matching_loss_by_hand():
    start, target, end = torch.tensor([0.0, 0.0]), torch.tensor([3.0, 4.0]), torch.tensor([3.0, 2.0])
    # ||end - target||^2 = 4, ||start - target||^2 = 25
    assert matching_loss(end, start, target).item() == pytest.approx(4 / 25)


def test_one_unrolled_step_equals_a_manual_sgd_step():
    student, start, _, images, labels = tiny_problem()
    lr = torch.tensor(0.1)
    end = student_endpoint(student, start, images, labels, lr, Unroll(syn_steps=1), None, torch.Generator())

    model = models.create("convnet-w8-d2", 1, 4, 16)
    torch.nn.utils.vector_to_parameters(start.clone(), model.parameters())
    F.cross_entropy(model(images), labels).backward()
    manual = torch.cat([(p - 0.1 * p.grad).detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(end.detach(), manual, rtol=1e-5, atol=1e-6)


def test_gradients_reach_images_and_step_size():
    student, start, target, images, labels = tiny_problem()
    lr = torch.tensor(0.05, requires_grad=True)
    x = images.clone().requires_grad_(True)
    end = student_endpoint(student, start, x, labels, lr, Unroll(syn_steps=3, batch_syn=4), DSA(),
                           torch.Generator().manual_seed(0))
    matching_loss(end, start, target).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert lr.grad is not None and lr.grad != 0


def test_iteration_updates_the_set_and_lowers_the_loss():
    student, start, target, images, labels = tiny_problem()
    syn = SyntheticSet(images, labels, syn_lr=0.05, lr_img=10.0, lr_lr=1e-4)
    before = syn.images.detach().clone()
    losses = [mtt_iteration(syn, student, start, target, Unroll(5), None, torch.Generator().manual_seed(0))[0]
              for _ in range(5)]
    assert not torch.equal(before, syn.images.detach())
    assert losses[-1] < losses[0]


def test_minibatch_schedule_covers_the_set_in_passes():
    steps = minibatch_schedule(10, Unroll(syn_steps=5, batch_syn=4), torch.Generator().manual_seed(0))
    assert [len(s) for s in steps] == [4, 4, 2, 4, 4]
    assert sorted(torch.cat(steps[:3]).tolist()) == list(range(10))


def test_non_finite_loss_skips_the_update_and_keeps_the_images():
    _, _, _, images, labels = tiny_problem()
    images[0, 0, 0, 0] = 0.0
    syn = SyntheticSet(images, labels, syn_lr=0.01, lr_img=1.0, lr_lr=1e-5)
    before, lr_before = syn.images.detach().clone(), syn.syn_lr.item()
    assert syn.update(syn.images.sum() * float("nan")) is False
    assert syn.update(syn.images.sum() * float("inf")) is False
    assert syn.update(syn.images.abs().sqrt().sum() * syn.syn_lr) is False  # finite loss, infinite gradient
    assert torch.equal(syn.images.detach(), before) and syn.syn_lr.item() == lr_before
    assert syn.update((syn.images ** 2).sum() + syn.syn_lr) is True


def test_step_size_cannot_turn_negative():
    _, _, _, images, labels = tiny_problem()
    syn = SyntheticSet(images, labels, syn_lr=0.01, lr_img=1.0, lr_lr=10.0)
    assert syn.update(syn.images.sum() + syn.syn_lr * 100.0)  # a gradient step of -1000 on a step size of 0.01
    assert syn.syn_lr.item() == pytest.approx(1e-5)  # its floor


def test_a_spike_in_the_step_size_gradient_skips_the_update():
    _, _, _, images, labels = tiny_problem()
    syn = SyntheticSet(images, labels, syn_lr=0.1, lr_img=1.0, lr_lr=1e-5)
    for size in (1e-3, 2.0, -1.0, 1.0) * 3:  # the warm-up: never judged, even after a tiny first gradient
        before = syn.syn_lr.item()
        assert syn.update(syn.images.sum() + size * syn.syn_lr) is True and syn.skip_reason is None
        assert syn.syn_lr.item() == pytest.approx(before - 1e-5 * size, abs=3e-5)  # SGD with momentum
    assert syn.lr_grad_count == 12 and 1.0 < syn.lr_grad_scale < 1.2
    kept = {k: v.clone() if torch.is_tensor(v) else v for k, v in syn.state_dict().items()}
    images, lr, scale = syn.images.detach().clone(), syn.syn_lr.item(), syn.lr_grad_scale
    assert syn.update(syn.images.sum() + 8200.0 * syn.syn_lr) is False  # the jump seen at 20 unrolled steps
    assert syn.skip_reason == "spike"
    assert torch.equal(syn.images.detach(), images) and syn.syn_lr.item() == lr  # nothing moved
    assert syn.lr_grad_scale == pytest.approx(0.9 * scale + 0.1 * 100 * scale)  # fed the capped value
    assert syn.update(syn.images.sum() - 40.0 * syn.syn_lr) is True and syn.skip_reason is None
    again = SyntheticSet(images, labels, syn_lr=0.1, lr_img=1.0, lr_lr=1e-5)
    again.load_state_dict(kept)  # a resumed run knows the running mean too
    assert (again.lr_grad_scale, again.lr_grad_count) == (scale, 12)
    assert again.update(again.images.sum() + 8200.0 * again.syn_lr) is False
    # a lasting change of scale is accepted after two skipped updates
    assert [again.update(again.images.sum() + 1e4 * again.syn_lr) for _ in range(3)] == [False, True, True]


def test_expert_snapshots_are_copies(fake_fashion):
    real = data.load("fashion-mnist", fake_fashion, val_size=100)
    model = models.create("convnet-w8-d2", 1, 10, 28)
    trajectory, acc = train_expert(model, real.train, real.test, SGDRecipe(3, 128, 0.01, 0, 0, "constant"),
                                   torch.Generator().manual_seed(0), None, progress=False)
    assert trajectory.shape == (4, models.count_parameters(model))
    assert all(not torch.equal(trajectory[e], trajectory[e + 1]) for e in range(3))
    assert torch.equal(trajectory[-1], flat_parameters(model))
    assert 0 <= acc <= 1


def test_trajectory_round_trip_and_checks(tmp_path):
    model = models.create("convnet-w8-d2", 1, 4, 16)
    meta = TrajectoryMeta("mnist", "convnet-w8-d2", 2, False, layout(model), 0, 0.5)
    traj = torch.randn(3, meta.num_params)
    save_trajectory(tmp_path / "e.safetensors", traj, meta)
    loaded = Trajectory(tmp_path / "e.safetensors", expect={"dataset": "mnist"})
    assert torch.equal(loaded.epoch(2), traj[2]) and loaded.meta == meta
    with pytest.raises(ValueError, match="dataset is 'mnist', expected 'cifar10'"):
        Trajectory(tmp_path / "e.safetensors", expect={"dataset": "cifar10"})
    with pytest.raises(IndexError):
        loaded.epoch(3)
    save_file({"trajectory": traj[:2].contiguous()}, str(tmp_path / "short.safetensors"),
              metadata={"kdd": json.dumps(meta.__dict__)})
    with pytest.raises(ValueError, match="expected F32"):
        Trajectory(tmp_path / "short.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "e.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable trajectory"):
        Trajectory(tmp_path / "cut.safetensors")


def test_zca_inverse_recovers_images():
    x = torch.randn(200, 1, 6, 6) * torch.linspace(0.5, 2, 36).view(1, 1, 6, 6)
    zca = data.ZCA.fit(x)
    torch.testing.assert_close(zca.inverse(zca(x)), x, rtol=1e-3, atol=1e-3)
    white = zca(x).flatten(1)
    assert white.std(0).max() < x.flatten(1).std(0).max()


@pytest.mark.parametrize("augment", [None, DSA()], ids=["plain", "dsa"])
def test_recompute_gives_the_unrolled_gradients(augment):
    student, start, target, images, labels = tiny_problem(dtype=torch.float64)
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    x = images.clone().requires_grad_(True)
    unroll = Unroll(syn_steps=6, batch_syn=4)
    got = {mode: matching_gradients(mode, student, start, target, x, labels, lr, unroll, augment,
                                    torch.Generator().manual_seed(3))
           for mode in ("unrolled", "recompute", "first-order")}
    (loss_u, (gx_u, ga_u)), (loss_r, (gx_r, ga_r)) = got["unrolled"], got["recompute"]
    assert loss_r.item() == pytest.approx(loss_u.item(), rel=1e-12)
    assert ((gx_r - gx_u).norm() / gx_u.norm()).item() < 1e-6
    assert abs((ga_r - ga_u).item()) / abs(ga_u.item()) < 1e-6
    _, (gx_f, _) = got["first-order"]
    assert 1e-6 < ((gx_f - gx_u).norm() / gx_u.norm()).item() < 1  # an approximation, but a close one


def test_augmentation_replay_is_exact():
    dsa = DSA()
    images = torch.randn(6, 3, 16, 16)
    for seed in range(12):  # every group comes up
        step = plan_steps(images, Unroll(syn_steps=1), dsa, torch.Generator().manual_seed(seed))[0]
        once = dsa.apply(images[step.idx], step.draw)
        torch.testing.assert_close(dsa.apply(images[step.idx], step.draw), once, rtol=0, atol=0)
        # and the plan draws exactly what the augmentation draws when called directly
        g = torch.Generator().manual_seed(seed)
        idx = minibatch_schedule(6, Unroll(syn_steps=1), g)[0]
        torch.testing.assert_close(dsa(images[idx], g), once, rtol=0, atol=0)


def test_first_order_lowers_the_matching_loss():
    student, start, target, images, labels = tiny_problem()
    syn = SyntheticSet(images, labels, syn_lr=0.05, lr_img=10.0, lr_lr=1e-4)
    losses = [mtt_iteration(syn, student, start, target, Unroll(5), DSA(), torch.Generator().manual_seed(0),
                            mode="first-order")[0] for _ in range(6)]
    assert losses[-1] < losses[0]


def test_unknown_matching_mode_is_refused():
    student, start, target, images, labels = tiny_problem()
    with pytest.raises(ValueError, match="unknown matching mode 'fast'"):
        matching_gradients("fast", student, start, target, images, labels, torch.tensor(0.1), Unroll(1), None,
                           torch.Generator())


def soft_problem():
    student, start, target, images, labels = tiny_problem(dtype=torch.float64)
    soft = F.one_hot(labels, 4).to(torch.float64) * 3 + 0.1 * torch.randn(len(labels), 4, dtype=torch.float64)
    return student, start, target, images, soft


@pytest.mark.parametrize("augment", [None, DSA()], ids=["plain", "dsa"])
def test_learned_labels_get_the_same_gradient_by_recompute_as_unrolled(augment):
    student, start, target, images, soft = soft_problem()
    got = {}
    for mode in ("unrolled", "recompute"):
        x, y = images.clone().requires_grad_(True), soft.clone().requires_grad_(True)
        lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
        got[mode] = matching_gradients(mode, student, start, target, x, y, lr, Unroll(syn_steps=5, batch_syn=4),
                                       augment, torch.Generator().manual_seed(2))[1]
    assert len(got["unrolled"]) == 3 and got["unrolled"][2].shape == soft.shape
    for a, b in zip(got["recompute"], got["unrolled"], strict=True):
        assert ((a - b).norm() / b.norm()).item() < 1e-6
    assert got["unrolled"][2].abs().sum() > 0


def test_soft_labels_reach_the_inner_loss():
    """The student's endpoint moves with the soft labels; one-hot-like soft labels approach the hard ones."""
    student, start, _, images, soft = soft_problem()
    hard = soft.argmax(1)
    lr = torch.tensor(0.1, dtype=torch.float64)
    end = {name: student_endpoint(student, start, images, y, lr, Unroll(3), None, torch.Generator().manual_seed(0))
           for name, y in (("hard", hard), ("soft", soft), ("sharp", F.one_hot(hard, 4).double() * 40))}
    assert (end["soft"] - end["hard"]).norm() > 1e-4
    assert (end["sharp"] - end["hard"]).norm() < 1e-6 * end["hard"].norm()


def test_learned_labels_are_updated_and_hard_ones_refused():
    student, start, target, images, soft = soft_problem()
    syn = SyntheticSet(images, soft, syn_lr=0.05, lr_img=10.0, lr_lr=1e-4, learn_labels=True, lr_label=5.0)
    before = syn.labels.detach().clone()
    _, applied = mtt_iteration(syn, student, start, target, Unroll(4), DSA(), torch.Generator().manual_seed(0),
                               mode="recompute")
    assert applied and (syn.labels.detach() - before).abs().max() > 0
    state = syn.state_dict()
    again = SyntheticSet(images, soft, syn_lr=0.05, lr_img=10.0, lr_lr=1e-4, learn_labels=True)
    again.load_state_dict(state)
    torch.testing.assert_close(again.labels.detach(), syn.labels.detach())
    with pytest.raises(ValueError, match="only soft"):
        SyntheticSet(images, soft.argmax(1), 0.05, 10.0, 1e-4, learn_labels=True)
