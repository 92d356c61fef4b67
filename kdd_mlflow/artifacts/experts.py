"""The experts buffer: one trajectory file per expert, a manifest, and the input space they trained in.

An experts run holds

- ``trajectories/expert_NNNN.safetensors``: a float32 tensor ``trajectory`` of shape (epochs + 1,
  num_params), the flattened parameters at initialisation and after each epoch, with metadata naming
  the dataset, model and parameter layout (checked on every load);
- ``manifest.json``: the run's settings, the finished experts, and the input space's spec;
- ``space/input_space.safetensors``: the ZCA whitening the experts trained on, when they did.

Several runs (shards) make one buffer when their manifests and input spaces agree.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from kdd_mlflow import tracking
from kdd_mlflow.artifacts.space import InputSpace

TRAJECTORY_DIR = "trajectories"
MANIFEST = "manifest.json"
SPACE_FILE = "space/input_space.safetensors"
# Keys that must agree between the runs of one buffer.
BUFFER_KEYS = ("dataset", "model", "epochs", "lr_teacher", "zca", "num_params", "train_limit", "val_size")


def expert_file(index: int) -> str:
    return f"expert_{index:04d}.safetensors"


def layout(model: nn.Module) -> list[list]:
    """[[name, shape], ...] of the parameters, in flattening order (JSON-ready)."""
    return [[name, list(p.shape)] for name, p in model.named_parameters()]


@dataclass
class TrajectoryMeta:
    dataset: str
    model: str
    epochs: int
    zca: bool
    layout: list[list]
    index: int
    test_acc: float

    @property
    def num_params(self) -> int:
        return sum(int(torch.tensor(shape).prod()) for _, shape in self.layout)


def save_trajectory(path: str | Path, trajectory: torch.Tensor, meta: TrajectoryMeta) -> None:
    save_file({"trajectory": trajectory.contiguous()}, str(path), metadata={"kdd": json.dumps(meta.__dict__)})


class Trajectory:
    """A stored trajectory, read lazily: only the epochs asked for are loaded."""

    def __init__(self, path: str | Path, expect: dict | None = None):
        self.path = Path(path)
        try:
            with safe_open(str(self.path), framework="pt") as f:
                raw = f.metadata() or {}
                self.shape = tuple(f.get_slice("trajectory").get_shape())
                dtype = f.get_slice("trajectory").get_dtype()
            self.meta = TrajectoryMeta(**json.loads(raw["kdd"]))
        except Exception as exc:
            raise ValueError(f"{self.path.name}: not a readable trajectory file ({exc})") from None
        if dtype != "F32" or self.shape != (self.meta.epochs + 1, self.meta.num_params):
            raise ValueError(
                f"{self.path.name}: trajectory is {dtype} {self.shape}, expected F32 "
                f"({self.meta.epochs + 1}, {self.meta.num_params})"
            )
        for key, want in (expect or {}).items():
            have = getattr(self.meta, key)
            if have != want:
                raise ValueError(f"{self.path.name}: {key} is {have!r}, expected {want!r}")

    def epoch(self, e: int) -> torch.Tensor:
        """Flat parameters after epoch ``e`` (0 = initialisation)."""
        if not 0 <= e <= self.meta.epochs:
            raise IndexError(f"{self.path.name} has epochs 0..{self.meta.epochs}, asked for {e}")
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_slice("trajectory")[e]


# --- writing, inside the experts run -------------------------------------------------------------------------


def log_trajectory(trajectory: torch.Tensor, meta: TrajectoryMeta) -> str:
    """Log one expert's trajectory to the active run; return its file name."""
    name = expert_file(meta.index)
    with tempfile.TemporaryDirectory() as tmp:
        save_trajectory(Path(tmp) / name, trajectory, meta)
        mlflow.log_artifact(str(Path(tmp) / name), TRAJECTORY_DIR)
    return name


def log_manifest(settings: dict, space: InputSpace, meta: TrajectoryMeta, done: dict[int, dict]) -> None:
    """The run's manifest: ``settings`` (dataset, model, epochs, ...), the layout and the finished experts."""
    mlflow.log_dict({**settings, "zca": space.zca is not None, "space": space.spec(), "num_params": meta.num_params,
                     "dtype": "float32", "layout": meta.layout, "experts": [done[k] for k in sorted(done)]}, MANIFEST)


def log_space(space: InputSpace) -> None:
    """Store the whitening matrix of the active experts run (nothing without ZCA)."""
    if space.zca is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(SPACE_FILE).name
        save_file(space.tensors(), str(path), metadata={"kdd": json.dumps(space.spec())})
        mlflow.log_artifact(str(path), str(Path(SPACE_FILE).parent))


