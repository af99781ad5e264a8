"""The fake side of distillation: the network kept fitted to the generator's samples, whose opinion
of them stands against the target's in the generator's update.

Score distillation keeps a *fake score*, a denoiser trained by denoising score matching on the
generator's samples (Eq. 5); DisBack starts it at path node N and walks the targets back along the
path. DiffRatio keeps a *density-ratio network* instead, a classifier of noised real data against
noised generator samples, whose input gradient is the score difference itself: it needs real data,
no target and no path. A fake side owns its network's building, its training step, the files it
adds to a checkpoint and the settings it takes; the loss names the side it works with
(`fake_side`), and the backtracking loop only calls these. A score fake side may carry an
adversary (`method.adversarial`): a discriminator made of its network, trained beside it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from torch import nn

from disback_cli.errors import ConfigError
from disback_cli.method.adversarial import ADVERSARIES, NoAdversary, make_adversary
from disback_cli.method.data import DataSource, open_data
from disback_cli.method.dsm import denoising_step
from disback_cli.method.losses import GENERATOR_LOSSES
from disback_cli.method.ratio import ratio_step
from disback_cli.models.family import Teacher
from disback_cli.models.path_nodes import Targets
from disback_cli.models.ratio import build_ratio, ratio_spec_for, save_ratio
from disback_cli.runtime.sharding import WHOLE
from disback_cli.store.layout import checkpoint_file
from disback_cli.store.manifests import DataRecord, FileRef, TrajectoryManifest


class FakeSide(Protocol):
    description: str  # names the side in messages ("--loss diffratio")
    shardable: bool  # whether it runs with sharded networks (--parallel fsdp|hsdp)
    adapted: bool  # whether --lora-rank trains adapters of its network (a copy of the teacher's)
    options: dict[str, Any]  # config fields only this side takes -> their "not used" value
    adversary: Any  # `method.adversarial`: what it adds as a discriminator (NoAdversary: none)

    def resolve(self, cfg, teacher: Teacher, update: dict, sources: dict) -> None:
        """Its defaults and refusals for a backtrack config."""
        ...

    def learning_rate(self, cfg) -> float:
        """Its network's learning rate in a resolved config."""
        ...

    def resident_copies(self, node_format, weights) -> dict[str, float]:
        """Weight-sized copies it holds while training (for the memory arithmetic), `weights`
        training as `method.trained_weights` says."""
        ...

    def open_inputs(self, cfg, teacher: Teacher) -> None:
        """Read and check what it learns from besides the teacher, before anything is written."""
        ...

    @property
    def data_record(self) -> DataRecord | None: ...

    def build(
        self, cfg, trajectory, traj: TrajectoryManifest, teacher: Teacher, generator, ex, networks
    ) -> tuple[nn.Module, Targets]:
        """The network to train and the targets of the generator loss, made by `networks`
        (whole or sharded, `runtime.sharding`)."""
        ...

    @property
    def step(self) -> Callable: ...

    def attach(self, fake: nn.Module, trained: nn.Module, cfg, ex) -> nn.Module:
        """What of it trains: `trained` (its network's weights or adapters), with what its
        adversary trains beside it (`method.adversarial`)."""
        ...

    def generator_loss(self, loss):
        """The generator loss as this side serves it (with the adversary's term)."""
        ...

    def save(self, run_dir, step: int, fake: nn.Module, info: dict, ex) -> dict[str, FileRef]:
        """Its files of a checkpoint, by the manifest field that names them (called on every
        process; rank 0 writes and gets the references)."""
        ...


class ScoreFake:
    """A fake score network, started from path node N (or the teacher, without the path) and
    trained by denoising score matching; the targets are the path's nodes. With an adversary,
    the network is also a discriminator of real data (`method.adversarial`)."""

    description: ClassVar[str] = "score distillation"
    options: ClassVar[dict[str, Any]] = {"lr_fake": None, "warm_fake": False}
    adapted: ClassVar[bool] = True

    def __init__(self, adversary=None) -> None:
        self.adversary = adversary or NoAdversary()

    shardable: ClassVar[bool] = True  # its network, targets and head run sharded

    def resolve(self, cfg, teacher: Teacher, update: dict, sources: dict) -> None:
        if cfg.warm_fake and not cfg.no_trajectory:
            raise ConfigError(
                "--warm-fake is for --no-trajectory (on the path the fake starts at node N)"
            )
        self.adversary.resolve(cfg, teacher, update, sources)

    def learning_rate(self, cfg) -> float:
        return cfg.lr_fake

    def resident_copies(self, node_format, weights) -> dict[str, float]:
        return {**weights.fake_copies, **node_format.target_copies}

    def open_inputs(self, cfg, teacher: Teacher) -> None:
        """Read what the run learns from besides the teacher (the adversary's real data)."""
        self.adversary.open_inputs(cfg, teacher)

    @property
    def data_record(self) -> DataRecord | None:
        return self.adversary.data_record

    def build(
        self,
        cfg,
        trajectory,
        traj: TrajectoryManifest,
        teacher: Teacher,
        generator,
        ex,
        networks=WHOLE,
    ) -> tuple[nn.Module, Targets]:
        """The fake score to train and the targets (which take over the teacher's weights)."""
        node_format = teacher.family.node_format(traj.config)
        targets = node_format.targets(
            trajectory, traj, teacher, ex.device, ex.prepare, cfg.verify, networks
        )
        start = 0 if cfg.no_trajectory and not cfg.warm_fake else traj.last_node
        return targets.copy_of(start), targets

    @property
    def step(self) -> Callable:
        """One training step of the fake network, called like `dsm.denoising_step`."""
        return self.adversary.fake_step(denoising_step)

    def attach(self, fake: nn.Module, trained: nn.Module, cfg, ex) -> nn.Module:
        return self.adversary.attach(fake, trained, cfg, ex)

    def generator_loss(self, loss):
        return self.adversary.generator_loss(loss)

    def save(self, run_dir, step: int, fake: nn.Module, info: dict, ex) -> dict[str, FileRef]:
        """Files of a checkpoint besides the generator's (the adversary's head)."""
        return self.adversary.save(run_dir, step, info, ex)


