"""Configuration: one pydantic model per stage.

Every field is a command-line option of the stage and an MLproject parameter; the resolved model is
logged as params and config.json. Invalid values fail here, before any work, with a one-line reason.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kdd_mlflow import data, models


class StageConfig(BaseModel):
    """Fields every stage shares."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    dataset: str = Field("fashion-mnist", description="mnist, fashion-mnist, cifar10 or cifar100")
    data_dir: str | None = Field(None, description="directory searched first for the dataset's files")
    device: str = Field("auto", description="auto (cuda, then mps, then cpu), or a torch device name")
    seed: int = Field(0, ge=0, description="seed for every random draw of the run")
    val_size: int = Field(5000, ge=10, description="training images held out for validation")
    train_limit: int | None = Field(
        None, ge=10, description="use only this many training images (evenly per class); for quick checks"
    )

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        data.info(v)
        return v

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        if v != "auto" and v.split(":")[0] not in {"cpu", "cuda", "mps"}:
            raise ValueError(f"unknown device {v!r}; use auto, cpu, cuda, cuda:N or mps")
        return v


class TrainConfig(StageConfig):
    """Supervised training of one model on real data (teachers and baselines)."""

    model: str = Field("convnet", description="registry name, e.g. convnet, convnet-w32, resnet18")
    epochs: int = Field(10, ge=1, description="passes over the training set")
    batch_size: int = Field(256, ge=1, description="images per SGD step")
    lr: float = Field(0.01, gt=0, description="initial learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="L2 weight decay")
    schedule: Literal["cosine", "step", "constant"] = Field(
        "cosine", description="learning-rate schedule: cosine to zero, halve at half-time (step), constant"
    )
    augment: Literal["none", "dsa"] = Field("none", description="training augmentation")

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        return models.check_name(v)


def one_line(error: ValidationError) -> str:
    """A pydantic error as one line: ``field: reason; field: reason``."""
    parts = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown parameter"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)
