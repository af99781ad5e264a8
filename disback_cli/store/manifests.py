"""The on-disk trajectory directory and its versioned manifests.

    runs/t1/
      manifest.json                 TrajectoryManifest: teacher, G0, config, path nodes, status
      nodes/node-001.safetensors    path node i (node 0 is the teacher, referenced, not copied)
      state/record-*.safetensors    resume state while recording
      backtrack/<name>/
        manifest.json               BacktrackManifest: config, step, latest files, status
        metrics.jsonl               one JSON object per logged iteration
        checkpoints/                generator(-ema)-<step>.safetensors, state-<step>.safetensors

Manifests are written last, after every file they name, and name each file with its sha256
(file names themselves come from `layout`). `open_trajectory` and `generator_file_of_run` are how
the other stages read what `record` and `backtrack` wrote.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from disback_cli import __version__
from disback_cli.config import STORED, BacktrackConfig, RecordConfig
from disback_cli.errors import DisbackError, describe_validation_error
from disback_cli.store.fileio import atomic_write_bytes, read_json_file
from disback_cli.store.layout import (
    BACKTRACK_FOLDER,
    CHECKPOINT_FILES,
    MANIFEST,
    METRICS,
    RUN_NAME,
    backtrack_dir,
    check_no_links,
    checkpoint_file,
    node_file,
    record_state_file,
)

SCHEMA_VERSION = 1
MAX_MANIFEST_BYTES = 16 << 20  # far above any real manifest; a bigger one is refused unread

Sha256 = Annotated[str, Field(pattern=r"^([0-9a-f]{64})?$")]  # empty only while being written
Step = Annotated[int, Field(ge=0, le=1 << 40)]
Seconds = Annotated[float, Field(ge=0, le=1e12)]
Loss = Annotated[float, Field(ge=0, le=1e30)]
MAX_NETWORK_JSON = 1 << 16
MAX_SOURCE_CHARS = 100  # where a resolved setting came from, e.g. "default for SDXL (DisBack SDXL)"


def _bounded_network(value: dict[str, Any]) -> dict[str, Any]:
    if len(json.dumps(value)) > MAX_NETWORK_JSON:
        raise ValueError(f"a network description longer than {MAX_NETWORK_JSON} characters")
    return value


# A network's description as `models.networks.NetworkSpec` writes it, kept as it is here: the
# models check it (bounds, known architecture) before they build anything from it.
NetworkRecord = Annotated[dict[str, Any], AfterValidator(_bounded_network)]
MAX_TABLE_JSON = 1 << 16
MAX_TABLE_KEYS = 200


def _bounded_table(value: dict[str, Any]) -> dict[str, Any]:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        raise ValueError("a recipe table of JSON values only") from None
    if len(text) > MAX_TABLE_JSON:
        raise ValueError(f"a recipe table longer than {MAX_TABLE_JSON} characters")
    return value


# A recipe table as the recipe gave it, kept as it is here: whoever uses it validates it as it
# validates a recipe's (see `SampleRecipe`).
RecipeTable = Annotated[
    dict[Annotated[str, Field(max_length=100)], Any],
    Field(max_length=MAX_TABLE_KEYS),
    AfterValidator(_bounded_table),
]


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)


class FileRef(_Record):
    file: str = Field(max_length=200)  # relative to the directory holding the manifest
    sha256: Sha256


class StateRef(FileRef):
    step: Step


class NodeRecord(_Record):
    index: Annotated[int, Field(ge=0, le=100_000)]  # 0 = teacher ... N = fitted to G0
    step: Step  # recording iteration at which it was saved
    file: str | None  # None for node 0: the teacher itself
    sha256: Sha256
    dist_to_teacher: Annotated[float, Field(ge=0, le=1e30)]  # mean |D_node - D_teacher| on a
    # fixed probe of noised G0 samples
    g0_loss: Loss | None = None  # EDM denoising loss on that probe (how well the node fits G0)
    train_loss: Loss | None = None  # mean training loss since the previous node

    @model_validator(mode="after")
    def _named_as_written(self) -> NodeRecord:
        expected = None if self.index == 0 else node_file(self.index)
        if self.file != expected:
            raise ValueError(f"node {self.index} must be file {expected!r}, not {self.file!r}")
        return self


class TeacherRef(_Record):
    source: str = Field(max_length=4096)  # outside the run directory: read only, sha256 first
    sha256: Sha256
    network: NetworkRecord
    dataset: str | None = Field(max_length=100)


MAX_PROMPT_FILE_BYTES = 256 << 20  # a prompt file, read whole (by the family, or to check it)


class PromptsRef(_Record):
    """The prompt file a text-to-image run trained on (outside the run directory: read only,
    checked by sha256)."""

    file: str = Field(max_length=4096)
    sha256: Sha256
    count: Annotated[int, Field(ge=1, le=10**7)]


class DataRecord(_Record):
    """The real data a run learned from (diffratio): a built-in name or an absolute path, and
    the sha256 of its content."""

    source: str = Field(max_length=4096)
    sha256: Sha256
    count: Annotated[int, Field(ge=0, le=1 << 40)]


class SampleRecipe(_Record):
    """The `[sample]` table of the recipe a backtrack run was started with, so that `sample -T`
    uses it without being given the recipe again. The table is checked only as far as its size
    here; `sample` validates it as a recipe's before using any of it."""

    file: str = Field(max_length=4096)  # as given to --config
    sha256: Sha256  # of the recipe file when the run started
    table: RecipeTable


