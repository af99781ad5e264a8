"""Tiny random Stable Diffusion model folders (SD 1.x-like and SDXL-like) in the diffusers
layout, written with `save_pretrained` as real ones are, for tests that must not download."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

LATENT = 8  # latent size; images are 16x16 (the tiny VAE halves once)
VOCAB = {"<|startoftext|>": 0, "<|endoftext|>": 1}
for _c in string.ascii_lowercase:
    VOCAB[_c] = len(VOCAB)
for _c in string.ascii_lowercase:
    VOCAB[_c + "</w>"] = len(VOCAB)
MERGES = [("c", "a"), ("d", "o"), ("r", "e")]
for _a, _b in MERGES:
    VOCAB[_a + _b] = len(VOCAB)

PROMPTS = ["a red cat", "a dog on a road", "blue sea", "a cat and a dog", "green tree"]


def _tokenizer(folder: Path) -> None:
    from transformers import CLIPTokenizer

    CLIPTokenizer(vocab=dict(VOCAB), merges=list(MERGES), model_max_length=77).save_pretrained(
        folder
    )


def _text_encoder(folder: Path, hidden: int, projection: int | None, layers: int = 2) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    cls(config).save_pretrained(folder)


def make_sd_folder(
    root: Path,
    *,
    xl: bool = False,
    prediction: str = "epsilon",
    seed: int = 0,
    widths: tuple[int, ...] = (8, 16),
    latent: int = LATENT,
    text_width: int = 16,
    text_layers: int = 2,
) -> Path:
    """A complete tiny model folder at `root` (SD 1.x-like, or SDXL-like with `xl`); larger
    `widths` (UNet channels per level) and `text_width` make SD-like sizes for benchmarks."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    root.mkdir(parents=True)
    cross = text_width
    extra = {}
    if xl:  # two encoders (8 + 8 = 16 wide), pooled projection of 8, six time ids of 4
        extra = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=6 * 4 + 8,
        )
    levels = len(widths)
    UNet2DConditionModel(
        sample_size=latent,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=widths,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=cross,
        attention_head_dim=2 if widths[0] < 64 else 8,
        norm_num_groups=4,
        **extra,
    ).save_pretrained(root / "unet")
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=2 * latent,
        scaling_factor=0.13025 if xl else 0.18215,
    ).save_pretrained(root / "vae")
    DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction,
    ).save_pretrained(root / "scheduler")
    index = {
        "_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    }
    if xl:
        _text_encoder(root / "text_encoder", text_width // 2, None, text_layers)
        _text_encoder(root / "text_encoder_2", text_width // 2, 8, text_layers)
        _tokenizer(root / "tokenizer_2")
        index.update(
            text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
            tokenizer_2=["transformers", "CLIPTokenizer"],
            force_zeros_for_empty_prompt=True,
        )
    else:
        _text_encoder(root / "text_encoder", cross, None, text_layers)
    _tokenizer(root / "tokenizer")
    (root / "model_index.json").write_text(json.dumps(index, indent=1))
    return root


def write_prompts(path: Path, prompts: list[str] = PROMPTS) -> Path:
    path.write_text("\n".join(prompts) + "\n")
    return path


def make_clip_folder(root: Path, seed: int = 0) -> Path:
    """A tiny random CLIP model folder (transformers layout) for CLIP-score tests."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(VOCAB),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(root)
    _tokenizer(root)
    CLIPImageProcessor(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
    ).save_pretrained(root)
    return root
