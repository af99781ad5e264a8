"""Stable Diffusion's UNet (diffusers' UNet2DConditionModel) behind our raw-network call.

Registered as architecture `diffusers.UNet2DConditionModel`: a `NetworkSpec` naming it, with the
UNet's config as `arch_kwargs` and the `ddpm` preconditioning (`discrete_ddpm`), plus the weights,
is a teacher, path node or generator file like any other. The UNet is built from its config by
diffusers (no code from a model folder runs); weights come from safetensors only.

Text conditions arrive as keywords (see `text_to_image.text`): `encoder_hidden_states` and, for
SDXL, `text_embeds` (pooled) and `time_ids`. Keys starting with `uncond_` are the unconditional
twins that classifier-free guidance (`method.guidance`) swaps in; the UNet itself ignores them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from disback_cli.errors import DisbackError
from disback_cli.models.networks import register_architecture

ARCH = "diffusers.UNet2DConditionModel"
UNCOND_PREFIX = "uncond_"
TOKENS = 77  # CLIP's context length: prompts are padded to it


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise DisbackError(
            'text-to-image teachers need the diffusers extra: pip install -e ".[diffusers]"'
        ) from None
    return diffusers


class DiffusersUNet(nn.Module):
    """F(x, c_noise = timestep, **text conditions) of a UNet2DConditionModel."""

    def __init__(self, data_shape: tuple[int, ...], label_dim: int = 0, **config: Any) -> None:
        super().__init__()
        if label_dim:
            raise DisbackError(f"{ARCH} takes text conditions, not class labels")
        if len(data_shape) != 3 or data_shape[0] != config.get("in_channels", 4):
            raise DisbackError(
                f"{ARCH}: latents of shape {data_shape} do not match in_channels "
                f"{config.get('in_channels', 4)}"
            )
        self.unet = _diffusers().UNet2DConditionModel.from_config(config)
        self.text_time = self.unet.config.addition_embed_type == "text_time"

    def shard_blocks(self) -> list[nn.Module]:
        """Its ResNet blocks and transformer layers, sharded (and gathered) one at a time under
        FSDP. Not the down/mid/up blocks: SDXL's first up block holds 47 % of the weights, and a
        unit is whole in memory, with its gradient, while it runs."""
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.resnet import ResnetBlock2D

        layers = (ResnetBlock2D, BasicTransformerBlock)
        return [m for m in self.unet.modules() if isinstance(m, layers)]

    # Where a discriminator reads it: after the mid block (DMD2's `classify_forward` for SD),
    # or the last down block's output.
    feature_points = ("middle", "encoder")

    def _added(self, x, text_embeds, time_ids, others) -> dict | None:
        unknown = [k for k in others if not k.startswith(UNCOND_PREFIX)]
        if unknown:
            raise TypeError(f"{ARCH} got unknown conditions {unknown}")
        if not self.text_time:
            return None
        if text_embeds is None or time_ids is None:
            raise DisbackError(f"{ARCH} (SDXL) needs text_embeds and time_ids")
        return {"text_embeds": text_embeds.to(x.dtype), "time_ids": time_ids.to(x.dtype)}

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        *,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        **others: torch.Tensor,
    ) -> torch.Tensor:
        added = self._added(x, text_embeds, time_ids, others)
        return self.unet(
            x,
            c_noise,
            encoder_hidden_states.to(x.dtype),
            added_cond_kwargs=added,
            return_dict=False,
        )[0]

    def features(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        where: str = "middle",
        *,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        **others: torch.Tensor,
    ) -> torch.Tensor:
        """UNet2DConditionModel.forward's steps up to `where` (the SD / SDXL configurations:
        no class embedding, no input centring, no adapters)."""
        unet, added = self.unet, self._added(x, text_embeds, time_ids, others)
        if unet.config.center_input_sample or unet.class_embedding is not None:
            raise DisbackError(f"{ARCH}: features of a UNet with class embeddings or centring")
        emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=c_noise))
        text = encoder_hidden_states.to(x.dtype)
        extra = unet.get_aug_embed(emb=emb, encoder_hidden_states=text, added_cond_kwargs=added)
        emb = emb if extra is None else emb + extra
        emb = emb if unet.time_embed_act is None else unet.time_embed_act(emb)
        text = unet.process_encoder_hidden_states(
            encoder_hidden_states=text, added_cond_kwargs=added
        )
        h = unet.conv_in(x)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h = block(hidden_states=h, temb=emb, encoder_hidden_states=text)[0]
            else:
                h = block(hidden_states=h, temb=emb)[0]
        if where == "encoder" or unet.mid_block is None:
            return h
        if getattr(unet.mid_block, "has_cross_attention", False):
            return unet.mid_block(h, emb, encoder_hidden_states=text)
        return unet.mid_block(h, emb)


def example_conditions(config: dict[str, Any], batch: int) -> dict[str, torch.Tensor]:
    """Zero conditions of the right shapes, for checking that a spec's network runs."""
    width = config.get("cross_attention_dim", 1280)
    width = width[0] if isinstance(width, (list, tuple)) else width
    cond = {"encoder_hidden_states": torch.zeros(batch, TOKENS, width)}
    if config.get("addition_embed_type") == "text_time":
        pooled = (
            config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        )
        cond.update(text_embeds=torch.zeros(batch, pooled), time_ids=torch.zeros(batch, 6))
    return cond


def unet_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A UNet config.json as constructor kwargs: diffusers' bookkeeping keys (`_class_name`,
    `_diffusers_version`, `_use_default_values`, ...) dropped, lists kept as lists."""
    return {k: v for k, v in raw.items() if not k.startswith("_")}


register_architecture(ARCH, DiffusersUNet, lambda spec, n: example_conditions(spec.arch_kwargs, n))
