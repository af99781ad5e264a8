"""The adversarial term on the fake side: the fake score network, trained on real data (`--data`)
against generator samples, doubles as a discriminator, and the generator gets a GAN term beside
its distillation loss (`--adversary`).

- `dmd2` (DMD2): a classifier head (`models.networks.heads`) reads the fake score's
  lowest-resolution features; head and fake score train together on DSM + w_d x the
  non-saturating logistic loss, real and generated images each noised at their own level of the
  "diffusion GAN" (a uniform index of 1000 Karras levels below --gan-max-level); the generator
  adds w_g x softplus(-logit) of its samples, freshly noised.
- `sida` (SiDA, for --loss sid): no head; the channel mean of the fake score's encoder output is
  a logit per location. Real data is noised at the fake's DSM level with the same noise; its loss
  is w_d x mean(lambda(sigma)) x the mean binary cross-entropy; the generator adds w_g x the
  cross-entropy of its samples (logits clamped to +-10) at the SiD loss's own noised sample,
  normalised per sample as the SiD loss is.
- `--f-divergence` (f-distill): the VSD/DMD update of each sample weighted by h(r), r = exp(logit)
  the head's density-ratio estimate at the loss's noised sample, clipped to [0.1, 20], h divided
  by its batch mean.

Every draw of the term (real data, its noise levels and noise) comes from a stream seeded by
(seed, iteration), so adding it leaves the run's own stream as it was and a resume needs no
state for it. Losses are written in the fake's units: DMD2's adds to the DSM loss as DMD2 adds
it; SiDA's sums over pixels where disback's DSM loss averages, so its weights are divided by the
values per sample to keep SiDA's proportions (docs/method.md).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from disback_cli.errors import ConfigError
from disback_cli.method.data import DataSource
from disback_cli.method.dsm import apply_gradients, denoising_weight, generator_denoising_loss
from disback_cli.method.losses import GENERATOR_LOSSES, GeneratorLossOutput, SiDLoss
from disback_cli.method.noise import KARRAS_LEVELS
from disback_cli.models.networks import eval_mode
from disback_cli.models.networks.heads import ClassifierHead
from disback_cli.models.precond import sigma_like
from disback_cli.runtime.parallel import Execution
from disback_cli.store.fileio import atomic_write_chunks
from disback_cli.store.layout import checkpoint_file
from disback_cli.store.manifests import DataRecord, FileRef
from disback_cli.store.tensorfile import safetensors_chunks

# h(r) of f-distill for each f-divergence (r = p_data / q_G); rkl is VSD's/DMD's own weight.
F_DIVERGENCES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "rkl": torch.ones_like,
    "kl": lambda r: r,
    "js": lambda r: 1 - 1 / (1 + r),
    "sf": lambda r: 1 / (1 + r),
    "sh": torch.sqrt,  # squared Hellinger
    "jf": lambda r: 1 + r,  # Jeffreys
}
RATIO_CLIP = (0.1, 20.0)  # f-distill's bounds on the estimated density ratio
LOGIT_CLAMP = 10.0  # f-distill and SiDA clamp logits to +-10 before using them


def f_divergence_weights(logits: torch.Tensor, divergence: str, ex: Execution) -> torch.Tensor:
    """Per-sample weights h(r) / mean h(r) over the global batch, r = clip(exp(logit))."""
    r = logits.detach().float().clamp(-LOGIT_CLAMP, LOGIT_CLAMP).exp().clamp(*RATIO_CLIP)
    h = F_DIVERGENCES[divergence](r)
    return h / (ex.mean(h.mean()) + 1e-6)


def dmd2_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """DMD2's classifier loss: softplus(logit of generated) + softplus(-logit of real)."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def dmd2_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """DMD2's non-saturating generator loss, softplus(-logit)."""
    return F.softplus(-fake_logits).mean()


def sida_discriminator_loss(real_logits, fake_logits, weight: torch.Tensor) -> torch.Tensor:
    """SiDA's: mean(lambda(sigma)) x (BCE(real, 1) + BCE(fake, 0)) / 2, each BCE a mean over
    every location of the batch."""
    bce = F.binary_cross_entropy_with_logits
    real = bce(real_logits, torch.ones_like(real_logits))
    fake = bce(fake_logits, torch.zeros_like(fake_logits))
    return weight.mean() * (real + fake) / 2


def sida_generator_loss(fake_logits: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """SiDA's: per sample the BCE(logit clamped to +-10, 1) over its locations divided by the SiD
    loss's normaliser mean |x - D_target|, averaged over the batch."""
    logits = fake_logits.clamp(-LOGIT_CLAMP, LOGIT_CLAMP).flatten(1)
    per_sample = F.binary_cross_entropy_with_logits(
        logits, torch.ones_like(logits), reduction="none"
    ).mean(dim=1)
    return (per_sample / scale).mean()


