"""What `disback export` writes: a trained generator in a format other tools load."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from disback_cli.config import _Config

ExportFormat = Literal["safetensors", "diffusers", "onnx"]


class ExportConfig(_Config):
    """A backtrack run's generator as a file or folder that works outside disback."""

    format: ExportFormat = Field(
        "safetensors",
        description="safetensors: one file with the network description in its metadata (every "
        "family); diffusers: a UNet folder, or a whole pipeline with --pipeline (text-to-image); "
        "onnx: the one-step graph x = G(z, class_labels) (denoiser-file families)",
    )
    weights: Literal["ema", "raw"] = Field("ema", description="generator weights to export")
    dtype: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="floating-point type of the exported weights (safetensors, diffusers)"
    )
    pipeline: bool = Field(
        False,
        description="diffusers: a complete pipeline folder (the teacher's text encoders, "
        "tokenizers and VAE, and a one-step scheduler) instead of the UNet alone",
    )
    opset: Annotated[int, Field(ge=18, le=23)] = Field(
        18, description="onnx: the ONNX opset the graph is written for"
    )
