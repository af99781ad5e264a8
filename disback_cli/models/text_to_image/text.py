"""Prompts as the UNet's text conditions, computed as the diffusers pipelines compute them.

SD 1.x / 2.x: the CLIP text encoder's last hidden state (77 tokens); the unconditional embedding
is that of the empty prompt. SDXL: the penultimate hidden states of both encoders concatenated
(768 + 1280), the second encoder's projected pooled embedding as `text_embeds`, and `time_ids`
(original size, crop corner, target size); the unconditional embeddings are zeros when the
pipeline says `force_zeros_for_empty_prompt` (SDXL's default; DMD2 does the same).

A prompt file is one prompt per line (blank lines skipped) or a JSON list of strings.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from disback_cli.errors import ConfigError, DisbackError, summary_of
from disback_cli.models.components import bounded_config, build_checked
from disback_cli.models.conditioning import Conditioning
from disback_cli.models.text_to_image.folder import DiffusersFolder
from disback_cli.models.text_to_image.unet import UNCOND_PREFIX
from disback_cli.store.component_files import read_config
from disback_cli.store.fileio import parse_json, read_regular_file
from disback_cli.store.manifests import MAX_PROMPT_FILE_BYTES
from disback_cli.store.tensorfile import check_finite, read_safetensors

MAX_PROMPTS = 10**7
MAX_PROMPT_CHARS = 10_000
IGNORED_ENCODER_KEYS = {"text_model.embeddings.position_ids"}  # a buffer older files carry


def read_prompts(path: str | Path) -> tuple[list[str], str]:
    """The prompts of a file and its sha256, or a one-line refusal."""
    data = read_regular_file(path, MAX_PROMPT_FILE_BYTES, "prompt file")
    digest = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is not part of the first prompt
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: a prompt file must be UTF-8 text") from None
    prompts = _json_prompts(text, path)
    if prompts is None:  # text: a prompt a line (one may well start with "[")
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"{path}: no prompts")
    if len(prompts) > MAX_PROMPTS:
        raise ConfigError(f"{path}: {len(prompts)} prompts, more than {MAX_PROMPTS}")
    long = next((i for i, p in enumerate(prompts) if len(p) > MAX_PROMPT_CHARS), None)
    if long is not None:
        raise ConfigError(f"{path}: prompt {long + 1} is longer than {MAX_PROMPT_CHARS} characters")
    return prompts, digest


def _json_prompts(text: str, path) -> list[str] | None:
    """The prompts of a file that is a JSON list, None for one that is not JSON at all; a JSON
    value that is not a list of strings is refused."""
    if not text.lstrip().startswith("["):
        return None
    try:
        prompts = parse_json(text)
    except ValueError:
        return None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ConfigError(f"{path}: a JSON prompt file must be a list of strings")
    return prompts


def _load_encoder(folder: DiffusersFolder, component: str, device) -> nn.Module:
    """A CLIP text encoder built from its config and loaded strictly from its safetensors."""
    import transformers

    where = folder.root / component
    raw = read_config(where / "config.json", "text encoder config")
    config = transformers.CLIPTextConfig.from_dict(bounded_config(raw, where, "text encoder"))
    cls = (
        transformers.CLIPTextModelWithProjection
        if component == "text_encoder_2"
        else transformers.CLIPTextModel
    )
    tensors, _, _ = read_safetensors(folder.weights[component], verify=False)
    tensors = {k: v for k, v in tensors.items() if k not in IGNORED_ENCODER_KEYS}
    check_finite(tensors, folder.weights[component])
    encoder = build_checked(lambda: cls(config), where, "text encoder", tensors)
    try:
        encoder.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    except RuntimeError as exc:
        first = summary_of(exc)
        raise DisbackError(f"{folder.weights[component]}: weights do not match ({first})") from None
    return encoder.to(device).eval().requires_grad_(False)


def _load_tokenizer(folder: DiffusersFolder, component: str):
    import transformers

    try:
        return transformers.CLIPTokenizer.from_pretrained(
            folder.root / component, local_files_only=True
        )
    except Exception as exc:  # a vocabulary file anyone may write
        first = summary_of(exc)
        raise DisbackError(f"{folder.root / component}: unreadable tokenizer ({first})") from None


def _check_vocabulary(tokenizer, encoder: nn.Module, where: Path) -> None:
    """A tokenizer whose vocabulary is blank (special tokens only) makes every prompt the same
    condition; one with more tokens than the encoder embeds indexes past its table."""
    size, embedded = len(tokenizer), encoder.config.vocab_size
    if size <= len(tokenizer.all_special_tokens) or size > embedded:
        raise DisbackError(
            f"{where}: the tokenizer has {size} tokens, the text encoder embeds {embedded}"
        )


class TextEncoder:
    """Prompts -> Conditioning (with the unconditional twins guidance needs)."""

    def __init__(self, folder: DiffusersFolder, device) -> None:
        self.folder, self.device, self.xl = folder, torch.device(device), folder.xl
        names = ("", "_2") if self.xl else ("",)
        self.tokenizers = [_load_tokenizer(folder, f"tokenizer{n}") for n in names]
        self.encoders = [_load_encoder(folder, f"text_encoder{n}", device) for n in names]
        for n, tokenizer, encoder in zip(names, self.tokenizers, self.encoders, strict=True):
            _check_vocabulary(tokenizer, encoder, folder.root / f"tokenizer{n}")
        _, height, width = folder.latent_shape
        scale = folder.vae_scale
        # SDXL's micro-conditioning: original size, crop corner (0, 0), target size, in pixels
        self.time_ids = torch.tensor(
            [height * scale, width * scale, 0, 0, height * scale, width * scale],
            dtype=torch.float32,
        )
        self._empty: Conditioning | None = None

    def _tokens(self, tokenizer, encoder, prompts: list[str]) -> torch.Tensor:
        length = min(tokenizer.model_max_length, encoder.config.max_position_embeddings)
        ids = tokenizer(
            prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids
        return ids.to(self.device)

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if not self.xl:
            tokenizer, encoder = self.tokenizers[0], self.encoders[0]
            hidden = encoder(self._tokens(tokenizer, encoder, prompts))[0]
            return {"encoder_hidden_states": hidden.float()}
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders, strict=True):
            out = encoder(self._tokens(tokenizer, encoder, prompts), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the second encoder's projected pooled embedding
        return {
            "encoder_hidden_states": torch.cat(hidden, dim=-1).float(),
            "text_embeds": pooled.float(),
        }

    def unconditional(self) -> dict[str, torch.Tensor]:
        """The one-row unconditional embeddings (the empty prompt's, or zeros for SDXL)."""
        if self._empty is None:
            empty = self._encode([""])
            if self.xl and self.folder.zeros_for_empty_prompt:
                empty = {k: torch.zeros_like(v) for k, v in empty.items()}
            self._empty = Conditioning(empty)
        return dict(self._empty)

    def encode(self, prompts: list[str]) -> Conditioning:
        """Conditions of a batch of prompts, on this encoder's device."""
        n = len(prompts)
        cond = self._encode(prompts)
        for key, value in self.unconditional().items():
            cond[UNCOND_PREFIX + key] = value.expand(n, *value.shape[1:])
        if self.xl:
            cond["time_ids"] = self.time_ids.to(self.device).expand(n, 6)
        return Conditioning(cond)


class PromptSource:
    """Training conditions: prompts drawn uniformly from the prompt file by the run's random
    stream (so a resumed run draws the same ones), encoded per batch. With a `dropout`, that
    share of a batch is shown to the trained denoiser with the unconditional embeddings instead
    (its samples still drawn for their prompts), as SD was trained with dropped captions."""

    def __init__(self, encoder: TextEncoder, prompts: list[str], dropout: float = 0.0) -> None:
        self.encoder, self.prompts, self.dropout = encoder, prompts, dropout

    @staticmethod
    def unconditional_rows(cond: Conditioning, rows: torch.Tensor) -> Conditioning:
        """`cond` with the conditions of `rows` (a boolean mask) replaced by their
        unconditional twins."""
        out = dict(cond)
        for key, value in cond.items():
            twin = cond.get(UNCOND_PREFIX + key)
            if twin is not None:
                mask = rows.reshape(-1, *[1] * (value.ndim - 1))
                out[key] = torch.where(mask, twin, value)
        return Conditioning(out)

    def draw(self, n: int, rng: torch.Generator, device: torch.device) -> Conditioning:
        index = torch.randint(len(self.prompts), (n,), generator=rng, device=device)
        return self.encoder.encode([self.prompts[i] for i in index.tolist()]).to(device)

    def of_seed(self, rng: torch.Generator) -> Conditioning:
        index = int(torch.randint(len(self.prompts), (), generator=rng))
        return self.encoder.encode([self.prompts[index]]).to("cpu")

    def labels(self, cond: Conditioning) -> np.ndarray | None:
        return None


class FixedPrompt:
    """Sampling conditions: every seed gets the same prompt (its embedding computed once)."""

    def __init__(self, encoder: TextEncoder, prompt: str) -> None:
        self.cond = encoder.encode([prompt]).to("cpu")

    def draw(self, n: int, rng: torch.Generator, device: torch.device) -> Conditioning:
        return self.cond.map(lambda t: t.expand(n, *t.shape[1:])).to(device)

    def of_seed(self, rng: torch.Generator) -> Conditioning:
        return copy.copy(self.cond)

    def labels(self, cond: Conditioning) -> np.ndarray | None:
        return None
