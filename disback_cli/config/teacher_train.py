"""What `disback teacher train` trains: a built-in teacher, from its exact data set."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from disback_cli.config import Batch, Count, Iters, PMean, PStd, Rate, Seed, _Config


class TeacherTrainConfig(_Config):
    """Train a built-in teacher from scratch on its ground-truth data set."""

    dataset: str = Field(max_length=100, description="ground-truth data set, e.g. ring2d")
    arch: str = Field("mlp", max_length=100, description="network architecture")
    arch_kwargs: dict[str, Any] = Field(default_factory=dict, description="network kwargs")
    sigma_data: Annotated[float, Field(gt=0, le=1e3)] = Field(
        0.5, description="data standard deviation for EDM"
    )
    iters: Iters = Field(10000, description="training iterations")
    batch: Batch = Field(512, description="batch size")
    lr: Rate = Field(2e-3, description="peak learning rate (cosine decay to 0)")
    p_mean: PMean = Field(-1.2, description="log-normal sigma mean")
    p_std: PStd = Field(1.2, description="log-normal sigma std")
    conditional: bool = Field(False, description="condition on the data set's class labels")
    warmup: Count = Field(0, description="linear learning-rate warm-up iterations")
    ema_halflife_kimg: Annotated[float, Field(gt=0, le=1e9)] | None = Field(
        None, description="EMA half-life (none: off)"
    )
    ema_rampup: Annotated[float, Field(gt=0, le=1e3)] | None = Field(
        0.05, description="EMA ramp-up ratio"
    )
    seed: Seed = Field(0, description="random seed")
