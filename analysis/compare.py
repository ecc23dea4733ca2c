"""Comparing two dictionaries on the same hook: feature splitting and universality
("Towards Monosemanticity", Bricken et al. 2023, sections on feature splitting and
universality): for every feature of each dictionary, its nearest features in the other by
decoder cosine similarity and by activation correlation over a text sample.

Correlation is Pearson over tokens, from streamed sums (Σa, Σb, Σa², Σb², Σab): memory is
O(d_sae_a x d_sae_b) and independent of the number of tokens.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from activations.contexts import model_activations
from activations.hooks import check_hook_width
from sae.base import Dictionary
from sae.errors import UserError
from sae.progress import progress_bar

logger = logging.getLogger(__name__)


class Nearest(NamedTuple):
    """For every feature of one dictionary, its k nearest features in the other."""

    cosine: Float[Tensor, "F K"]
    """Decoder cosine similarity, descending."""
    cosine_ids: Int[Tensor, "F K"]
    correlation: Float[Tensor, "F K"]
    """Pearson correlation of activations over the text sample, descending (0 if either
    feature never fired)."""
    correlation_ids: Int[Tensor, "F K"]


class Comparison(NamedTuple):
    a_to_b: Nearest
    b_to_a: Nearest
    n_tokens: int


def _topk_rows(m: Tensor, k: int) -> tuple[Tensor, Tensor]:
    k = min(k, m.shape[1])
    v, i = m.topk(k, dim=1)
    return v.float().cpu(), i.cpu()


@torch.no_grad()
def decoder_cosine(W_a: Float[Tensor, "Fa D"], W_b: Float[Tensor, "Fb D"]) -> Tensor:
    """Cosine similarity of every pair of decoder rows, [Fa, Fb]."""
    return F.normalize(W_a.float(), dim=1) @ F.normalize(W_b.float(), dim=1).T


class CorrelationAccumulator:
    """Streaming Pearson correlation between every feature of A and every feature of B."""

    def __init__(self, fa: int, fb: int, device: torch.device | str = "cpu") -> None:
        kw: dict[str, Any] = {"dtype": torch.float64, "device": device}
        self.n = 0
        self.sa, self.sb = torch.zeros(fa, **kw), torch.zeros(fb, **kw)
        self.saa, self.sbb = torch.zeros(fa, **kw), torch.zeros(fb, **kw)
        self.sab = torch.zeros(fa, fb, **kw)

    def update(self, fa: Float[Tensor, "B Fa"], fb: Float[Tensor, "B Fb"]) -> None:
        fa, fb = fa.float(), fb.float()
        self.n += fa.shape[0]
        self.sa += fa.sum(0).double()
        self.sb += fb.sum(0).double()
        self.saa += fa.square().sum(0).double()
        self.sbb += fb.square().sum(0).double()
        self.sab += (fa.T @ fb).double()  # float32 per batch, float64 across batches

    def correlation(self) -> Float[Tensor, "Fa Fb"]:
        n = max(self.n, 1)
        cov = self.sab / n - torch.outer(self.sa / n, self.sb / n)
        var_a = (self.saa / n - (self.sa / n).square()).clamp_min(0)
        var_b = (self.sbb / n - (self.sb / n).square()).clamp_min(0)
        denom = torch.outer(var_a.sqrt(), var_b.sqrt())
        corr = torch.where(denom > 0, cov / denom.clamp_min(1e-30), torch.zeros_like(cov))
        return corr.clamp(-1, 1)


@torch.no_grad()
def compare_dictionaries(
    model: Any,
    a: Dictionary,
    b: Dictionary,
    text: Any,
    n_tokens: int,
    k: int = 5,
    progress: bool = True,
) -> Comparison:
    """Nearest features both ways, by decoder cosine and by activation correlation over
    `n_tokens` tokens of `text` (a TextConfig) read at the shared hook."""
    hook = a.cfg.hook_name
    if not hook or hook != b.cfg.hook_name:
        raise UserError(
            f"dictionaries read different hooks ({a.cfg.hook_name!r} vs {b.cfg.hook_name!r}); "
            "compare needs two dictionaries on the same hook"
        )
    if a.d_in != b.d_in:
        raise UserError(f"dictionaries have different d_in ({a.d_in} vs {b.d_in})")
    check_hook_width(model, hook, a.d_in)
    cos = decoder_cosine(a.W_dec, b.W_dec.to(a.device))
    acc = CorrelationAccumulator(a.d_sae, b.d_sae, a.device)
    bar = progress_bar(total=n_tokens, unit="tok", disable=not progress, desc="compare")
    for batch in model_activations(model, hook, text, n_tokens, a.device):
        x = batch.acts.reshape(-1, a.d_in)
        acc.update(a.encode(x.to(a.dtype)), b.encode(x.to(device=b.device, dtype=b.dtype)))
        bar.update(x.shape[0])
    bar.close()
    if acc.n == 0:
        raise UserError(f"no text to compare on in {text.dataset!r}")
    corr = acc.correlation()

    def nearest(c: Tensor, r: Tensor) -> Nearest:
        cv, ci = _topk_rows(c, k)
        rv, ri = _topk_rows(r, k)
        return Nearest(cv, ci, rv, ri)

    return Comparison(nearest(cos, corr), nearest(cos.T, corr.T), acc.n)


def comparison_json(cmp: Comparison, name_a: str, name_b: str) -> dict[str, Any]:
    """A JSON-able record of the comparison (per feature lists, both directions)."""

    def side(n: Nearest) -> list[dict[str, Any]]:
        return [
            {
                "feature_id": f,
                "cosine": [
                    [int(i), round(float(v), 6)]
                    for i, v in zip(n.cosine_ids[f], n.cosine[f], strict=True)
                ],
                "correlation": [
                    [int(i), round(float(v), 6)]
                    for i, v in zip(n.correlation_ids[f], n.correlation[f], strict=True)
                ],
            }
            for f in range(n.cosine.shape[0])
        ]

    return {
        "a": name_a,
        "b": name_b,
        "n_tokens": cmp.n_tokens,
        "summary": summary(cmp),
        "a_to_b": side(cmp.a_to_b),
        "b_to_a": side(cmp.b_to_a),
    }


def summary(cmp: Comparison) -> dict[str, float]:
    """Headline numbers: how many features have a close match on the other side."""
    out: dict[str, float] = {}
    for name, n in (("a_to_b", cmp.a_to_b), ("b_to_a", cmp.b_to_a)):
        best_cos = n.cosine[:, 0].numpy()
        best_corr = n.correlation[:, 0].numpy()
        out[f"{name}.mean_max_cosine"] = float(np.mean(best_cos))
        out[f"{name}.frac_cosine_above_0.7"] = float(np.mean(best_cos > 0.7))
        out[f"{name}.mean_max_correlation"] = float(np.mean(best_corr))
        out[f"{name}.frac_correlation_above_0.7"] = float(np.mean(best_corr > 0.7))
    return out
