"""Run configurations: pydantic models filled from defaults, then a recipe file, then flags
(`recipes`), then what the teacher's family and the fake side decide (`resolve`). Each field is
the single declaration of its option: `cli.options` makes the command-line flag from it.

The resolved model is stored in the run's manifest. Fields listed in `SESSION_FIELDS` only change
how a run is carried out (logging, saving, device), so they may differ when a run is resumed;
every other field defines the run, and a change to it is refused unless the run is restarted.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from disback_cli.config.recipe_fields import RecipeFields

STORED = "stored"  # validation context key: the values come from a manifest disback wrote

SESSION_FIELDS = {
    *("save_every", "log_every", "eval_every", "eval_samples", "mismatch_every", "log_to"),
    *("device", "verify", "tf32", "compile", "channels_last", "threads", "gradient_checkpointing"),
}

# Every number a run accepts is finite and bounded: a value that cannot be written to a manifest
# and read back, or whose tensors cannot fit in any memory, is refused at the flag.
MAX_ITERS = 10**9
MAX_BATCH = 1 << 20
MAX_NODES = 999  # node files are named node-001 ... node-999
MAX_SAMPLES = 10**7  # seeds in one `sample` or `evaluate` call (200x EDM's 50k protocol)
LOSS_NAMES = ("vsd", "dmd", "sid", "diffratio")  # `method.losses.GENERATOR_LOSSES` (tested equal)

Betas = tuple[float, float]
Iters = Annotated[int, Field(ge=1, le=MAX_ITERS)]
Count = Annotated[int, Field(ge=0, le=MAX_ITERS)]  # 0 = off
Batch = Annotated[int, Field(ge=1, le=MAX_BATCH)]
Rate = Annotated[float, Field(gt=0, le=1)]  # learning rates
Seed = Annotated[int, Field(ge=0, lt=1 << 63)]
PMean = Annotated[float, Field(ge=-20, le=20)]
PStd = Annotated[float, Field(gt=0, le=20)]
Dropout = Annotated[float, Field(ge=0, lt=1)]
PathText = Annotated[str, Field(min_length=1, max_length=4096)]
# A field's command-line flag is `--field-name` (see `cli.options`); `flags(...)` names it
# otherwise, and `NO_FLAG` leaves the field to recipes and `--set`.
NO_FLAG = {"flags": []}


def flags(*names: str) -> dict[str, list[str]]:
    return {"flags": list(names)}


def field_flags(model: type[BaseModel], name: str) -> list[str] | None:
    """The flags a field declares (None: the default `--field-name`; []: no flag)."""
    extra = model.model_fields[name].json_schema_extra
    return extra.get("flags") if isinstance(extra, dict) else None


DROPOUT_HELP = "dropout of trained copies; none: the teacher's (Diff-Instruct, SiD); 0: off (DMD2)"

SigmaKind = Literal["lognormal", "karras", "discrete"]  # where denoisers learn (`method.noise`)


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    device: str = Field(
        "auto", max_length=100, description="'cpu', 'cuda', 'cuda:1', ... or 'auto'"
    )
    verify: bool = Field(True, description="check the sha256 of every file a manifest names")
    _recipe_keys: frozenset[str] = PrivateAttr(default=frozenset())  # set by build_config

    def identity(self) -> dict[str, Any]:
        """The fields that define the run (everything but SESSION_FIELDS)."""
        return self.model_dump(mode="json", exclude=SESSION_FIELDS)

    def given_sources(self) -> dict[str, str]:
        """Where each explicitly set field came from: "recipe", or "flag" (also arguments given
        from Python)."""
        return {
            field: "recipe" if field in self._recipe_keys else "flag"
            for field in sorted(self.model_fields_set)
        }

    @field_validator("betas", check_fields=False)
    @classmethod
    def _betas_in_range(cls, value: Betas | None) -> Betas | None:
        if value is not None and not all(0 <= b < 1 for b in value):
            raise ValueError("Adam betas must lie in [0, 1)")
        return value


class _Compute(_Config):
    """How networks run: numeric precision and GPU speed switches."""

    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: autocast the networks, fp32 master weights and losses"
    )
    tf32: bool = Field(False, description="allow TF32 matmuls and convolutions (CUDA)")
    compile: bool = Field(False, description="torch.compile the networks")
    channels_last: bool | None = Field(
        None, description="channels-last image tensors; none: on for images on CUDA"
    )
    threads: Annotated[int, Field(ge=1, le=1024)] | None = Field(
        None,
        description="CPU threads per process; none: OMP_NUM_THREADS if set, else the "
        "cores this process may use divided by the processes on this host",
    )


class _Training(_Compute):
    """What both training stages share: the loss the path serves, noise levels, dropout, seed."""

    resolved_by_teacher: ClassVar[bool] = True  # unset values come from the teacher's family

    loss: str = Field(
        "vsd",
        max_length=100,
        description="generator loss: vsd, dmd, sid or diffratio (record: "
        "the one "
        "the path is for; it sets the nodes' noise levels)",
    )
    dsm_sigma: SigmaKind | None = Field(
        None,
        description="noise levels the fake score and path nodes train at: lognormal, "
        "karras (uniform index of 1000 Karras levels) or discrete (uniform over a text-to-image "
        "teacher's own timesteps); none: the loss's (dmd: karras, else lognormal), discrete for "
        "text-to-image teachers",
    )
    p_mean: PMean | None = Field(None, description="log-normal sigma mean; none: the teacher's")
    p_std: PStd | None = Field(None, description="log-normal sigma std; none: the teacher's")
    dropout: Dropout | None = Field(None, description=DROPOUT_HELP)
    seed: Seed = Field(0, description="random seed")
    prompts: PathText | None = Field(
        None,
        description="prompt file (one a line, or a JSON list) of a text-to-image teacher; "
        "backtrack: none uses the trajectory's",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute activations in the backward pass of trained "
        "text-to-image UNets (less memory, ~30 % slower)",
    )
    parallel: Literal["ddp", "fsdp", "hsdp"] = Field(
        "ddp",
        description="how torchrun processes hold the networks: ddp (whole copies, data "
        "parallel), fsdp (each network sharded over all processes, PyTorch FSDP2) or hsdp "
        "(sharded within --shard-size processes, replicated across)",
    )
    shard_size: Annotated[int, Field(ge=1, le=1 << 16)] | None = Field(
        None, description="hsdp: processes each network is sharded over (none: all)"
    )

    @property
    def sharded(self) -> bool:
        """Whether the networks are sharded (the resume point is then a folder of shards)."""
        return self.parallel != "ddp"

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        # Losses registered from Python live in the registry, imported by whoever registered them;
        # until it is imported it holds the built-ins alone (and a typo needs no torch).
        registry = sys.modules.get("disback_cli.method.losses")
        known = tuple(registry.GENERATOR_LOSSES) if registry else LOSS_NAMES
        if value not in known:
            raise ValueError(f"unknown loss {value!r} (known: {', '.join(known)})")
        return value


class RecordConfig(_Training):
    """Degradation recording: fine-tune a teacher copy on samples of the frozen G0."""

    teacher: PathText = Field(
        description="builtin:NAME, an EDM .pkl, a disback .safetensors file or a diffusers model "
        "folder",
        json_schema_extra=flags("--teacher", "-t"),
    )
    iters: Iters = Field(1000, description="DSM iterations of the auxiliary model")
    nodes: Annotated[int, Field(ge=1, le=MAX_NODES)] = Field(
        5, description="path nodes saved evenly over the iterations"
    )
    batch: Batch = Field(256, description="G0 samples per iteration")
    probe_samples: Annotated[int, Field(ge=1, le=1 << 16)] = Field(
        512,
        description="G0 samples of the fixed probe each node is measured on (fewer: a faster, "
        "noisier measure, for smoke tests)",
    )
    lr: Rate | None = Field(None, description="Adam learning rate")
    betas: Betas = Field((0.9, 0.999), description="Adam betas")
    sigma_init: Annotated[float, Field(gt=0, le=1e4)] | None = Field(
        None,
        description="G0(z) = D(sigma_init z, sigma_init); none: the student file's own, "
        "else 2.5 (text-to-image teachers: --timestep)",
    )
    timestep: Annotated[int, Field(ge=0, le=100_000)] | None = Field(
        None,
        description="text-to-image teachers: G0 maps pure noise, read as the DDPM input "
        "at this timestep, to x0 (DMD2, DisBack SDXL: 399; DMD2 SD1.5: 999); none: 999",
    )
    lora_rank: Annotated[int, Field(ge=1, le=4096)] | None = Field(
        None,
        description="text-to-image teachers: record path nodes as low-rank adapters of "
        "this rank (peft) instead of full weights",
    )
    uncond_fraction: Annotated[float, Field(ge=0, lt=1)] | None = Field(
        None,
        description="text-to-image teachers: share of training samples the recorded copy sees "
        "with the unconditional (empty-prompt) embedding, so the guided path nodes have a "
        "trained unconditional branch; none: 0.1 (SD's caption dropout)",
    )
    placement: Literal["even", "distance"] = Field(
        "even", description="nodes evenly in iterations, or evenly in distance from the teacher"
    )
    student: PathText | None = Field(
        None, description="G0 from this denoiser file (default: teacher)"
    )
    student_arch_kwargs: dict[str, Any] | None = Field(
        None, description="G0 = teacher architecture with these kwargs, randomly initialised"
    )
    save_every: Count = Field(0, description="extra resume points every N iterations")
    node_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="dtype of saved path nodes (bf16 halves their disk use)"
    )

    @model_validator(mode="before")
    @classmethod
    def _no_dropout_in_old_recordings(cls, data: Any, info: ValidationInfo) -> Any:
        # Text-to-image recordings made before --uncond-fraction never dropped a prompt.
        stored = (info.context or {}).get(STORED, False)
        old_text = isinstance(data, dict) and data.get("prompts") is not None
        if stored and old_text and "uncond_fraction" not in data:
            data = {**data, "uncond_fraction": 0.0}
        return data

    @model_validator(mode="after")
    def _nodes_fit(self) -> RecordConfig:
        if self.nodes > self.iters:
            raise ValueError(f"nodes ({self.nodes}) must not exceed iters ({self.iters})")
        if self.student is not None and self.student_arch_kwargs is not None:
            raise ValueError("give either student or student-arch-kwargs, not both")
        return self


class BacktrackConfig(_Training, RecipeFields):
    """Distribution backtracking: train the generator along the recorded path."""

    iters: Iters = Field(2000, description="generator iterations")
    interval: Iters = Field(
        100, description="iterations per intermediate target node (adaptive: the maximum)"
    )
    no_trajectory: bool = Field(False, description="baseline: target = teacher, fake = teacher")
    lora_rank: Annotated[int, Field(ge=1, le=4096)] | None = Field(
        None,
        description="text-to-image teachers: train rank-R adapters of the generator and the "
        "fake score (peft, frozen weights; DMD2's --generator_lora) instead of every weight",
    )
    frozen_dtype: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="--parallel fsdp|hsdp: the teacher and target nodes held as bf16 shards "
        "and gathered as float32 to compute (half their memory; nodes recorded with "
        "--node-dtype bf16 lose nothing, the teacher is rounded)",
    )
    data: PathText | None = Field(
        None,
        description="real data for --loss diffratio or --adversary: builtin:NAME, an image "
        "folder or an EDM dataset zip (labels from its dataset.json)",
    )
    ratio_width: Annotated[int, Field(ge=1, le=4096)] | None = Field(
        None,
        description="diffratio: width of the density-ratio network (none: 64 units for "
        "vectors, 16 channels for images)",
    )
    ratio_depth: Annotated[int, Field(ge=1, le=16)] | None = Field(
        None,
        description="diffratio: its hidden layers (vectors) or strided conv layers "
        "(images); none: 3",
    )
    ratio_weighting: Literal["denoiser", "score"] | None = Field(
        None,
        description="diffratio: the update's weight over noise levels; denoiser: VSD's, "
        "sigma^2 times the ratio's gradient; score: sigma_data^2 times it, which does not "
        "grow the classifier's noise at high sigma; none: score",
    )
    guidance_scale: Annotated[float, Field(ge=0, le=100)] | None = Field(
        None,
        description="classifier-free guidance of the target (text-to-image teachers; the "
        "fake score is unguided); none: 1.75 for SD 1.x/2.x (DMD2), 8 for SDXL (DMD2, DisBack)",
    )
    fake_guidance_scale: Annotated[float, Field(ge=0, le=100)] | None = Field(
        None,
        description="classifier-free guidance of the fake score, in the generator loss and in "
        "its own training (text-to-image teachers; SiD-LSG's kappa1 = kappa2 = kappa3); none: "
        "unguided (DMD2, DisBack)",
    )
    sid_alpha: Annotated[float, Field(ge=-100, le=100)] = Field(
        1.2, description="alpha of the SiD loss"
    )
    switch: Literal["fixed", "adaptive"] = Field(
        "fixed", description="target switching: every --interval, or when the score gap plateaus"
    )
    switch_patience: Iters = Field(50, description="adaptive: iterations without progress")
    switch_tolerance: float = Field(0.02, ge=0, lt=1, description="adaptive: relative progress")
    batch: Batch = Field(256, description="generator samples per iteration")
    lr_g: Rate | None = Field(None, description="generator learning rate")
    lr_fake: Rate | None = Field(None, description="fake score learning rate")
    lr_ratio: Rate | None = Field(
        None,
        description="diffratio: the density-ratio network's learning rate (none: 1e-3 for "
        "vectors, 1e-4 for images; a classifier trained from scratch, not a teacher copy)",
    )
    optimizer: Literal["adam", "adamw"] | None = Field(
        None, description="optimiser of both networks"
    )
    betas: Betas | None = Field(None, description="Adam betas of both optimisers")
    weight_decay: Annotated[float, Field(ge=0, le=10)] | None = Field(
        None, description="decoupled weight decay (adamw only)"
    )
    fake_steps: Annotated[int, Field(ge=1, le=1000)] | None = Field(
        None,
        description="fake-score DSM steps per generator step (diffratio: ratio-network steps)",
    )
    ema_halflife_kimg: Annotated[float, Field(gt=0, le=1e9)] | None = Field(
        None, description="generator EMA half-life, kimg"
    )
    ema_rampup: Annotated[float, Field(gt=0, le=1e3)] | None = Field(
        0.05, description="EMA ramp-up ratio (none: off)", json_schema_extra=NO_FLAG
    )
    grad_clip: Annotated[float, Field(gt=0, le=1e12)] | None = Field(
        None, description="clip gradient norms (none: off)"
    )
    save_every: Count = Field(500, description="resume points every N iterations")
    log_every: Iters = Field(10, description="metrics.jsonl line every N iterations")
    eval_every: Count = Field(0, description="ground-truth metrics every N (0: off)")
    eval_samples: Annotated[int, Field(ge=2, le=10**6)] = Field(
        2000, description="samples per evaluation", json_schema_extra=NO_FLAG
    )
    mismatch_every: Count = Field(
        0,
        description="score-mismatch diagnostics every N iterations (0: off; teachers of a "
        "Gaussian-mixture data set, e.g. builtin:ring2d, whose exact score is known)",
    )
    log_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list,
        max_length=2,
        description="also send the log lines to tensorboard and/or wandb (metrics.jsonl stays)",
    )

    @model_validator(mode="before")
    @classmethod
    def _ratio_rate_of_old_runs(cls, data: Any, info: ValidationInfo) -> Any:
        # Runs made before --lr-ratio trained the ratio network at --lr-fake, and weighted its
        # gradient as VSD does.
        stored = (info.context or {}).get(STORED, False)
        old_ratio_run = isinstance(data, dict) and data.get("loss") == "diffratio"
        if stored and old_ratio_run and "lr_ratio" not in data:
            data = {**data, "lr_ratio": data.get("lr_fake"), "lr_fake": None}
        if stored and old_ratio_run and "ratio_weighting" not in data:
            data = {**data, "ratio_weighting": "denoiser"}  # the only one before
        return data

    @model_validator(mode="after")
    def _saves_on_log_lines(self) -> BacktrackConfig:
        if self.save_every % self.log_every:
            raise ValueError(
                f"save-every ({self.save_every}) must be a multiple of log-every ({self.log_every})"
            )
        return self

    @model_validator(mode="after")
    def _adaptive_can_switch_early(self, info: ValidationInfo) -> BacktrackConfig:
        # With patience >= interval the cap always fires first: the fixed schedule, silently.
        # Refused for new settings only: runs made before this rule stay readable.
        stored = (info.context or {}).get(STORED, False)
        if self.switch == "adaptive" and self.switch_patience >= self.interval and not stored:
            raise ValueError(
                f"switch-patience ({self.switch_patience}) must be below interval "
                f"({self.interval}), or the adaptive switch is the fixed one"
            )
        return self

    @model_validator(mode="after")
    def _decay_needs_adamw(self) -> BacktrackConfig:
        # An unset optimiser is the teacher family's to choose: checked again once resolved.
        if self.weight_decay and self.optimizer not in (None, "adamw"):
            raise ValueError("weight-decay needs --optimizer adamw")
        return self


class SampleConfig(_Compute):
    """One-step sampling from a trained generator."""

    n: Annotated[int, Field(ge=1, le=MAX_SAMPLES)] | None = Field(
        None,
        description="number of samples, seeds 0..n-1",
        json_schema_extra={**flags("-n"), "default_text": "1000 unless --seeds"},
    )
    seeds: str | None = Field(
        None, max_length=10_000, description="seed list, e.g. 0-999 (instead of -n)"
    )
    batch: Batch = Field(1000, description="samples per forward pass")
    weights: Literal["ema", "raw"] = Field("ema", description="generator weights to use")
    format: Literal["auto", "npz", "png"] = Field(
        "auto", description="npz, png (images: EDM folder layout), auto: png for images"
    )
    class_label: Annotated[int, Field(ge=0, le=100_000)] | None = Field(
        None, description="fixed class for all samples", json_schema_extra=flags("--class")
    )
    prompts: PathText | None = Field(
        None, description="text-to-image generators: a prompt file; -n images per prompt"
    )
    best_of: Annotated[int, Field(ge=1, le=1024)] = Field(
        1, description="draw K candidates per seed and keep one, chosen by --verifier"
    )
    best_of_rule: Literal["resample", "argmax"] = Field(
        "resample",
        description="how the verifier chooses: resample draws a candidate with probability "
        "proportional to its estimated density ratio (importance resampling: towards the data "
        "as K grows); argmax keeps the highest (more precision, less diversity)",
    )
    guidance_scale: Annotated[float, Field(ge=0, le=100)] | None = Field(
        None,
        description="classifier-free guidance of a text-to-image --teacher; none: the scale "
        "backtrack guides its target with (1.75 for SD 1.x/2.x, 8 for SDXL)",
    )
