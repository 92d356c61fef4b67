"""Look-ups across the formats: the input space of any run that has one."""

from __future__ import annotations

from kdd_mlflow import tracking
from kdd_mlflow.artifacts import experts, model, synthetic
from kdd_mlflow.artifacts.space import InputSpace


def input_space(run_id: str) -> InputSpace:
    """The input space of an experts, distill or model (train, teacher, kd) run."""
    run = tracking.require_run(run_id, "run with an input space", ("experts", "distill", *model.STAGES))
    stage = run.data.tags.get(tracking.STAGE_TAG)
    if stage == "experts":
        return experts.stored_space(run_id, tracking.load_json(run_id, experts.MANIFEST))
    if stage == "distill":
        return synthetic.load(run_id).space
    return model.load(run_id).space
