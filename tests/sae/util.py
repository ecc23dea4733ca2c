"""Small helpers shared by the dictionary tests."""

from __future__ import annotations

import torch

from sae import Dictionary, DictionaryConfig, build
from sae.base import architecture_class

ARCHS = ["relu", "topk", "jumprelu", "batchtopk"]


def random_dictionary(
    arch: str, d_in: int = 6, d_sae: int = 10, k: int = 3, seed: int = 0, **cfg: object
) -> Dictionary:
    """A dictionary of `arch` with every parameter random (thresholds small and positive)."""
    gen = torch.Generator().manual_seed(seed)
    needs_k = architecture_class(arch).needs_k
    d = build(DictionaryConfig(arch, d_in, d_sae, k=k if needs_k else None, **cfg))  # type: ignore[arg-type]
    with torch.no_grad():
        for name, p in d.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=gen) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen))
        if arch == "batchtopk":
            d.update_threshold(d(torch.randn(8, d_in, generator=gen)).feature_acts)
    return d
