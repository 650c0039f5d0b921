"""Tiny networks the model tests build and save (no weights can be downloaded here)."""

from __future__ import annotations

import torch


def tiny_unet(channels: int, seed: int = 0):
    """A two-level diffusers ``UNet2DModel`` on 8 x 8 images, seeded weights."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=channels, out_channels=channels,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4,
    )


def tiny_vae(seed: int | None = None):
    """A two-level diffusers ``AutoencoderKL`` (3 channels <-> 4 latent channels, / 2)."""
    from diffusers import AutoencoderKL

    if seed is not None:
        torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=16,
    )
