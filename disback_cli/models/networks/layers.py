"""Building blocks of EDM's image networks (Karras et al. 2022), written anew.

Parameter and buffer names, shapes and arithmetic follow NVlabs/edm `training/networks.py`, so that
released EDM weights load strictly and give the same outputs; the code is our own. Every layer casts
its weights to the input's dtype, so a network runs in bf16/fp16 by casting its input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def initial_weights(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """EDM's initialisers: xavier/kaiming, uniform/normal."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init mode {mode!r}")


class Linear(nn.Module):
    def __init__(
        self,
        in_features: int,  # Input width.
        out_features: int,  # Output width.
        bias: bool = True,  # Learn an additive bias?
        init_mode: str = "kaiming_normal",  # Initialiser, see initial_weights().
        init_weight: float = 1,  # Scale of the initial weights.
        init_bias: float = 0,  # Scale of the initial bias.
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(
            initial_weights([out_features, in_features], **fans) * init_weight
        )
        self.bias = (
            nn.Parameter(initial_weights([out_features], **fans) * init_bias) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x @ self.weight.to(x.dtype).t()
        return x + self.bias.to(x.dtype) if self.bias is not None else x


class Conv2d(nn.Module):
    """Convolution with optional 2x up/down-sampling by a separable FIR filter.

    A kernel size of 0 means resampling only (no weights).
    """

    def __init__(
        self,
        in_channels: int,  # Input channels.
        out_channels: int,  # Output channels.
        kernel: int,  # Kernel size, 0 = no convolution.
        bias: bool = True,  # Learn an additive bias?
        up: bool = False,  # Upsample 2x before the convolution?
        down: bool = False,  # Downsample 2x?
        resample_filter: Sequence[int] = (1, 1),  # 1-D taps of the FIR resampling filter.
        fused_resample: bool = False,  # Combine resampling and convolution (NCSN++ aux path).
        init_mode: str = "kaiming_normal",  # Initialiser, see initial_weights().
        init_weight: float = 1,  # Scale of the initial weights.
        init_bias: float = 0,  # Scale of the initial bias.
    ) -> None:
        if up and down:
            raise ValueError("Conv2d cannot both upsample and downsample")
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fans = dict(
            mode=init_mode, fan_in=in_channels * kernel**2, fan_out=out_channels * kernel**2
        )
        shape = [out_channels, in_channels, kernel, kernel]
        self.weight = nn.Parameter(initial_weights(shape, **fans) * init_weight) if kernel else None
        self.bias = (
            nn.Parameter(initial_weights([out_channels], **fans) * init_bias)
            if kernel and bias
            else None
        )
        taps = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        taps = torch.outer(taps, taps)[None, None] / taps.sum() ** 2
        self.register_buffer("resample_filter", taps if up or down else None)

    def _upsample(self, x: torch.Tensor, f: torch.Tensor, pad: int) -> torch.Tensor:
        kernel = (f * 4).tile([x.shape[1], 1, 1, 1])
        return F.conv_transpose2d(x, kernel, groups=x.shape[1], stride=2, padding=pad)

    def _downsample(self, x: torch.Tensor, f: torch.Tensor, pad: int) -> torch.Tensor:
        kernel = f.tile([x.shape[1], 1, 1, 1])
        return F.conv2d(x, kernel, groups=x.shape[1], stride=2, padding=pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.up and w is not None:
            x = self._upsample(x, f, max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = self._downsample(x, f, 0)
        else:
            if self.up:
                x = self._upsample(x, f, f_pad)
            if self.down:
                x = self._downsample(x, f, f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    def __init__(
        self,
        num_channels: int,
        num_groups: int = 32,
        min_channels_per_group: int = 4,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight.to(x.dtype), self.bias.to(x.dtype)
        return F.group_norm(x, self.num_groups, weight, bias, self.eps)


class UNetBlock(nn.Module):
    """Residual block with noise-embedding modulation, optional resampling and self-attention:
    the union of the DDPM++, NCSN++ and ADM blocks."""

    def __init__(
        self,
        in_channels: int,  # Input channels.
        out_channels: int,  # Output channels.
        emb_channels: int,  # Width of the noise/label embedding.
        up: bool = False,  # Upsample 2x?
        down: bool = False,  # Downsample 2x?
        attention: bool = False,  # Self-attention after the residual part?
        num_heads: int | None = None,  # Attention heads (default: out / channels_per_head).
        channels_per_head: int = 64,  # Channels per head when num_heads is None.
        dropout: float = 0,  # Dropout before the second convolution (training only).
        skip_scale: float = 1,  # Scale of residual sums.
        eps: float = 1e-5,  # GroupNorm epsilon.
        resample_filter: Sequence[int] = (1, 1),  # FIR filter for up/down-sampling.
        resample_proj: bool = False,  # 1x1 projection on the skip path when resampling?
        adaptive_scale: bool = True,  # Embedding gives scale and shift, or a shift only.
        init: dict | None = None,  # Init kwargs of the ordinary layers.
        init_zero: dict | None = None,  # Init kwargs of the last layer of each branch.
        init_attn: dict | None = None,  # Init kwargs of the qkv projection (default: init).
    ) -> None:
        super().__init__()
        init = init if init is not None else {}
        init_zero = init_zero if init_zero is not None else {"init_weight": 0}
        self.in_channels, self.out_channels, self.emb_channels = (
            in_channels,
            out_channels,
            emb_channels,
        )
        heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.num_heads = heads if attention else 0
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        resample = dict(up=up, down=down, resample_filter=resample_filter)

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, **resample, **init)
        affine_width = out_channels * (2 if adaptive_scale else 1)
        self.affine = Linear(emb_channels, affine_width, **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, **resample, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            qkv_init = init_attn if init_attn is not None else init
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **qkv_init)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        residual = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(residual) if self.skip is not None else residual)) * self.skip_scale
        if self.num_heads:
            batch, channels = x.shape[:2]
            q, k, v = (
                self.qkv(self.norm2(x))
                .reshape(batch * self.num_heads, channels // self.num_heads, 3, -1)
                .unbind(2)
            )
            weights = attention_weights(q, k)
            attended = torch.einsum("nqk,nck->ncq", weights, v)
            x = (self.proj(attended.reshape(*x.shape)) + x) * self.skip_scale
        return x


def attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q^T k / sqrt(c)) over keys, computed in float32, returned in q's dtype."""
    scaled_k = (k / math.sqrt(k.shape[1])).to(torch.float32)
    logits = torch.einsum("ncq,nck->nqk", q.to(torch.float32), scaled_k)
    return logits.softmax(dim=2).to(q.dtype)


class PositionalEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of the noise level (DDPM++, ADM): [cos, sin]."""

    def __init__(
        self, num_channels: int, max_positions: int = 10000, endpoint: bool = False
    ) -> None:
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (
            half - int(self.endpoint)
        )
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of the noise level (NCSN++): [cos, sin]."""

    def __init__(self, num_channels: int, scale: float = 16) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)