class NoTargets:
    """No target at all (DiffRatio learns from data, not from the teacher's score)."""

    def at(self, index: int) -> None:
        return None

    def close(self) -> None:
        pass


# A ratio network starts from random weights: it needs a classifier's rates, not the rates that
# fine-tune a teacher copy (1e-5 for EDM U-Nets). On the ring, 1e-5 leaves it at chance and the
# generator drifts away from the data (MMD² 0.19 -> 0.31); docs/benchmarks.md has the measurements.
RATIO_LEARNING_RATE = {"vectors": 1e-3, "images": 1e-4}
RATIO_STEPS = 5  # classifier steps per generator step


class RatioFake:
    """DiffRatio's density-ratio network, trained as a classifier of noised real data (`--data`)
    against noised generator samples; no target, no path (its G0 still comes from the
    trajectory: docs/method.md says why). Its network is saved with each checkpoint, as the
    verifier of best-of-K sampling."""

    description: ClassVar[str] = "--loss diffratio"
    shardable: ClassVar[bool] = False  # its ratio network is whole in every process
    adapted: ClassVar[bool] = False  # its ratio network is small and trains whole
    adversary: ClassVar[NoAdversary] = NoAdversary()  # its network is a classifier already
    options: ClassVar[dict[str, Any]] = {
        "data": None,
        "ratio_width": None,
        "ratio_depth": None,
        "lr_ratio": None,
        "ratio_weighting": None,
    }

    def __init__(self, adversary=None) -> None:
        self.data: DataSource | None = None  # (an --adversary is refused: `resolve`)

    def resolve(self, cfg, teacher: Teacher, update: dict, sources: dict) -> None:
        if cfg.data is None:
            raise ConfigError(
                "--loss diffratio learns from real data: give --data (builtin:NAME, an image "
                "folder or an EDM dataset zip)"
            )
        if not teacher.family.supports_real_data:
            raise ConfigError(f"--loss diffratio is not available for {teacher.family.description}")
        if ADVERSARIES[cfg.adversary].active:
            raise ConfigError(
                "--adversary is for score distillation: diffratio's ratio network is a "
                "classifier of real data already"
            )
        if cfg.mismatch_every:
            raise ConfigError(
                "--mismatch-every needs a target and a fake score; diffratio has neither"
            )
        if not cfg.no_trajectory:
            update["no_trajectory"], sources["no_trajectory"] = True, "loss diffratio"
        if cfg.lr_ratio is None:
            kind = "vectors" if len(teacher.spec.data_shape) == 1 else "images"
            update["lr_ratio"] = RATIO_LEARNING_RATE[kind]
            sources["lr_ratio"] = f"default for a ratio network on {kind} (trained from scratch)"
        update["lr_fake"], sources["lr_fake"] = None, "not used by --loss diffratio"
        # Measured (docs/benchmarks.md): neither alone, but five classifier steps per generator
        # step with the score weighting bring DiffRatio to VSD's quality on the ring and digits.
        for key, value in (("fake_steps", RATIO_STEPS), ("ratio_weighting", "score")):
            if getattr(cfg, key) is None:
                update[key], sources[key] = value, "default for --loss diffratio (measured)"

    def learning_rate(self, cfg) -> float:
        return cfg.lr_ratio

    def resident_copies(self, node_format, weights) -> dict[str, float]:
        """None of the teacher's size: its ratio network is small, and it has no targets."""
        return {}

    def open_inputs(self, cfg, teacher: Teacher) -> None:
        """Open --data (checked before the run writes anything)."""
        self.data = open_data(cfg.data, teacher.spec.data_shape, teacher.spec.label_dim)

    @property
    def data_record(self) -> DataRecord:
        return DataRecord(**vars(self.data.ref))

    def build(self, cfg, trajectory, traj, teacher: Teacher, generator, ex, networks=WHOLE):
        teacher.denoiser = None  # nothing queries the teacher's score
        spec = ratio_spec_for(
            teacher.spec.data_shape,
            teacher.spec.label_dim,
            generator.denoiser.sigma_data,
            cfg.ratio_width,
            cfg.ratio_depth,
        )
        return build_ratio(spec, seed=cfg.seed).to(ex.device), NoTargets()

    @property
    def step(self) -> Callable:
        return functools.partial(ratio_step, data=self.data)

    def attach(self, fake: nn.Module, trained: nn.Module, cfg, ex) -> nn.Module:
        return trained

    def generator_loss(self, loss):
        return loss

    def save(self, run_dir, step: int, fake: nn.Module, info: dict, ex) -> dict[str, FileRef]:
        if not ex.is_main:  # whole on every process: rank 0 writes
            return {}
        file = checkpoint_file("ratio", step)
        digest = save_ratio(run_dir / file, fake, {"role": "verifier", "step": step, **info})
        return {"ratio": FileRef(file=file, sha256=digest)}


FAKE_SIDES: dict[str, type] = {"score": ScoreFake, "ratio": RatioFake}


def make_fake_side(cfg) -> ScoreFake | RatioFake:
    """The fake side the run's loss works with (a score side with the run's --adversary)."""
    return FAKE_SIDES[GENERATOR_LOSSES[cfg.loss].fake_side](make_adversary(cfg))
