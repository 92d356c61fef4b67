"""The matching engine's gradients: the compiled step functions against the eager ones, and today's
formulation against the one of commit d5c93dd (a reference point of the speed work), in float64, on the CPU and,
where there is one, on a CUDA device."""

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from kdd_mlflow import models
from kdd_mlflow.distill.experts import flat_parameters
from kdd_mlflow.distill.mtt import FlatModel

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "d5c93dd"

# One small problem, built the same way by this tree and by the reference's package (run in a subprocess).
PROBLEM = """
import sys, torch
from kdd_mlflow import models
from kdd_mlflow.augment import DSA
from kdd_mlflow.distill.mtt import FlatModel, Unroll, matching_gradients
torch.manual_seed(0)
model = models.create("convnet-w8-d2", 1, 4, 16).to(torch.float64)
start = torch.cat([p.detach().flatten() for p in model.parameters()])
target = start + 0.05 * torch.randn(start.shape, dtype=torch.float64)
images = torch.randn(8, 1, 16, 16, dtype=torch.float64)
labels = torch.arange(4).repeat_interleave(2)
model, start, target, images, labels = (t.to(DEVICE) for t in (model, start, target, images, labels))
"""
GRADIENTS = """
out = {}
student = FlatModel(model, **COMPILE)
for mode in MODES:
    for name, augment in (("plain", None), ("dsa", DSA())):
        x = images.clone().requires_grad_(True)
        lr = torch.tensor(0.05, dtype=torch.float64, device=x.device, requires_grad=True)
        loss, (gx, ga) = matching_gradients(mode, student, start, target, x, labels, lr,
                                            Unroll(syn_steps=6, batch_syn=4), augment, torch.Generator().manual_seed(3))
        out[f"{mode}-{name}"] = tuple(t.detach().cpu() for t in (loss, gx, ga.reshape(())))
"""


def gradients(compile_kwargs: dict, modes=("unrolled", "recompute"), device: str = "cpu") -> dict:
    scope: dict = {"COMPILE": compile_kwargs, "MODES": modes, "DEVICE": device}
    exec(PROBLEM + GRADIENTS, scope)
    return scope["out"]


def assert_same(got: dict, want: dict, rel: float) -> None:
    assert got.keys() == want.keys()
    for key in want:
        for name, a, b in zip(("loss", "images", "step size"), got[key], want[key], strict=True):
            err = ((a - b).norm() / b.norm()).item()
            assert err < rel, f"{key}: {name} gradient differs by {err:.2e} (relative)"


@pytest.fixture(scope="module")
def eager() -> dict:
    return gradients({})


@pytest.mark.slow
def test_compiled_step_functions_give_the_eager_gradients(eager):
    """torch.func + torch.compile (the recompute sweeps): the same matching loss and gradients as eager
    autograd, to rounding."""
    compiled = gradients({"compile": True}, modes=("recompute",))
    assert_same(compiled, {k: v for k, v in eager.items() if k.startswith("recompute")}, rel=1e-10)


def reference_package(tmp: Path) -> Path | None:
    """The reference commit's package: from git, or where the tree travels without its history, from ``.ref/d5c93dd``
    (``git archive d5c93dd kdd_mlflow | tar -x -C .ref/d5c93dd``, as for benchmarks/compare_ref.py --ref-dir)."""
    exported = ROOT / ".ref" / REFERENCE
    if (exported / "kdd_mlflow").is_dir():
        return exported
    archive = tmp / "ref.tar"
    done = subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), REFERENCE, "kdd_mlflow"], cwd=ROOT,
                          capture_output=True)
    if done.returncode != 0:
        return None
    with tarfile.open(archive) as tar:
        tar.extractall(tmp / "ref", filter="data")
    return tmp / "ref"


def test_gradients_equal_those_of_the_reference_commit(eager, tmp_path, device):
    """Image and step-size gradients equal those of d5c93dd to 1e-6 relative, with and without DSA."""
    package = reference_package(tmp_path)
    if package is None:
        pytest.skip(f"commit {REFERENCE} is not in this clone's history")
    saved = tmp_path / "ref.pt"
    setup = f"COMPILE, MODES, DEVICE = {{}}, ('unrolled', 'recompute'), {device!r}\n"
    script = setup + PROBLEM + GRADIENTS + f"torch.save(out, {str(saved)!r})\n"
    done = subprocess.run([sys.executable, "-c", script], cwd=package, capture_output=True, text=True,
                          env={"PYTHONPATH": str(package), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    reference = torch.load(saved, weights_only=True)
    assert_same(eager if device == "cpu" else gradients({}, device=device), reference, rel=1e-6)


def test_step_functions_agree_with_autograd_by_hand():
    """FlatModel.step_pullback: g, H lam and (dg/dx)^T lam as autograd gives them directly."""
    torch.manual_seed(1)
    model = models.create("convnet-w4-d1", 1, 3, 8).to(torch.float64)
    student = FlatModel(model)
    theta = flat_parameters(model).to(torch.float64)
    x, y = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    lam = torch.randn_like(theta)
    g, pullback = student.step_pullback(theta, x, y)
    h, gx, none = pullback(lam)
    assert none is None  # hard labels: no label gradient
    t, xx = theta.clone().requires_grad_(True), x.clone().requires_grad_(True)
    direct = torch.autograd.grad(torch.nn.functional.cross_entropy(student(t, xx), y), t, create_graph=True)[0]
    torch.testing.assert_close(g, direct.detach())
    want_h, want_gx = torch.autograd.grad((direct * lam).sum(), (t, xx))
    torch.testing.assert_close(h, want_h)
    torch.testing.assert_close(gx, want_gx)
    # and step_grad carries a graph only when asked to
    assert not student.step_grad(theta, x, y).requires_grad
    assert student.step_grad(theta.clone().requires_grad_(True), x, y).requires_grad


def test_compiled_engine_is_refused_for_the_unrolled_loop_and_without_a_compiler(monkeypatch):
    from pydantic import ValidationError

    from kdd_mlflow.config import DistillConfig
    from kdd_mlflow.distill import mtt

    with pytest.raises(ValidationError, match="engine 'compiled' serves matching 'recompute'"):
        DistillConfig(experts_run="abc", engine="compiled", matching="unrolled")
    assert DistillConfig(experts_run="abc", engine="compiled", matching="recompute").engine == "compiled"
    monkeypatch.setattr(mtt.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler"):
        mtt.use_compiler("compiled", "cpu")
    assert mtt.use_compiler("eager", "cpu") is False
