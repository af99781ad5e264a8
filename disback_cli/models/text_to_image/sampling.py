"""What sampling a text-to-image generator needs besides its UNet: the teacher's text encoders
(prompts -> conditions) and its VAE (latents -> images). A generator file names them by the
model folder and the sha256 of their files, so a changed encoder or VAE is caught."""

from __future__ import annotations

from disback_cli.errors import DisbackError
from disback_cli.models.text_to_image.folder import DiffusersFolder, read_folder
from disback_cli.models.text_to_image.text import TextEncoder
from disback_cli.models.text_to_image.vae import LatentDecoder

SAMPLING_COMPONENTS = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def sampling_info(folder: DiffusersFolder) -> dict:
    """The model folder and the sha256 of every file its text encoders and VAE read."""
    parts = tuple(c for c in SAMPLING_COMPONENTS if c in folder.components)
    files = folder.hash_files(parts)
    return {
        "folder": str(folder.root.absolute()),
        "files": {k: v for k, v in files.items() if k.split("/")[0] in parts},
    }


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
    root = folder or info["folder"]
    model = read_folder(root)
    if verify:
        found = model.hash_files(tuple(c for c in SAMPLING_COMPONENTS if c in model.components))
        for rel, sha in info["files"].items():
            if found.get(rel) != sha:
                raise DisbackError(
                    f"{model.root / str(rel)[:200]}: not the file the generator was trained with "
                    "(sha256 differs; moved? pass --model-folder)"
                )
    return TextEncoder(model, device), LatentDecoder(model, device)