class NoAdversary:
    """Score distillation alone: nothing is added, and the run is exactly what it was."""

    description: ClassVar[str] = "--adversary"
    options: ClassVar[dict[str, Any]] = {}
    active: ClassVar[bool] = False
    data_record = None

    def __init__(self, cfg=None) -> None:
        pass

    def resolve(self, cfg, teacher, update: dict, sources: dict) -> None:
        if cfg.f_divergence is not None:
            raise ConfigError("--f-divergence weighs by a discriminator: add --adversary dmd2")

    def open_inputs(self, cfg, teacher) -> None:
        pass

    def attach(self, fake: nn.Module, trained: nn.Module, cfg, ex: Execution) -> nn.Module:
        """What of the fake side trains: `trained` (its network's weights or adapters), with
        what the adversary trains beside it (a head)."""
        return trained

    def groups(self, trained: nn.Module, rate: float, cfg) -> list[dict]:
        """The optimiser's parameter groups of `attach`'s module."""
        return [{"params": list(trained.parameters())}]

    def seed_step(self, step: int) -> None:
        pass

    def generator_loss(self, loss):
        return loss

    def fake_step(self, step: Callable) -> Callable:
        return step

    def logged(self) -> dict[str, torch.Tensor]:
        return {}

    def save(self, run_dir, step: int, info: dict, ex: Execution) -> dict[str, FileRef]:
        return {}


