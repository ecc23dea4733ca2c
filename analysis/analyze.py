"""Feature analysis: ONE pass of text through model + dictionary collects, for every feature
at once, its top-N activating contexts, a uniform sample of its activations bucketed by
quantile, firing counts, mean and max activation and an activation histogram; then the logit
effects of every decoder direction. The result goes to the feature store (analysis/store.py).

The activations come from a model pass or an activation cache (activations/contexts.py); the
per-feature bookkeeping is analysis/accumulator.py, the logit effects analysis/logit_effects.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from activations.contexts import ActivationBatch, cached_activations, model_activations
from activations.hooks import check_hook_width
from activations.prefetch import in_background
from analysis.accumulator import AnalysisConfig, FeatureAccumulator
from analysis.logit_effects import logit_effects
from analysis.store_records import FeatureArrays, StoreMeta
from sae.base import Dictionary
from sae.errors import UserError
from sae.progress import progress_bar


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def token_strings(tokenizer: Any, d_vocab: int) -> list[str]:
    """How each token id reads in text (byte-level BPE markers decoded)."""
    n = min(d_vocab, len(tokenizer))
    vocab = [tokenizer.decode([i]) for i in range(n)]
    return vocab + [f"<{i}>" for i in range(n, d_vocab)]


@torch.no_grad()
def analyze(
    model: Any,
    dictionary: Dictionary,
    text: Any,
    cfg: AnalysisConfig,
    *,
    hook_name: str | None = None,
    dictionary_name: str = "",
    model_name: str = "",
    progress: bool = True,
    cache: str | Path | None = None,
) -> FeatureArrays:
    """The whole analysis of one dictionary: one pass over `text` (a TextConfig), or over
    the activation cache `cache` if given (no model forward), then logit effects. Checks
    the model/dictionary pairing first."""
    hook_name = hook_name or dictionary.cfg.hook_name
    if not hook_name:
        raise UserError("the dictionary's cfg.json names no hook_name; pass --hook")
    check_hook_width(model, hook_name, dictionary.d_in)
    device = dictionary.device
    acc = FeatureAccumulator(dictionary.d_sae, cfg, device)
    bar = progress_bar(total=cfg.n_tokens, unit="tok", disable=not progress, desc="analyze")
    pad = _pad_id(model.tokenizer)
    source: Iterator[ActivationBatch]
    if cache is not None:
        source = in_background(
            cached_activations(cache, hook_name, cfg.n_tokens, text.batch_size, pad, device), 2
        )
    else:
        source = model_activations(model, hook_name, text, cfg.n_tokens, device)
    for batch in source:
        x = batch.acts.to(dictionary.dtype)
        acc.update(batch.tokens, batch.sequence, dictionary.encode(x), batch.valid)
        bar.update(batch.tokens.numel())
    bar.close()
    if acc.n_tokens == 0:
        raise UserError(f"no text to analyse in {text.dataset!r}")
    effects = logit_effects(model, hook_name, dictionary.W_dec, cfg.n_logits)
    meta = StoreMeta(
        dictionary=dictionary_name,
        hook_name=hook_name,
        model_name=model_name,
        d_in=dictionary.d_in,
        d_sae=dictionary.d_sae,
        n_tokens=acc.n_tokens,
        n_top=cfg.n_top,
        n_quantiles=cfg.n_quantiles,
        examples_per_quantile=cfg.examples_per_quantile,
        context_before=cfg.context_before,
        context_after=cfg.context_after,
        histogram_edges=cfg.histogram_edges().tolist(),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        generation=0,
        extra={
            "text": str(cache) if cache is not None else text.dataset,
            "split": text.split,
            "context_size": text.context_size,
            "architecture": dictionary.cfg.architecture,
            "pad_token_id": pad,
            "logit_effects": "direct path, unit decoder direction @ W_U (no final LN scale)"
            if effects is not None
            else None,
        },
    )
    vocab = token_strings(model.tokenizer, int(model.cfg.d_vocab))
    return acc.result(meta, vocab, effects)