class G0Spec(_Record):
    """The initial generator G0(z) = D(input_scale z, sigma_init) and where D comes from."""

    kind: Literal["teacher_copy", "file", "random"] = "teacher_copy"
    sigma_init: Annotated[float, Field(gt=0, le=1e4)]
    # None: sigma_init (EDM's convention). Pure noise read as a DDPM input at sigma_init's
    # timestep is sqrt(1 + sigma_init^2) z in EDM's coordinates (DMD2, DisBack SDXL).
    input_scale: Annotated[float, Field(gt=0, le=1e4)] | None = None
    file: str | None = Field(None, max_length=4096)  # kind "file": a disback denoiser file
    # or a diffusers UNet folder ...
    sha256: Sha256 | None = None  # ... with this hash (checked before the file is parsed)
    network: NetworkRecord | None = None  # kind "random": this network ...
    init_seed: Annotated[int, Field(ge=0, lt=1 << 63)] | None = None  # ... from this seed

    @property
    def copies_teacher(self) -> bool:
        """Whether G0 is the teacher's own network (rather than a student's)."""
        return self.kind == "teacher_copy"

    @model_validator(mode="after")
    def _complete(self) -> G0Spec:
        if self.kind == "file" and not (self.file and self.sha256):
            raise ValueError("a G0 of kind 'file' needs file and sha256")
        if self.kind == "random" and (self.network is None or self.init_seed is None):
            raise ValueError("a G0 of kind 'random' needs network and init_seed")
        return self


class _Manifest(_Record):
    schema_version: int = SCHEMA_VERSION
    disback_version: str = Field(__version__, max_length=100)
    created_at: str = Field(max_length=100)
    updated_at: str = Field(max_length=100)
    # Where each config value came from: flag, recipe, teacher, loss, student, default, ...
    config_sources: dict[
        Annotated[str, Field(max_length=100)], Annotated[str, Field(max_length=MAX_SOURCE_CHARS)]
    ] = Field(default_factory=dict, max_length=200)


class RunManifest(_Manifest):
    """What every training stage's manifest holds; `stages.lifecycle` reads and writes it."""

    teacher: TeacherRef
    g0: G0Spec = Field(alias="generator_init")  # the file's name for G0's spec
    prompts: PromptsRef | None = None  # text-to-image teachers
    state: StateRef | None = None  # the latest resume point
    elapsed_seconds: Seconds = 0.0
    world_size: Annotated[int, Field(ge=1, le=1 << 20)] = 1  # processes; --batch is per process
    global_batch: Annotated[int, Field(ge=1, le=1 << 40)] | None = None  # batch x world_size

    # What this process did to the run (not stored): {"noop": True} for a finished run rerun,
    # else {"noop": False, "resumed_from": step, "iterations_run": n}. Read by --json summaries.
    _session: dict = PrivateAttr(default_factory=dict)

    @property
    def session(self) -> dict:
        return self._session

    def files(self) -> set[str]:
        """The files of the run directory this manifest names."""
        raise NotImplementedError


