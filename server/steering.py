"""Steering: generate text while dictionary features are intervened on at their hook.

Two interventions, applied at every position of every forward pass:

- `add`:   x' = x + strength · unit · W_dec[i]. `unit` is the feature's max activation from
  analysis, so strength 1 means "as strongly as the feature ever fired" whatever the
  dictionary (Neuronpedia's raw strengths mean nothing across dictionaries). Without
  analysis (or for a feature that never fired in it) the unit is mean_t ||x_t|| / ||W_dec[i]|| over the prompt: strength 1 adds a
  vector as long as a typical activation.
- `clamp`: set the feature to a value while keeping the dictionary's reconstruction error,
  x' = x + (v - f_i(x)) · W_dec[i]  (Templeton et al. 2024, "Scaling Monosemanticity", the
  Golden Gate demo: the error term x - x_hat is left untouched).

`generate` runs baseline and steered decoding through the same code path with the same seeded
generator, and an `add` of strength 0 adds exact zeros, so it reproduces the baseline token
for token. There is no KV cache: each step re-runs the window, which keeps hooks simple and
is cheap at the context lengths the service allows. The model is hooked through
`activations.hooks` (`run_with_edits`, `hook_activations`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from activations.hooks import Edit, hook_activations, run_with_edits
from sae.base import Dictionary
from sae.errors import UserError

Hook = tuple[str, Edit]
"""A hook name and the edit applied to its activation."""


@dataclass(frozen=True)
class Steer:
    """One intervention on one feature."""

    dictionary: Dictionary
    feature_id: int
    mode: Literal["add", "clamp"]
    strength: float
    """add: multiples of `unit`; clamp: the activation value to hold the feature at."""
    unit: float = 1.0
    """Activation units per unit of strength (add only)."""

    @property
    def hook_name(self) -> str:
        name = self.dictionary.cfg.hook_name
        if name is None:
            raise ValueError("dictionary has no hook_name")
        return name


@torch.no_grad()
def _apply(steers: list[Steer], x: Tensor) -> Tensor:
    deltas = []
    for s in steers:  # every delta is computed from the unsteered x: steers do not interact
        d = s.dictionary
        row = d.W_dec[s.feature_id]
        if s.mode == "add":
            coeff = torch.full(x.shape[:-1], s.strength * s.unit, device=x.device)
        else:
            f = d.encode(x.to(d.device, d.dtype))[..., s.feature_id]
            coeff = s.strength - f
        deltas.append(coeff[..., None].to(row.dtype) * row)
    out = x
    for delta in deltas:
        out = out + delta.to(x.device, x.dtype)
    return out


def steering_hooks(steers: list[Steer]) -> list[Hook]:
    """Hook edits applying `steers`, one per hook name."""
    by_hook: dict[str, list[Steer]] = {}
    for s in steers:
        by_hook.setdefault(s.hook_name, []).append(s)
    return [(name, functools.partial(_apply, group)) for name, group in by_hook.items()]


@torch.no_grad()
def prompt_norm_unit(
    model: Any, prompt_ids: Int[Tensor, " T"], dictionary: Dictionary, feature_id: int
) -> float:
    """The no-analysis unit of `add`: mean activation norm over the prompt / ||W_dec[i]||."""
    assert dictionary.cfg.hook_name is not None
    x = hook_activations(model, prompt_ids, dictionary.cfg.hook_name).float()
    row_norm = float(dictionary.W_dec[feature_id].float().norm().clamp_min(1e-12))
    return float(x.norm(dim=-1).mean()) / row_norm


@torch.no_grad()
def next_token_logits(model: Any, ids: Int[Tensor, " T"], hooks: list[Hook]) -> Float[Tensor, " V"]:
    """Logits for the token after `ids` with `hooks` active (the window is the last n_ctx)."""
    device = next(model.parameters()).device
    window = ids[-int(model.cfg.n_ctx) :].to(device)[None]
    return run_with_edits(model, window, dict(hooks))[0, -1].float()


@torch.no_grad()
def generate(
    model: Any,
    prompt_ids: Int[Tensor, " T"],
    hooks: list[Hook],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    stop_ids: tuple[int, ...] = (),
) -> list[int]:
    """Token ids generated after the prompt: greedy at temperature 0, else seeded sampling."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = prompt_ids.clone().cpu()
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = next_token_logits(model, ids, hooks).cpu().double()
        if not bool(torch.isfinite(logits).all()):
            raise UserError("steering made the logits infinite or NaN; use a smaller strength")
        if temperature == 0.0:
            nxt = int(logits.argmax())
        else:
            # Shift first: the best token's logit is 0, so a tiny temperature gives -inf for
            # the others (probability 0), never inf/inf = NaN.
            logits = (logits - logits.max()) / temperature
            if top_k is not None and top_k < logits.numel():
                kth = logits.topk(top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        if nxt in stop_ids:
            break
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([nxt])])
    return out