class _Discriminating(NoAdversary):
    """What both adversaries share: real data, the fake network's features, their own stream,
    the two weights, the generator-loss wrapper and the fake step."""

    options: ClassVar[dict[str, Any]] = {
        "data": None,
        "gan_weight_g": None,
        "gan_weight_d": None,
        "head_features": None,
        "gan_max_level": None,
    }
    active: ClassVar[bool] = True
    default_weights: ClassVar[tuple[float, float]]  # (generator, discriminator)
    weight_source: ClassVar[str]

    def __init__(self, cfg) -> None:
        self.cfg = cfg  # the run's (resolved by `build`)
        self.data: DataSource | None = None
        self._logged: dict[str, torch.Tensor] = {}

    def resolve(self, cfg, teacher, update: dict, sources: dict) -> None:
        if cfg.data is None:
            raise ConfigError(
                f"{self.description} learns from real data: give --data (builtin:NAME, an "
                "image folder, an EDM dataset zip; text-to-image teachers: captioned latents)"
            )
        points = getattr(teacher.denoiser.model, "feature_points", ())
        if not points:
            raise ConfigError(f"{self.description} cannot read this teacher network's features")
        if cfg.head_features is not None and cfg.head_features not in points:
            raise ConfigError(
                f"--head-features {cfg.head_features}: this network offers {', '.join(points)}"
            )
        defaults = {
            "gan_weight_g": self.default_weights[0],
            "gan_weight_d": self.default_weights[1],
            "head_features": (points[0], "the network's first feature point (DMD2: encoder)"),
            "gan_max_level": (KARRAS_LEVELS, "DMD2's diffusion GAN (every level)"),
        }
        for key, value in defaults.items():
            value, source = value if isinstance(value, tuple) else (value, self.weight_source)
            if getattr(cfg, key) is None:
                update[key], sources[key] = value, source

    def open_inputs(self, cfg, teacher) -> None:
        """Open --data as the teacher's family reads it (checked before the run writes), and
        take the noise levels the discriminator sees from the teacher."""
        self.data = teacher.family.open_real_data(cfg.data, teacher)
        self.levels = teacher.family.discriminator_levels(teacher, cfg.gan_max_level)

    @property
    def data_record(self) -> DataRecord:
        return DataRecord(**vars(self.data.ref))

    def attach(self, fake: nn.Module, trained: nn.Module, cfg, ex: Execution) -> nn.Module:
        self.fake, self.cfg, self.ex = fake, cfg, ex
        self.rng = torch.Generator(ex.device)
        self.weights = (cfg.gan_weight_g, cfg.gan_weight_d)
        return trained

    def seed_step(self, step: int) -> None:
        """This iteration's stream: a function of (seed, iteration) alone."""
        mixed = np.random.SeedSequence([self.cfg.seed, step, 0xAD]).generate_state(1, np.uint64)
        self.rng.manual_seed(int(mixed[0]) >> 1)

    def features(self, x_t, sigma, cond) -> torch.Tensor:
        return self.fake.features(x_t, sigma, self.cfg.head_features, **cond)

    def draw_real(self, n: int):
        real, cond = self.data.draw(n, self.rng, self.ex.device)
        return self.ex.local(real), cond.map(self.ex.local)

    def draw_noise(self, n: int, shape) -> tuple[torch.Tensor, torch.Tensor]:
        """Diffusion-GAN noise levels (a uniform index below --gan-max-level) and noise."""
        sigma = self.levels.sample(n, self.rng, self.ex.device)
        noise = torch.randn((n, *shape), generator=self.rng, device=self.ex.device)
        return self.ex.local(sigma), self.ex.local(noise)

    def frozen_fake(self):
        """The discriminator's weights (fake network and head) left out of the generator's
        backward pass."""
        return _Frozen(self.trained_with(self.fake))

    def generator_loss(self, loss):
        return _WithAdversary(loss, self)

    def note(self, **values: torch.Tensor) -> None:
        self._logged.update({key: value.detach() for key, value in values.items()})

    def logged(self) -> dict[str, torch.Tensor]:
        """The values since the last call, for the training log."""
        logged, self._logged = self._logged, {}
        return logged

    def fake_step(self, step: Callable) -> Callable:
        """The fake network's step with the discriminator's loss added (in place of `step`,
        `dsm.denoising_step`, whose draws it makes in the same order)."""

        def adversarial_step(
            denoiser, optimizer, generator, shape, conditions, levels, rng, clip=math.inf, ex=None
        ):
            ex = ex or Execution(rng.device)
            with ex.autocast():
                x0, sigma, noise, seen, loss = generator_denoising_loss(
                    denoiser, generator, shape, conditions, levels, rng, ex
                )
                loss_d = self.discriminator_loss(x0, seen, sigma, noise)
            self.note(loss_disc=loss_d)
            total = loss + self.weights[1] * loss_d
            norm = apply_gradients(total, self.trained_with(denoiser), optimizer, ex, clip)
            return loss.detach(), norm

        return adversarial_step


class _Frozen:
    """Context: the fake network's weights take no gradient (its input still passes one)."""

    def __init__(self, module: nn.Module) -> None:
        self.params = [p for p in module.parameters() if p.requires_grad]

    def __enter__(self) -> None:
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc) -> None:
        for p in self.params:
            p.requires_grad_(True)


