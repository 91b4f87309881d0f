"""MEGAN networks (Flax Linen, channels-last ``[B, D, H, W, C]``)."""
from megan_jax.models.discriminator import PatchDiscriminator
from megan_jax.models.hr import HRGenerator, ResNetBlock, ResNetGenerator
from megan_jax.models.layers import (BatchNorm, Conv3d, DownConv,
                                     InstanceNorm, OutConv, UpConv,
                                     depth_to_space, space_to_depth)
from megan_jax.models.lr import LRResNetGenerator, LRUNetGenerator

__all__ = [
    "BatchNorm", "Conv3d", "DownConv", "HRGenerator", "InstanceNorm",
    "LRResNetGenerator", "LRUNetGenerator", "OutConv", "PatchDiscriminator",
    "ResNetBlock", "ResNetGenerator", "UpConv", "depth_to_space",
    "space_to_depth",
]
