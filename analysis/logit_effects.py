"""Direct logit effects of dictionary features: which output tokens each decoder direction
promotes and suppresses (the feature-dashboard convention of Anthropic, SAEDashboard and
Neuronpedia). Used by `sae analyze` (analysis/analyze.py) and the server's steering.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

logger = logging.getLogger(__name__)


class LogitEffects(NamedTuple):
    """Per feature, the output tokens its decoder direction raises and lowers most."""

    promoted: Float[Tensor, "F K"]
    """Largest direct logit effects, descending."""
    promoted_ids: Int[Tensor, "F K"]
    suppressed: Float[Tensor, "F K"]
    """Most negative direct logit effects, ascending (most suppressed first)."""
    suppressed_ids: Int[Tensor, "F K"]


def residual_directions(model: Any, hook_name: str, W_dec: Float[Tensor, "F D"]) -> Tensor | None:
    """Unit decoder directions mapped into the residual stream, or None if the hook's space
    has no linear path there (e.g. attention patterns).

    Residual-stream hooks (hook_resid_*, hook_mlp_out, hook_attn_out, embeddings) are already
    there; `mlp.hook_post` goes through that layer's W_out [d_mlp, d_model]; `attn.hook_z`
    (heads x d_head, flattened) through W_O.
    """
    d = F.normalize(W_dec.float(), dim=-1)
    parts = hook_name.split(".")
    last = parts[-1]
    if last in {"hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out",
                "hook_attn_out", "hook_embed", "hook_pos_embed"}:  # fmt: skip
        return d
    if len(parts) == 4 and parts[0] == "blocks" and parts[2] == "mlp" and last == "hook_post":
        W_out = model.W_out[int(parts[1])].detach().float().to(d.device)
        return d @ W_out
    if len(parts) == 4 and parts[0] == "blocks" and parts[2] == "attn" and last == "hook_z":
        W_O = model.W_O[int(parts[1])].detach().float().to(d.device)
        return d @ W_O.reshape(-1, W_O.shape[-1])
    return None


@torch.no_grad()
def logit_effects(
    model: Any, hook_name: str, W_dec: Float[Tensor, "F D"], k: int, chunk: int = 1024
) -> LogitEffects | None:
    """Direct logit effects of every feature: unit decoder direction -> residual -> W_U.

    As the feature dashboards do (Anthropic's, SAEDashboard, Neuronpedia), this is the direct
    path only: later layers are skipped and the final LayerNorm's scale is ignored (its
    weights are folded into TransformerLens's W_U, and W_U is centred, so the effects are
    relative logits). It ranks tokens exactly for a change in the final residual stream.
    Returns None when the hook's space has no linear path to the residual stream.
    """
    dirs = residual_directions(model, hook_name, W_dec)
    if dirs is None:
        logger.warning("no logit effects for hook %s: no linear path to the logits", hook_name)
        return None
    W_U = model.W_U.detach().float().to(dirs.device)
    k = min(k, W_U.shape[1])
    out: list[tuple[Tensor, ...]] = []
    for start in range(0, dirs.shape[0], chunk):
        logits = dirs[start : start + chunk] @ W_U  # [chunk, d_vocab]
        p = logits.topk(k, dim=1)
        s = logits.topk(k, dim=1, largest=False)
        out.append((p.values, p.indices, s.values, s.indices))
    return LogitEffects(*(torch.cat(parts).cpu() for parts in zip(*out, strict=True)))