# --- reading ------------------------------------------------------------------------------------------------


def existing_experts(run_id: str) -> dict[int, dict]:
    """Manifest entries of the experts a run already holds."""
    names = {Path(a.path).name for a in mlflow.MlflowClient().list_artifacts(run_id, TRAJECTORY_DIR)}
    try:
        manifest = mlflow.artifacts.load_dict(f"runs:/{run_id}/{MANIFEST}")
    except Exception:
        return {}
    return {e["index"]: e for e in manifest.get("experts", []) if e["file"] in names}


def stored_space(run_id: str, manifest: dict, directory: str | Path | None = None) -> InputSpace:
    """The input space an experts run trained in, with its stored whitening matrix."""
    spec = manifest.get("space")
    if spec is None:  # a run from before input spaces were stored: only an unwhitened one is usable
        if manifest.get("zca"):
            raise tracking.ArtifactError(f"run {run_id}: experts run whitened its data but stored no whitening "
                                         "matrix (an older run); train a new experts run")
        spec = {"dataset": manifest["dataset"], "zca": False}
    if not spec.get("zca"):
        return InputSpace(spec["dataset"])
    tensors = tracking.load_tensors(run_id, SPACE_FILE, directory)
    try:
        return InputSpace.from_stored(spec, tensors)
    except ValueError as exc:
        raise tracking.ArtifactError(f"run {run_id}: {SPACE_FILE}: {exc}") from None


def read_manifest(run_id: str) -> dict:
    """The manifest of one experts run, its experts tagged with the run id."""
    tracking.require_run(run_id, "experts run", ("experts",))
    m = tracking.load_json(run_id, MANIFEST)
    for e in m["experts"]:
        e["run_id"] = run_id
    return m


def merge_manifests(manifests: dict[str, dict]) -> dict:
    """One buffer's manifest from its runs' manifests (run id -> manifest), checking they agree."""
    first_id, merged = next(iter(manifests.items()))
    merged = {**merged, "experts": list(merged["experts"])}
    for run_id, m in list(manifests.items())[1:]:
        for key in BUFFER_KEYS:
            if m.get(key) != merged.get(key):
                raise tracking.ArtifactError(
                    f"experts run {run_id} has {key}={m.get(key)!r}, but {first_id} has {merged.get(key)!r}"
                )
        merged["experts"] += m["experts"]
    if not merged["experts"]:
        raise tracking.ArtifactError(f"experts run(s) {', '.join(manifests)} hold no finished experts")
    return merged


def load_manifests(run_ids: list[str]) -> dict:
    """Merge the manifests of one or more experts runs, checking they describe one buffer."""
    return merge_manifests({run_id: read_manifest(run_id) for run_id in run_ids})


class ExpertsBuffer:
    """The trajectories of one or more experts runs, downloaded once and read lazily per segment, and the
    one input space they share."""

    def __init__(self, run_ids: list[str], directory: Path):
        manifests = {run_id: read_manifest(run_id) for run_id in run_ids}
        self.manifest = merge_manifests(manifests)
        spaces = {run_id: stored_space(run_id, m, directory / run_id) for run_id, m in manifests.items()}
        self.space = spaces[run_ids[0]]
        for run_id, space in spaces.items():
            if not space.agrees_with(self.space):
                raise tracking.ArtifactError(f"experts run {run_id} trained in {space.describe()}, but "
                                             f"{run_ids[0]} in {self.space.describe()}; they are not one buffer")
        self.trajectories = []
        m = self.manifest
        expect = {"dataset": m["dataset"], "model": m["model"], "epochs": m["epochs"]}
        for e in m["experts"]:
            path = tracking.download(e["run_id"], f"{TRAJECTORY_DIR}/{e['file']}", directory / e["run_id"])
            try:
                self.trajectories.append(Trajectory(path, expect))
            except ValueError as exc:
                raise tracking.ArtifactError(f"run {e['run_id']}: {exc}") from None

    def final_expert(self, k: int = 0) -> torch.Tensor:
        """Expert ``k``'s flat parameters after its last epoch."""
        trajectory = self.trajectories[k]
        return trajectory.epoch(trajectory.meta.epochs)

    def segment(self, generator: torch.Generator, max_start_epoch: int, expert_epochs: int, min_start_epoch: int = 0):
        """A random expert's parameters at a random start epoch in [min_start_epoch, max_start_epoch) and
        ``expert_epochs`` later."""
        expert = self.trajectories[int(torch.randint(len(self.trajectories), (1,), generator=generator))]
        start = min_start_epoch + int(torch.randint(max_start_epoch - min_start_epoch, (1,), generator=generator))
        return expert.epoch(start), expert.epoch(start + expert_epochs)