class TrajectoryManifest(RunManifest):
    kind: Literal["disback.trajectory"] = "disback.trajectory"
    status: Literal["recording", "complete"]
    config: RecordConfig
    nodes: list[NodeRecord] = Field(min_length=1)
    node_plan: list[Step] | None = None  # recording steps of nodes 1..N (placement by distance)

    @property
    def last_node(self) -> int:
        return self.nodes[-1].index

    def files(self) -> set[str]:
        """Path nodes 1..N and the resume point (node 0 is the teacher, elsewhere)."""
        named = {n.file for n in self.nodes if n.file}
        return named | ({self.state.file} if self.state else set())

    @model_validator(mode="after")
    def _consistent(self) -> TrajectoryManifest:
        """The node list and resume point are exactly what `record` writes for this config."""
        nodes, wanted = self.nodes, self.config.nodes
        if [n.index for n in nodes] != list(range(len(nodes))):
            raise ValueError("nodes must be numbered 0, 1, 2, ... in order")
        if len(nodes) > wanted + 1 or (self.status == "complete" and len(nodes) != wanted + 1):
            raise ValueError(f"{len(nodes) - 1} path nodes recorded, the config asks for {wanted}")
        if nodes[0].sha256 != self.teacher.sha256 or nodes[0].step != 0:
            raise ValueError("node 0 must be the teacher (its sha256, step 0)")
        steps = [n.step for n in nodes]
        if steps != sorted(set(steps)) or steps[-1] > self.config.iters:
            raise ValueError("node steps must increase and stay within iters")
        plan = self.node_plan
        if plan is not None and (
            len(plan) != wanted
            or plan != sorted(set(plan))
            or plan[0] < 1
            or plan[-1] > self.config.iters
        ):
            raise ValueError(f"node_plan must list {wanted} increasing steps within iters")
        if self.state is not None:
            if self.status == "complete" or not 0 < self.state.step < self.config.iters:
                raise ValueError("a resume point must lie inside a recording in progress")
            expected = record_state_file(self.state.step, self.config.sharded)
            if self.state.file != expected:
                raise ValueError(f"state file must be {expected!r}")
        return self


class BacktrackManifest(RunManifest):
    kind: Literal["disback.backtrack"] = "disback.backtrack"
    status: Literal["running", "complete"]
    name: str = Field(pattern=f"^{RUN_NAME.pattern}$")
    path_sha256: list[Sha256] = Field(min_length=2, max_length=100_001)  # nodes 0..N trained on
    config: BacktrackConfig
    step: Step = 0
    generator: FileRef | None = None
    generator_ema: FileRef | None = None
    ratio: FileRef | None = None  # diffratio: its density-ratio network (the verifier)
    head: FileRef | None = None  # --adversary dmd2: the classifier head
    data: DataRecord | None = None  # diffratio, --adversary: the real data it learned from
    sample_recipe: SampleRecipe | None = None  # its --config recipe's [sample] table, if any
    metrics: Literal["metrics.jsonl"] = METRICS

    def files(self) -> set[str]:
        """The latest checkpoint's files (metrics.jsonl is always the run's)."""
        refs = (getattr(self, field) for field in CHECKPOINT_FILES)
        return {ref.file for ref in refs if ref}

    @model_validator(mode="after")
    def _consistent(self) -> BacktrackManifest:
        """Checkpoint names and steps are exactly what `backtrack` writes."""
        if self.step > self.config.iters:
            raise ValueError(f"step {self.step} is beyond iters {self.config.iters}")
        if self.status == "complete" and self.generator is None:
            raise ValueError("a complete run must name its generator")
        refs = (
            ("generator", self.generator),
            ("generator-ema", self.generator_ema),
            ("state", self.state),
        )
        if any(ref is None for _, ref in refs) and any(ref is not None for _, ref in refs):
            raise ValueError("generator, generator_ema and state are saved together")
        sharded = self.config.sharded
        for field, kind in CHECKPOINT_FILES.items():  # every file it names, by one rule
            ref = getattr(self, field)
            expected = checkpoint_file(kind, self.step, sharded)
            if ref is not None and ref.file != expected:
                raise ValueError(f"{kind} file must be {expected!r}")
        if (self.ratio or self.head) is not None and self.generator is None:
            raise ValueError("a ratio network or head is saved with the generator")
        if self.state is not None and self.state.step != self.step:
            raise ValueError("the state's step must equal the run's step")
        return self


ManifestT = TypeVar("ManifestT", TrajectoryManifest, BacktrackManifest)


