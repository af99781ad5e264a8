"""What sampling a text-to-image generator needs besides its UNet: the teacher's text encoders
(prompts -> conditions) and its VAE (latents -> images). A generator file names them by the
model folder and the sha256 of their files, so a changed encoder or VAE is caught."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from disback_cli.errors import DisbackError
from disback_cli.models.text_to_image.folder import DiffusersFolder, read_folder
from disback_cli.models.text_to_image.text import TextEncoder
from disback_cli.models.text_to_image.vae import LatentDecoder
from disback_cli.store.fileio import hash_regular_file
from disback_cli.store.tensorfile import MAX_SAFETENSORS_BYTES

SAMPLING_COMPONENTS = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def sampling_info(folder: DiffusersFolder) -> dict:
    """The model folder and the sha256 of every file its text encoders and VAE read."""
    parts = tuple(c for c in SAMPLING_COMPONENTS if c in folder.components)
    files = folder.hash_files(parts)
    return {
        "folder": str(folder.root.absolute()),
        "files": {k: v for k, v in files.items() if k.split("/")[0] in parts},
    }


MAX_RECORDED_FILES = 10_000


def check_recorded_files(root: Path, recorded: dict) -> None:
    """Each file a generator names (inside a text-encoder, tokenizer or VAE folder of `root`)
    against its recorded sha256, in one line."""
    if len(recorded) > MAX_RECORDED_FILES:
        raise DisbackError(f"the generator file names {len(recorded):,} model files")
    for rel, sha in recorded.items():
        parts = PurePosixPath(rel).parts if isinstance(rel, str) and len(rel) < 1000 else ()
        if len(parts) < 2 or parts[0] not in SAMPLING_COMPONENTS or ".." in parts:
            raise DisbackError(f"the generator file names {str(rel)[:100]!r}, not a model file")
        path = root.joinpath(*parts)
        if not (path.exists() or path.is_symlink()):
            raise DisbackError(f"{path}: missing (moved? pass --model-folder)")
        if hash_regular_file(path, MAX_SAFETENSORS_BYTES, "model file") != sha:
            raise DisbackError(
                f"{path}: not the file the generator was trained with "
                "(sha256 differs; moved? pass --model-folder)"
            )


def open_sampling(
    info: object, device, verify: bool = True, folder: str | None = None
) -> tuple[TextEncoder, LatentDecoder]:
    """The text encoder and VAE decoder a generator file names (`sampling_info`), checked by
    sha256 unless `verify` is off; `folder` if the model folder has moved."""
    if not (
        isinstance(info, dict)
        and isinstance(info.get("folder"), str)
        and isinstance(info.get("files"), dict)
    ):
        raise DisbackError("the generator file names no text encoder or VAE (not text-to-image)")
    root = Path(folder or info["folder"])
    recorded = info["files"]
    if verify:  # every file the generator names, hashed before any of them is parsed
        check_recorded_files(root, recorded)
    model = read_folder(root)
    if verify:
        model.files.update(recorded)  # just compared: not hashed again
        parts = tuple(c for c in SAMPLING_COMPONENTS if c in model.components)
        found = model.hash_files(parts)
        if {k for k in found if k.split("/")[0] in parts} != recorded.keys():
            raise DisbackError(
                f"{model.root}: its text encoder and VAE files are not those the generator was "
                "trained with (files added or missing; moved? pass --model-folder)"
            )
    return TextEncoder(model, device), LatentDecoder(model, device)
