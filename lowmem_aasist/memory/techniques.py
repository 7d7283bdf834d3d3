"""Memory and speed techniques, each a small function applied to a model once at setup."""

from __future__ import annotations

import torch
from torch import nn


def _to_channels_last(_module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=torch.channels_last),)


def apply_channels_last(model: nn.Module) -> nn.Module:
    """Run the 2-D encoder in channels-last layout (faster bf16 convolutions on CPU); the math is unchanged.

    The encoder's weights are converted once and its input on every call, by a forward pre-hook, so the model's
    own code does not know about layouts.
    """
    encoder = model.get_submodule("encoder")
    encoder.to(memory_format=torch.channels_last)
    encoder.register_forward_pre_hook(_to_channels_last)
    return model