class _WithAdversary:
    """A generator loss plus the adversary's generator term (and, with --f-divergence, the
    loss's per-sample weights from the discriminator)."""

    def __init__(self, loss, adversary: _Discriminating) -> None:
        self.loss, self.adversary, self.fake_side = loss, adversary, loss.fake_side

    def sample_sigma(self, n: int, rng: torch.Generator, device: torch.device) -> torch.Tensor:
        return self.loss.sample_sigma(n, rng, device)

    def __call__(self, x, sigma, noise, fake, target, cond) -> GeneratorLossOutput:
        out = self.loss(x, sigma, noise, fake, target, cond)
        term = self.adversary.generator_term(x, sigma, noise, cond, out)
        self.adversary.note(loss_gan_g=term)
        weighted = out.loss + self.adversary.weights[0] * term
        return GeneratorLossOutput(weighted, out.score_gap, out.sample_scale)


class DMD2Classifier(_Discriminating):
    """DMD2's classifier head on the fake score (module docstring)."""

    description: ClassVar[str] = "--adversary dmd2"
    options: ClassVar[dict[str, Any]] = {
        **_Discriminating.options,
        "lr_head": None,
        "f_divergence": None,
    }
    # DMD2's ImageNet-64 run: gen_cls_loss_weight 3e-3, cls_loss_weight 1e-2.
    default_weights: ClassVar[tuple[float, float]] = (3e-3, 1e-2)
    weight_source: ClassVar[str] = "DMD2 ImageNet-64 (gen_cls_loss_weight, cls_loss_weight)"

    def resolve(self, cfg, teacher, update: dict, sources: dict) -> None:
        super().resolve(cfg, teacher, update, sources)
        if cfg.f_divergence is not None and not hasattr(GENERATOR_LOSSES[cfg.loss], "weigh"):
            raise ConfigError(f"--f-divergence weighs VSD's or DMD's update, not --loss {cfg.loss}")

    def attach(self, fake: nn.Module, trained: nn.Module, cfg, ex: Execution) -> nn.Module:
        """The head beside the fake score's trained weights: one optimiser, one state entry."""
        super().attach(fake, trained, cfg, ex)
        # The feature map's shape, from one real sample with its conditions (own stream).
        probe, cond = self.data.draw(1, torch.Generator(ex.device).manual_seed(0), ex.device)
        with torch.no_grad(), eval_mode(fake):
            shape = self.features(probe, torch.ones(1, device=ex.device), cond).shape[1:]
        ex.layout.settle(fake)
        with torch.random.fork_rng(devices=[]):  # its own initialisation, from the seed
            torch.manual_seed(cfg.seed + 2)
            head = ClassifierHead(tuple(shape)).to(ex.device)
        self.head = ex.layout.hold_small(head.train().requires_grad_(True))
        self._trained = nn.ModuleList([fake, self.head])
        return nn.ModuleList([trained, self.head])

    def groups(self, trained: nn.Module, rate: float, cfg) -> list[dict]:
        """The fake score's weights at its rate, the head's at --lr-head (DMD2: the same)."""
        network, head = trained
        return [
            {"params": list(network.parameters())},
            {"params": list(head.parameters()), "lr": cfg.lr_head or rate},
        ]

    def generator_loss(self, loss):
        if self.cfg.f_divergence is not None:
            loss.weigh = self.ratio_weights
        return super().generator_loss(loss)

    def trained_with(self, denoiser) -> nn.Module:
        return self._trained

    def logits(self, x_t, sigma, cond) -> torch.Tensor:
        return self.head(self.features(x_t, sigma, cond))

    def ratio_weights(self, x_t, sigma, cond) -> torch.Tensor:
        """f-distill's h(r) at the loss's own noised sample."""
        with torch.no_grad():
            logits = self.logits(x_t, sigma, cond)
        weights = f_divergence_weights(logits, self.cfg.f_divergence, self.ex)
        # Their spread over the global batch (their mean is 1): how unequal the samples weigh.
        self.note(ratio_weight_std=(self.ex.mean((weights**2).mean()) - 1).clamp(min=0).sqrt())
        return weights

    def discriminator_loss(self, x0, cond, sigma, noise) -> torch.Tensor:
        n = self.ex.global_batch(x0.shape[0])
        real, real_cond = self.draw_real(n)
        logits = []
        for images, seen in ((real, real_cond), (x0.detach(), cond)):
            level, eps = self.draw_noise(n, x0.shape[1:])
            logits.append(self.logits(images + sigma_like(level, images) * eps, level, seen))
        return dmd2_discriminator_loss(*logits)

    def generator_term(self, x, sigma, noise, cond, out) -> torch.Tensor:
        level, eps = self.draw_noise(self.ex.global_batch(x.shape[0]), x.shape[1:])
        with self.frozen_fake():
            logits = self.logits(x + sigma_like(level, x) * eps, level, cond)
        return dmd2_generator_loss(logits)

    def save(self, run_dir, step: int, info: dict, ex: Execution) -> dict[str, FileRef]:
        """The head's file (every process takes part; rank 0 writes)."""
        file = checkpoint_file("head", step)
        metadata = {"format": "disback.head", "format_version": "1", "info": json.dumps(info)}

        def write(whole) -> str:
            tensors = whole.state_dict() if isinstance(whole, nn.Module) else whole
            return atomic_write_chunks(run_dir / file, *safetensors_chunks(tensors, metadata))

        digest = ex.layout.write_whole(self.head, write)
        return {"head": FileRef(file=file, sha256=digest)} if ex.is_main else {}


