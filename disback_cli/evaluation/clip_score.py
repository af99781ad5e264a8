"""CLIP score of text-to-image samples: 100 x the cosine similarity of each image's and its
prompt's CLIP embeddings, averaged (torchmetrics' CLIPScore; commonly with
openai/clip-vit-large-patch14). The CLIP model is a local transformers folder (config.json,
model.safetensors, tokenizer and preprocessor files): nothing is downloaded, nothing but
safetensors weights is loaded, and the weights' sha256 is reported (and checked with
`--clip-sha256`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from disback_cli.errors import DisbackError, summary_of
from disback_cli.method.sampling import MAX_SAMPLES
from disback_cli.models.components import bounded_config, build_checked
from disback_cli.store.component_files import MAX_CONFIG_BYTES, find_weights, read_config
from disback_cli.store.fileio import check_regular_file, parse_json, read_regular_file
from disback_cli.store.samples import PROMPTS, complete_images
from disback_cli.store.tensorfile import check_finite, read_safetensors

IGNORED_KEYS = {"text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"}
MAX_LISTING_BYTES = 1 << 30
PREPROCESSOR = "preprocessor_config.json"


class ClipScorer:
    """A local CLIP model scoring (image, prompt) pairs."""

    def __init__(self, folder: str | Path, device, expected_sha256: str | None = None) -> None:
        import transformers

        transformers.logging.set_verbosity_error()  # no advice about torchvision on stderr
        folder = Path(folder)
        if not folder.is_dir():
            raise DisbackError(f"--clip {folder}: not a folder (a transformers CLIP model)")
        weights = find_weights(folder, "model")
        tensors, _, digest = read_safetensors(weights, expected_sha256)
        raw = read_config(folder / "config.json", "CLIP config")
        config = transformers.CLIPConfig.from_dict(bounded_config(raw, folder, "CLIP"))
        tensors = {k: v.float() for k, v in tensors.items() if k not in IGNORED_KEYS}
        check_finite(tensors, weights)
        model = build_checked(lambda: transformers.CLIPModel(config), folder, "CLIP", tensors)
        for path in folder.iterdir():  # what the tokenizer and the preprocessor will read
            if path.suffix in (".json", ".txt"):
                check_regular_file(path, MAX_CONFIG_BYTES, "CLIP tokenizer or preprocessor file")
        if (folder / PREPROCESSOR).exists():
            preprocessor = read_config(folder / PREPROCESSOR, "preprocessor config")
            bounded_config(preprocessor, folder, "preprocessor")
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            raise DisbackError(f"{weights}: not CLIP weights ({summary_of(exc)})") from None
        try:
            self.tokenizer = transformers.CLIPTokenizer.from_pretrained(
                folder, local_files_only=True
            )
            # the PIL image processor: the default one wants torchvision
            processor = getattr(
                transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor
            )
            self.processor = processor.from_pretrained(folder, local_files_only=True)
        except Exception as exc:  # files anyone may write
            first = summary_of(exc)
            raise DisbackError(
                f"--clip {folder}: unreadable tokenizer or preprocessor ({first})"
            ) from None
        self.model = model.to(device).eval().requires_grad_(False)
        self.device, self.sha256 = torch.device(device), digest
        self.describe = {
            "name": "clip",
            "folder": str(folder.absolute()),
            "weights": weights.name,
            "sha256": digest,
        }

    @torch.no_grad()
    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """100 cos(image, prompt) for (N, H, W, C) uint8 images and N prompts."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        length = min(
            self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings
        )
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        image = self.model.get_image_features(pixel_values=pixels.to(self.device))
        text = self.model.get_text_features(input_ids=ids.to(self.device))
        image = getattr(image, "pooler_output", image)  # newer transformers return an output
        text = getattr(text, "pooler_output", text)
        cosine = torch.nn.functional.cosine_similarity(image.float(), text.float(), dim=-1)
        return (100 * cosine).cpu().numpy()


def read_prompt_listing(folder: Path) -> list[tuple[Path, str]]:
    """(image, prompt) of every image of a text-to-image sample folder, from its prompts.json."""
    path = folder / PROMPTS
    if not path.is_file():
        raise DisbackError(
            f"{folder}: no {PROMPTS} (CLIP score needs `disback sample --prompts` output)"
        )
    try:
        listing = parse_json(read_regular_file(path, MAX_LISTING_BYTES, "prompt listing"))
        entries = listing["images"]
        pairs = [(str(e["file"]), str(e["prompt"])) for e in entries]
    except (ValueError, KeyError, TypeError) as exc:
        raise DisbackError(f"{path}: malformed prompt listing ({exc})") from None
    images = complete_images(folder, {".png"}, MAX_SAMPLES)  # a finished `sample` folder
    if [folder / name for name, _ in pairs] != images:
        raise DisbackError(f"{path}: does not list the folder's images in order")
    linked = next((p for p in images if p.is_symlink()), None)
    if linked is not None:
        raise DisbackError(f"{linked}: a symbolic link; disback does not follow them")
    return [(folder / name, prompt) for name, prompt in pairs]


def clip_scores(
    scorer: ClipScorer, pairs: list[tuple[Path, str]], batch: int, reporter=None
) -> np.ndarray:
    """The CLIP score of every (image file, prompt) pair, in order."""
    from PIL import Image

    scores = []
    if reporter is not None:
        reporter.start("CLIP score", len(pairs), 0)
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        images = []
        for image_path, _ in chunk:
            try:
                with Image.open(image_path) as image:
                    images.append(np.asarray(image.convert("RGB")))
            except OSError as exc:
                raise DisbackError(f"{image_path}: unreadable image ({exc})") from None
        scores.append(scorer(np.stack(images), [p for _, p in chunk]))
        if reporter is not None:
            reporter.advance(start + len(chunk))
    return np.concatenate(scores)
