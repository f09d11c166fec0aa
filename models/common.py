"""Shared helpers for the model zoo: seeding and realistic BatchNorm state.

A freshly constructed BatchNorm has ``running_mean = 0``, ``running_var = 1``, ``γ = 1`` and ``β = 0``: folding
it is the identity on the producer's weights and would hide every numerical bug. :func:`calibrate_batchnorm`
gives each BN a state like a trained network's: random affine parameters and running statistics measured on
a few training-mode forward passes over shifted, scaled random data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batchnorm_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm1d/2d/3d submodule of ``model`` in registration order."""
    return [module for module in model.modules() if isinstance(module, BATCHNORM_TYPES)]


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch on one intra-op thread so that reductions sum in the same order on every machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def calibration_batch(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A random batch ``N(0, 1) * scale + offset`` with ``scale ~ U(0.5, 3)``, ``offset ~ U(0.25, 1.5)`` per call.

    Shifting (always upwards, like un-centred image data) and scaling the data moves the measured running
    statistics well away from 0/1, including in the first BN after the input.
    """
    scale = 0.5 + 2.5 * torch.rand((), generator=generator).item()
    offset = 0.25 + 1.25 * torch.rand((), generator=generator).item()
    return torch.randn(shape, generator=generator) * scale + offset


@torch.no_grad()
def calibrate_batchnorm(
    model: nn.Module,
    make_batch: Callable[[torch.Generator], tuple[torch.Tensor, ...]],
    *,
    seed: int,
    passes: int = 4,
) -> nn.Module:
    """Give every BatchNorm of ``model`` a realistic inference state, then put ``model`` in eval mode.

    1. ``γ ~ U(0.4, 1.6)`` and ``β ~ N(0, 0.25)`` per channel (randomised, not 1/0).
    2. Running statistics are reset and re-measured as the cumulative average (``momentum=None``) over
       ``passes`` training-mode forward passes of ``make_batch(generator)``.
    3. The original momentum is restored (it is exported as an attribute) and the model is switched to eval.

    Preconditions: ``model`` has been built under a fixed torch seed; ``make_batch`` draws only from the
    generator it receives, so the result depends on ``seed`` alone.
    """
    generator = torch.Generator().manual_seed(seed)
    norms = batchnorm_modules(model)
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        if norm.affine:
            norm.weight.copy_(0.4 + 1.2 * torch.rand(norm.weight.shape, generator=generator))
            norm.bias.copy_(0.25 * torch.randn(norm.bias.shape, generator=generator))
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with single_threaded():
        for _ in range(passes):
            model(*make_batch(generator))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    return model.eval()
