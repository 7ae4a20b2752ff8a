"""Shared test helpers."""

import torch


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """10*log10(||ref||^2 / ||ref - test||^2), computed in float64 (inf when equal)."""
    ref64 = ref.detach().to(torch.float64)
    test64 = test.detach().to(torch.float64)
    return (10.0 * torch.log10(ref64.pow(2).sum() / (ref64 - test64).pow(2).sum())).item()
