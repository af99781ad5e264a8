"""EDM's image U-Nets: SongUNet (DDPM++ / NCSN++) and DhariwalUNet (ADM), written anew.

Module names (`map_noise`, `enc["32x32_block0"]`, ...) match NVlabs/edm so that released weights
load strictly. `forward(x, noise_labels, class_labels, augment_labels=None)` returns F; the
preconditioning turns it into a denoiser. `features(...)` stops at the lowest resolution, where a
discriminator head reads the network (`method.adversarial`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from disback_cli.models.networks.layers import (
    Conv2d,
    FourierEmbedding,
    GroupNorm,
    Linear,
    PositionalEmbedding,
    UNetBlock,
)


class _LowestResolutionFeatures:
    """`features`: the U-Net's forward pass stopped at its lowest resolution, where a
    discriminator head reads it: the encoder's output (DMD2's bottleneck), or after the two
    middle blocks (`in0`, `in1`, the decoder's first)."""

    feature_points = ("encoder", "middle")

    def features(self, x, noise_labels, class_labels, where: str = "encoder") -> torch.Tensor:
        emb = self.embed(noise_labels, class_labels)
        x = self.encode(x, emb)[0]
        if where == "middle":
            for name, block in self.dec.items():
                if not name.endswith(("_in0", "_in1")):
                    break
                x = block(x, emb)
        return x


def _drop_labels(labels: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Classifier-free-guidance label dropout (training only)."""
    if not (training and p):
        return labels
    keep = torch.rand([labels.shape[0], 1], device=labels.device) >= p
    return labels * keep.to(labels.dtype)


class SongUNet(_LowestResolutionFeatures, nn.Module):
    """DDPM++ (positional embedding, standard encoder) and NCSN++ (Fourier embedding, residual
    encoder, [1,3,3,1] filter) of Song et al. 2021, as re-implemented in EDM."""

    def __init__(
        self,
        img_resolution: int,  # Image resolution at input/output.
        in_channels: int,  # Colour channels at input.
        out_channels: int,  # Colour channels at output.
        label_dim: int = 0,  # Number of classes, 0 = unconditional.
        augment_dim: int = 0,  # Augmentation label width, 0 = none.
        model_channels: int = 128,  # Base channel count.
        channel_mult: Sequence[int] = (1, 2, 2, 2),  # Channel multiplier per resolution.
        channel_mult_emb: int = 4,  # Embedding width multiplier.
        num_blocks: int = 4,  # Residual blocks per resolution.
        attn_resolutions: Sequence[int] = (16,),  # Resolutions with self-attention.
        dropout: float = 0.10,  # Dropout probability inside blocks.
        label_dropout: float = 0,  # Label dropout for classifier-free guidance.
        embedding_type: str = "positional",  # 'positional' (DDPM++) or 'fourier' (NCSN++).
        channel_mult_noise: int = 1,  # Noise embedding width: 1 DDPM++, 2 NCSN++.
        encoder_type: str = "standard",  # 'standard', 'skip' or 'residual' (NCSN++).
        decoder_type: str = "standard",  # 'standard' or 'skip'.
        resample_filter: Sequence[int] = (1, 1),  # [1,1] DDPM++, [1,3,3,1] NCSN++.
    ) -> None:
        if embedding_type not in ("fourier", "positional"):
            raise ValueError(
                f"embedding_type must be 'fourier' or 'positional', not {embedding_type!r}"
            )
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"unknown encoder_type {encoder_type!r}")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"unknown decoder_type {decoder_type!r}")
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block = dict(
            emb_channels=emb_channels,
            num_heads=1,
            dropout=dropout,
            skip_scale=math.sqrt(0.5),
            eps=1e-6,
            resample_filter=resample_filter,
            resample_proj=True,
            adaptive_scale=False,
            init=init,
            init_zero=init_zero,
            init_attn=init_attn,
        )

        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = (
            Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        )
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(
                        caux, caux, kernel=0, down=True, resample_filter=resample_filter
                    )
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        caux,
                        cout,
                        kernel=3,
                        down=True,
                        resample_filter=resample_filter,
                        fused_resample=True,
                        **init,
                    )
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                attention = res in attn_resolutions
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=attention, **block
                )
        skips = [b.out_channels for name, b in self.enc.items() if "aux" not in name]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attention = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=attention, **block
                )
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(
                        out_channels,
                        out_channels,
                        kernel=0,
                        up=True,
                        resample_filter=resample_filter,
                    )
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(
                    cout, out_channels, kernel=3, **init_zero
                )

    def shard_blocks(self) -> list[nn.Module]:
        """The U-Net blocks, sharded (and gathered) one at a time under FSDP."""
        return [m for m in (*self.enc.values(), *self.dec.values()) if isinstance(m, UNetBlock)]

    def embed(self, noise_labels, class_labels, augment_labels=None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        emb = (
            emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)
        )  # [cos, sin] -> [sin, cos]
        if self.map_label is not None:
            labels = _drop_labels(class_labels, self.label_dropout, self.training)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def encode(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list]:
        """The encoder's output and its skip connections."""
        skips, aux = [], x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        return x, skips

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.embed(noise_labels, class_labels, augment_labels)
        x, skips = self.encode(x, emb)
        aux = normed = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                normed = block(x)
            elif "aux_conv" in name:
                out = block(F.silu(normed))
                aux = out if aux is None else out + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


class DhariwalUNet(_LowestResolutionFeatures, nn.Module):
    """ADM of Dhariwal & Nichol 2021, as re-implemented in EDM."""

    def __init__(
        self,
        img_resolution: int,  # Image resolution at input/output.
        in_channels: int,  # Colour channels at input.
        out_channels: int,  # Colour channels at output.
        label_dim: int = 0,  # Number of classes, 0 = unconditional.
        augment_dim: int = 0,  # Augmentation label width, 0 = none.
        model_channels: int = 192,  # Base channel count.
        channel_mult: Sequence[int] = (1, 2, 3, 4),  # Channel multiplier per resolution.
        channel_mult_emb: int = 4,  # Embedding width multiplier.
        num_blocks: int = 3,  # Residual blocks per resolution.
        attn_resolutions: Sequence[int] = (32, 16, 8),  # Resolutions with self-attention.
        dropout: float = 0.10,  # Dropout probability inside blocks.
        label_dropout: float = 0,  # Label dropout for classifier-free guidance.
    ) -> None:
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(
            init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3)
        )
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block = dict(
            emb_channels=emb_channels,
            channels_per_head=64,
            dropout=dropout,
            init=init,
            init_zero=init_zero,
        )

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = (
            Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        )
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        label_init = dict(init_mode="kaiming_normal", init_weight=math.sqrt(label_dim))
        self.map_label = (
            Linear(label_dim, emb_channels, bias=False, **label_init) if label_dim else None
        )

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                attention = res in attn_resolutions
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=attention, **block
                )
        skips = [b.out_channels for b in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attention = res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=attention, **block
                )
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def shard_blocks(self) -> list[nn.Module]:
        """The U-Net blocks, sharded (and gathered) one at a time under FSDP."""
        return [m for m in (*self.enc.values(), *self.dec.values()) if isinstance(m, UNetBlock)]

    def embed(self, noise_labels, class_labels, augment_labels=None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(
                _drop_labels(class_labels, self.label_dropout, self.training)
            )
        return F.silu(emb)

    def encode(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list]:
        """The encoder's output and its skip connections."""
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        return x, skips

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.embed(noise_labels, class_labels, augment_labels)
        x, skips = self.encode(x, emb)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))
