"""Backtrack options of the best published recipes: the adversarial term (`method.adversarial`),
the learning-rate warm-up, and the baseline that separates the path from a warm fake score.
Declared here, as one group, and mixed into `BacktrackConfig`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

Weight = Annotated[float, Field(ge=0, le=1e6)]


class RecipeFields(BaseModel):
    adversary: Literal["none", "dmd2", "sida"] = Field(
        "none",
        description="a discriminator on the fake side, trained on --data against generator "
        "samples: dmd2 (a classifier head on the fake score's features) or sida (the fake "
        "score's encoder itself; --loss sid); none: score distillation alone",
    )
    gan_weight_g: Weight | None = Field(
        None,
        description="weight of the generator's adversarial term; none: dmd2 3e-3 (DMD2 "
        "ImageNet-64), sida 1e-4 (SiDA's lsg_gan / lsg)",
    )
    gan_weight_d: Weight | None = Field(
        None,
        description="weight of the discriminator's loss beside the fake score's DSM loss; "
        "none: dmd2 1e-2 (DMD2), sida 1 (SiDA's lsd)",
    )
    head_features: Literal["encoder", "middle", "hidden"] | None = Field(
        None,
        description="where the discriminator reads the fake score: encoder (U-Nets' encoder "
        "output, DMD2 for EDM), middle (after the middle blocks) or hidden (an MLP's last "
        "hidden layer); none: the network's first",
    )
    gan_max_level: Annotated[int, Field(ge=1, le=1000)] | None = Field(
        None,
        description="dmd2: the discriminator's noise levels, a uniform index below this of "
        "1000 Karras levels (DMD2's diffusion_gan_max_timestep); none: 1000",
    )
    lr_head: Annotated[float, Field(gt=0, le=1)] | None = Field(
        None, description="dmd2: the classifier head's learning rate; none: --lr-fake (DMD2)"
    )
    f_divergence: Literal["rkl", "kl", "js", "sf", "sh", "jf"] | None = Field(
        None,
        description="f-distill: weigh each sample's vsd/dmd update by h(r) of the dmd2 "
        "head's density-ratio estimate (rkl: 1, plain vsd/dmd; kl, js, sf, sh: squared "
        "Hellinger, jf: Jeffreys)",
    )
    warmup: Annotated[int, Field(ge=0, le=10**9)] = Field(
        0,
        description="linear learning-rate warm-up of both networks over N iterations "
        "(iteration k at k/N; DMD2 and DisBack: 500)",
    )
    warm_fake: bool = Field(
        False,
        description="--no-trajectory: start the fake score at the path's node N (DisBack's "
        "head start) instead of the teacher, so a comparison separates the path from a warm "
        "fake score",
    )