def read_manifest(directory: str | Path, model: type[ManifestT]) -> ManifestT:
    """Read and validate `directory/manifest.json`, refusing other kinds and newer schemas, and
    any path, name or number outside what disback itself writes."""
    path = check_no_links(Path(directory), MANIFEST)
    if not path.exists():
        raise DisbackError(f"{directory}: no {MANIFEST} here (not a disback run directory)")
    raw = read_json_file(path, MAX_MANIFEST_BYTES, "manifest")
    expected_kind = model.model_fields["kind"].default
    if not isinstance(raw, dict) or raw.get("kind") != expected_kind:
        found = raw.get("kind") if isinstance(raw, dict) else type(raw).__name__
        raise DisbackError(
            f"{path}: expected a {expected_kind} manifest, found {found!r:.80}"
            + _not_a_trajectory_hint(Path(directory))
        )
    version = raw.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise DisbackError(f"{path}: unknown schema_version {version!r:.40}")
    if version > SCHEMA_VERSION:
        raise DisbackError(
            f"{path}: schema_version {str(version)[:40]} was written by a newer disback "
            f"(this one reads up to {SCHEMA_VERSION}); upgrade disback"
        )
    try:
        return model.model_validate(raw, context={STORED: True})
    except ValidationError as exc:
        raise DisbackError(f"{path}: {describe_validation_error(exc)}") from None


def write_manifest(directory: str | Path, manifest: _Manifest) -> None:
    """Write atomically, after checking that this disback can read the result back (so no run is
    ever left with a manifest that no command accepts)."""
    manifest.updated_at = now()
    text = manifest.model_dump_json(indent=2, by_alias=True) + "\n"
    try:
        type(manifest).model_validate(json.loads(text))
    except ValidationError as exc:
        raise DisbackError(
            f"refusing to write {Path(directory) / MANIFEST}: it would not read back "
            f"({describe_validation_error(exc)})"
        ) from None
    atomic_write_bytes(check_no_links(Path(directory), MANIFEST), text.encode())


def run_names(trajectory: Path) -> list[str]:
    """Names of the backtrack runs of a trajectory (folders with a manifest, no links)."""
    runs = Path(trajectory) / BACKTRACK_FOLDER
    if runs.is_symlink() or not runs.is_dir():
        return []

    def is_run(entry: Path) -> bool:
        manifest = entry / MANIFEST
        named = RUN_NAME.fullmatch(entry.name) is not None
        return (
            named
            and entry.is_dir()
            and not entry.is_symlink()
            and manifest.is_file()
            and not manifest.is_symlink()
        )

    return sorted(entry.name for entry in runs.iterdir() if is_run(entry))


def _not_a_trajectory_hint(trajectory: Path) -> str:
    """What to pass instead when -T names a backtrack run rather than its trajectory."""
    if (trajectory / MANIFEST).is_file() and trajectory.parent.name == BACKTRACK_FOLDER:
        return (
            f"; {trajectory} is a backtrack run: pass -T {trajectory.parent.parent} "
            f"--name {trajectory.name}"
        )
    return ""


def read_run(trajectory: Path, name: str) -> BacktrackManifest:
    """The manifest of the backtrack run `name` of `trajectory`, or which runs there are."""
    trajectory = Path(trajectory)
    run_dir = backtrack_dir(trajectory, name)
    manifest_path = check_no_links(trajectory, run_dir.relative_to(trajectory) / MANIFEST)
    if not manifest_path.exists():
        existing = run_names(trajectory)
        listed = f"runs here: {', '.join(existing)}" if existing else "it has no runs yet"
        raise DisbackError(
            f"{run_dir}: no backtrack run named {name!r} ({listed}; run `disback backtrack`)"
            + _not_a_trajectory_hint(trajectory)
        )
    return read_manifest(run_dir, BacktrackManifest)


def generator_file_of_run(trajectory: Path, name: str, weights: str) -> tuple[Path, str]:
    """Latest generator file of a backtrack run and the sha256 its manifest gives for it."""
    run_dir = backtrack_dir(trajectory, name)
    manifest = read_run(trajectory, name)
    ref = manifest.generator_ema if weights == "ema" else manifest.generator
    if ref is None:
        raise DisbackError(f"{run_dir}: the run has not saved a generator yet")
    return check_no_links(run_dir, ref.file), ref.sha256


def verifier_of_run(run_dir: Path) -> tuple[Path, str]:
    """The density-ratio network a diffratio backtrack run saved last, and its sha256."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir, BacktrackManifest)
    if manifest.ratio is None:
        raise DisbackError(
            f"{run_dir}: not a --loss diffratio run (it saved no density-ratio network)"
        )
    return check_no_links(run_dir, manifest.ratio.file), manifest.ratio.sha256