class SiDAEncoder(_Discriminating):
    """SiDA's discriminator: the fake score's own encoder (module docstring)."""

    description: ClassVar[str] = "--adversary sida"
    # SiDA's scripts: lsg 100, lsg_gan 0.01 (generator), ls 1, lsd 1 (fake score); the
    # generator's in units of disback's SiD loss (lsg_gan / lsg).
    default_weights: ClassVar[tuple[float, float]] = (1e-4, 1.0)
    weight_source: ClassVar[str] = "SiDA (lsg_gan / lsg, lsd)"
    losses: ClassVar[tuple[type, ...]] = (SiDLoss,)  # its term shares their normaliser

    def resolve(self, cfg, teacher, update: dict, sources: dict) -> None:
        if GENERATOR_LOSSES[cfg.loss] not in self.losses:
            raise ConfigError(
                f"--adversary sida is SiD's adversarial form: use --loss sid, not {cfg.loss}"
            )
        super().resolve(cfg, teacher, update, sources)

    def trained_with(self, denoiser) -> nn.Module:
        return denoiser

    def logits(self, x_t, sigma, cond) -> torch.Tensor:
        """The channel mean of the encoder's output: a logit per location (batch, 1, ...)."""
        return self.features(x_t, sigma, cond).mean(dim=1, keepdim=True)

    def discriminator_loss(self, x0, cond, sigma, noise) -> torch.Tensor:
        n = self.ex.global_batch(x0.shape[0])
        real, real_cond = self.draw_real(n)
        scaled = sigma_like(sigma, x0) * noise  # SiDA noises real data as the fake's DSM sample
        real_logits = self.logits(real + scaled, sigma, real_cond)
        fake_logits = self.logits(x0.detach() + scaled, sigma, cond)
        weight = denoising_weight(self.fake, sigma)
        per_sample = math.prod(x0.shape[1:])  # SiDA sums the DSM loss over values
        return sida_discriminator_loss(real_logits, fake_logits, weight) / per_sample

    def generator_term(self, x, sigma, noise, cond, out) -> torch.Tensor:
        with self.frozen_fake():
            logits = self.logits(x + sigma_like(sigma, x) * noise, sigma, cond)
        return math.prod(x.shape[1:]) * sida_generator_loss(logits, out.sample_scale)


ADVERSARIES: dict[str, type] = {"none": NoAdversary, "dmd2": DMD2Classifier, "sida": SiDAEncoder}


def make_adversary(cfg) -> NoAdversary | DMD2Classifier | SiDAEncoder:
    return ADVERSARIES[cfg.adversary](cfg)
