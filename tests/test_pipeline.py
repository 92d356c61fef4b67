import os

import mlflow
import pytest
from click.testing import CliRunner

from kdd_mlflow import arms, cli, pipeline
from kdd_mlflow.arms import ARMS
from kdd_mlflow.config import STAGE_CONFIGS, CombinedConfig, parse_overrides

TINY = ",".join([
    "experts.model=convnet-w8-d2", "experts.num_experts=1", "experts.epochs=3",
    "distill.iterations=2", "distill.syn_steps=2", "distill.expert_epochs=1", "distill.max_start_epoch=2",
    "distill.eval_every=2", "distill.num_eval=1", "distill.eval_epochs=5",
    "teacher.epochs=2", "kd.epochs=2",
])


def tiny(fake_fashion, **kw) -> CombinedConfig:
    values = dict(dataset="fashion-mnist", data_dir=str(fake_fashion), val_size=100, budget="quick", ipc=2,
                  teacher_model="convnet-w16", student_model="convnet-w8", overrides=TINY, env_manager="local")
    return CombinedConfig(**{**values, **kw})


def children(parent_id: str) -> list:
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


@pytest.mark.slow
def test_combined_runs_every_arm_then_reuses_them(fake_fashion):
    parent_id = pipeline.run(tiny(fake_fashion))  # the local default: the chain alone, then arms in pairs
    parent = mlflow.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    kids = children(parent_id)
    assert len(kids) == 2 + len(ARMS)  # experts, distill, one run per arm
    assert all(k.info.status == "FINISHED" for k in kids)
    spans = {k.info.run_name: (k.info.start_time, k.info.end_time) for k in kids}

    def overlap(a, b):
        return spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]

    for chain in ("experts", "distill"):  # alone on every core
        assert not any(overlap(chain, other) for other in spans if other != chain)
    if (os.cpu_count() or 1) >= 2:
        arm_runs = [name for name in spans if "/" in name]
        assert any(overlap(a, b) for a in arm_runs for b in arm_runs if a < b)  # two arms side by side
    assert parent.data.tags["kdd.threads_per_stage"] == f"chain default, arms {max(1, (os.cpu_count() or 1) // 2)}"
    assert {k.data.tags.get("kdd.arm") for k in kids} == set(ARMS) | {None}
    assert {k.data.tags["kdd.stage"] for k in kids} == {"experts", "distill", "teacher", "kd"}
    assert {k.info.run_name for k in kids} == {f"{arm}/seed0" for arm in ARMS} | {"experts", "distill"}
    assert mlflow.get_experiment(parent.info.experiment_id).name == "kdd-fashion-mnist"
    assert {k.info.experiment_id for k in kids} == {parent.info.experiment_id}
    for arm in ARMS:
        assert 0 <= parent.data.metrics[f"test_acc/{arm}"] <= 1
        assert f"agreement/{arm}" in parent.data.metrics and f"kl/{arm}" in parent.data.metrics
    assert parent.data.metrics["agreement/teacher-full"] == 1.0
    assert parent.data.metrics["hlr"] == pytest.approx(parent.data.metrics["test_acc/student-full"]
                                                       - parent.data.metrics["test_acc/student-synthetic"])
    table = mlflow.MlflowClient().load_table(parent.info.experiment_id, "report/comparison.json", [parent_id])
    assert list(table["arm"]) == list(ARMS)
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(parent_id, "report")}
    assert {"report/comparison.csv", "report/comparison.md", "report/report.html"} <= names
    proposal = table[table["arm"] == "proposal"].iloc[0]
    assert proposal["train_images"] == 20 and proposal["data_compression"] == pytest.approx(1100 / 20)
    assert (proposal["family"], proposal["labels"]) == ("distilled set", "soft, teacher on distilled set")
    assert "| proposal | convnet-w8 |" in parent.data.tags["mlflow.note.content"]
    distill = next(k for k in kids if k.data.tags["kdd.stage"] == "distill")
    trained = next(k for k in kids if k.data.tags.get("kdd.arm") == "proposal")
    inputs = mlflow.get_run(trained.info.run_id).inputs.dataset_inputs
    assert {(d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"]) for d in inputs} == {
        (f"synthetic-{distill.info.run_id}", "training"), ("fashion-mnist-val", "validation"),
        ("fashion-mnist-test", "test")}

    again = pipeline.run(tiny(fake_fashion))
    assert children(again) == []  # nothing re-run: every stage was reused
    reused = set(mlflow.get_run(again).data.tags["kdd.reused_runs"].split(","))
    assert reused == {k.info.run_id for k in kids}

    forced = pipeline.run(tiny(fake_fashion, arms="student-full", force="teacher"))
    assert sorted(k.data.tags["kdd.arm"] for k in children(forced)) == ["student-full", "teacher-full"]


def test_bad_combined_input_fails_before_any_run(fake_fashion):
    for args, reason in [
        (["--arms", "proposal,nope"], "unknown arm(s) ['nope']"),
        (["--seeds", "0,0"], "distinct"),
        (["--overrides", "distill.nope=3"], "distill has no parameter 'nope'"),
        (["--overrides", "distill.iterations=abc"], "distill.iterations=abc"),
        (["--force", "everything"], "unknown stage(s) ['everything']"),
    ]:
        result = CliRunner().invoke(cli.main, ["combined", *args])
        assert result.exit_code == 2 and reason in result.stderr, result.stderr
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_combined_without_data_fails_at_once(tmp_path):
    result = CliRunner().invoke(cli.main, ["combined"])  # default dataset mnist, no copy, no network
    assert result.exit_code == 1 and "dataset 'mnist' is not available" in result.stderr
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_arm_dependencies_are_added():
    assert pipeline.selected_with_needs(["proposal"]) == ["teacher-full", "teacher-synthetic", "proposal"]
    assert pipeline.selected_with_needs(["student-subset"]) == ["teacher-full", "student-subset"]


def test_every_arm_comes_after_what_it_needs():
    order = list(ARMS)
    assert order[0] == arms.REFERENCE
    for i, arm in enumerate(ARMS.values()):
        assert all(order.index(need) < i for need in arm.needs), arm.name
    assert arms.with_needs(["proposal", "student-full"]) == ["student-full", "teacher-synthetic", "proposal"]


def test_arm_parameters_are_valid_stage_configs():
    context = arms.Context("convnet-w16", "convnet-w8", ipc=2, synthetic_run="D", eval_model="convnet-w32",
                           runs={name: f"run-{name}" for name in ARMS})
    params = {name: arm.params(context) for name, arm in ARMS.items()}
    for name, arm in ARMS.items():
        STAGE_CONFIGS[arm.stage](**params[name])  # what the stage's entry point will be given
    assert ARMS["proposal"].stage == "kd" and params["proposal"] == {
        "student": "convnet-w8", "teacher_run": "run-teacher-synthetic", "transfer": "synthetic", "synthetic_run": "D"}
    assert params["kd-subset"] == {"student": "convnet-w8", "teacher_run": "run-teacher-full", "transfer": "subset",
                                   "ipc": 2}
    assert ARMS["convnet-synthetic"].stage == "teacher"
    assert params["convnet-synthetic"] == {"model": "convnet-w32", "synthetic_run": "D"}
    assert params["student-subset"] == {"model": "convnet-w8", "ipc": 2}
    assert params["teacher-full"] == {"model": "convnet-w16"}


def test_arm_overrides_go_to_the_arms_stage():
    assert parse_overrides("proposal.epochs=3,teacher-synthetic.model=convnet") == {
        "proposal": {"epochs": "3"}, "teacher-synthetic": {"model": "convnet"}}
    with pytest.raises(ValueError, match="kd has no parameter 'model'"):
        parse_overrides("kd-full.model=convnet")


def test_params_logged_by_mlflow_run_match_the_config_values():
    from kdd_mlflow.tracking import same_value

    assert same_value("true", "True") and same_value("False", "false") and same_value("''", "")
    assert same_value("0.010", "0.01") and same_value("10", "10")
    assert not same_value("true", "False") and not same_value("1", "True") and not same_value("a", "b")
    # list values as typed after -P: what the config makes of them must match what `mlflow run` logged
    for key, typed in (("force", "teacher,kd"), ("force", "kd, teacher"), ("seeds", "1, 0"),
                       ("arms", "proposal, student-synthetic")):
        assert same_value(typed, str(getattr(CombinedConfig(**{key: typed}), key))), (key, typed)
    assert not same_value("0,1", "1,0") and not same_value("0,1", "0,1,2")
    from kdd_mlflow.tracking import given

    params = {"labels": "''", "budget.labels": "learned", "ipc": "10", "init": ""}
    assert given(params, "labels") is None and given(params, "init") is None and given(params, "seed") is None
    assert given(params, "budget.labels") == "learned" and given(params, "ipc") == "10"
