"""Running the language model for new text: tokenize, and the direct logit effect of a
decoder direction (hooks are read through `activations.hooks`, the one place that hooks a
model).

Plain functions of (model, dictionary, text) with no HTTP in them, so everything the service
returns can be reproduced from Python (the parity test in tests/server does exactly that).
Tokenization follows the analysis pass (activations/text.py): BOS, then the text's tokens
without special tokens, so positions mean the same thing as in the stored examples.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from activations.text import special_ids
from analysis.logit_effects import LogitEffects, logit_effects, residual_directions
from sae.base import Dictionary
from sae.errors import UserError


class LimitExceeded(UserError):
    """A request is larger than the service allows (prompt tokens, batch, new tokens)."""


def tokenize(model: Any, text: str, max_tokens: int, prepend_bos: bool = True) -> Int[Tensor, " T"]:
    """Token ids of `text` as analysis sees a context: [BOS] + tokens (no special tokens)."""
    ids: list[int] = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if prepend_bos:
        bos, _eos = special_ids(model.tokenizer)
        ids = [bos, *ids]
    limit = min(max_tokens, int(model.cfg.n_ctx))
    if len(ids) > limit:
        raise LimitExceeded(f"text is {len(ids)} tokens; the limit is {limit}")
    if not ids:
        raise UserError("text has no tokens")
    return torch.tensor(ids, dtype=torch.long)


def token_strings(model: Any, token_ids: list[int]) -> list[str]:
    return [model.tokenizer.decode([i]) for i in token_ids]


@torch.no_grad()
def feature_logit_effects(
    model: Any, dictionary: Dictionary, feature_id: int, k: int
) -> LogitEffects | None:
    """The promoted and suppressed tokens of one feature, computed exactly as the analysis
    pass computes them for the store (direct path, unit decoder direction @ W_U)."""
    hook_name = dictionary.cfg.hook_name or ""
    W = dictionary.W_dec[feature_id : feature_id + 1]
    return logit_effects(model, hook_name, W.to(model.W_U.device), k)


@torch.no_grad()
def token_scores(model: Any, dictionary: Dictionary, token_id: int) -> Float[Tensor, " F"] | None:
    """Every feature's direct logit effect on one token: the `feature_logit_effects`
    quantity read down a column. The hook space's map to the residual stream is linear, so
    it is applied to the token's unembedding column once (M u), never to all F directions."""
    hook_name = dictionary.cfg.hook_name or ""
    W_U = model.W_U.detach().float()
    eye = torch.eye(dictionary.d_in, device=W_U.device)
    M = residual_directions(model, hook_name, eye)  # [d_in, d_model]
    if M is None:
        return None
    v = M @ W_U[:, token_id]  # [d_in]
    unit = F.normalize(dictionary.W_dec.float(), dim=-1)
    return (unit @ v.to(unit.device)).cpu()
