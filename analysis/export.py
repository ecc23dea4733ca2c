"""Export a feature store for other tools.

- Neuronpedia-style JSON, one file per feature, with the field names of Neuronpedia's
  `Neuron` and `Activation` records (pos_str/pos_values, neg_str/neg_values, frac_nonzero,
  freq_hist_data_bar_heights/values, maxActApprox, activations[{tokens, values, maxValue,
  maxValueTokenIndex, minValue, binMin, binMax}], explanations[{description, authorId}]).
- The latent-cache layout of EleutherAI's Delphi (auto-interpretation):
  `<out>/<hook_name>/<start>_<end>.safetensors` holding `locations` [n, 3] (row, position,
  latent - start), `activations` [n] (float16) and `tokens` [rows, ctx], plus
  `<out>/<hook_name>/config.json`. Our examples are windows, not whole documents, so every
  stored example window (top and quantile) becomes one token row, and every non-zero
  per-token activation inside it one location: Delphi then samples and explains from exactly
  the contexts the store holds.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from analysis.store import FeatureStore
from analysis.store_records import Example
from sae.atomic import atomic_dir
from sae.errors import UserError

logger = logging.getLogger(__name__)


def _check_replaceable(out: Path, pattern: re.Pattern[str], what: str) -> None:
    """Exports replace their directory whole; never replace one holding anything else."""
    if out.exists():
        if not out.is_dir():
            raise UserError(f"{out} exists and is not a directory")
        foreign = [p.name for p in out.iterdir() if not pattern.fullmatch(p.name)]
        if foreign:
            raise UserError(
                f"{out} holds files that are not a {what} export ({', '.join(sorted(foreign)[:3])}"
                "...); choose an empty or new directory"
            )


def _activation_json(ex: Example, bins: tuple[float, float] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "tokens": ex.tokens,
        "values": ex.acts,
        "maxValue": ex.max_act,
        "maxValueTokenIndex": ex.max_index,
        "minValue": min(ex.acts) if ex.acts else 0.0,
        "dataIndex": f"{ex.sequence}:{ex.position}",
    }
    if bins is not None:
        out["binMin"], out["binMax"] = bins
    return out


def neuronpedia_feature(store: FeatureStore, feature_id: int, model_id: str, layer: str) -> dict:
    """One feature in Neuronpedia's JSON shape (top activations first, then quantile ones
    with their bucket's activation range as binMin/binMax)."""
    rec = store.feature(feature_id)
    meta = store.meta()
    quantile = store.quantile_examples(feature_id, limit=meta.n_quantiles * 1000)
    ranges: dict[int, tuple[float, float]] = {}
    for ex in quantile:
        lo, hi = ranges.get(ex.quantile or 0, (ex.max_act, ex.max_act))
        ranges[ex.quantile or 0] = (min(lo, ex.max_act), max(hi, ex.max_act))
    edges = rec.histogram.edges
    centres = [(a * b) ** 0.5 for a, b in itertools.pairwise(edges)]
    return {
        "modelId": model_id,
        "layer": layer,
        "index": str(feature_id),
        "hookName": meta.hook_name,
        "maxActApprox": rec.max_act,
        "frac_nonzero": rec.density,
        "pos_str": [e.token for e in rec.promoted],
        "pos_values": [e.value for e in rec.promoted],
        "neg_str": [e.token for e in rec.suppressed],
        "neg_values": [e.value for e in rec.suppressed],
        "freq_hist_data_bar_heights": rec.histogram.counts,
        "freq_hist_data_bar_values": centres,
        "activations": [_activation_json(e) for e in store.top_examples(feature_id, limit=10**6)]
        + [_activation_json(e, ranges[e.quantile or 0]) for e in quantile],
        "explanations": [{"description": lab.text, "authorId": lab.author} for lab in rec.labels],
    }


def export_neuronpedia(
    store: FeatureStore, out: str | Path, model_id: str | None = None, layer: str | None = None
) -> Path:
    """Write `<out>/<feature_id>.json` for every feature (atomically, as one directory)."""
    meta = store.meta()
    model_id = model_id or Path(meta.model_name).name or "model"
    layer = layer or meta.hook_name
    out = Path(out)
    _check_replaceable(out, re.compile(r"\d+\.json"), "Neuronpedia")
    with atomic_dir(out) as tmp:
        for f in range(meta.d_sae):
            doc = neuronpedia_feature(store, f, model_id, layer)
            (tmp / f"{f}.json").write_text(json.dumps(doc))
    logger.info("wrote %d Neuronpedia feature files to %s", meta.d_sae, out)
    return out


def export_delphi(store: FeatureStore, out: str | Path, n_splits: int = 1) -> Path:
    """Write the store's examples as a Delphi latent cache under `<out>/<hook_name>/`."""
    from safetensors.numpy import save_file

    meta = store.meta()
    W = meta.context_before + 1 + meta.context_after
    pad = int(meta.extra.get("pad_token_id") or 0)
    rows: list[list[int]] = []
    locs: list[tuple[int, int, int]] = []
    acts: list[float] = []
    for f in range(meta.d_sae):
        examples = store.top_examples(f, limit=10**6) + store.quantile_examples(f, limit=10**6)
        for ex in examples:
            # Re-pad to a fixed width: a window clipped at a context start is left-padded.
            left = meta.context_before - ex.max_index
            ids = [pad] * left + ex.token_ids
            vals = [0.0] * left + ex.acts
            ids += [pad] * (W - len(ids))
            vals += [0.0] * (W - len(vals))
            row = len(rows)
            rows.append(ids)
            for pos, v in enumerate(vals):
                if v > 0:
                    locs.append((row, pos, f))
                    acts.append(v)
    tokens = np.asarray(rows, dtype=np.int64).reshape(-1, W)
    locations = np.asarray(locs, dtype=np.int64).reshape(-1, 3)
    activations = np.asarray(acts, dtype=np.float16)
    bounds = np.linspace(0, meta.d_sae, n_splits + 1).astype(int)
    out = Path(out)
    _check_replaceable(
        out / meta.hook_name, re.compile(r"\d+_\d+\.safetensors|config\.json"), "Delphi"
    )
    with atomic_dir(out / meta.hook_name) as tmp:
        for start, stop in itertools.pairwise(bounds):
            end = stop - 1  # Delphi names splits by inclusive bounds
            mask = (locations[:, 2] >= start) & (locations[:, 2] <= end)
            split_locs = locations[mask].copy()
            split_locs[:, 2] -= start
            dtype = np.uint16 if split_locs.size == 0 or split_locs.max() < 2**16 else np.uint32
            save_file(
                {
                    "locations": split_locs.astype(dtype),
                    "activations": activations[mask],
                    "tokens": tokens,
                },
                str(tmp / f"{start}_{end}.safetensors"),
            )
        config = {
            "model_name": meta.model_name,
            "dataset_repo": meta.extra.get("text", ""),
            "dataset_split": meta.extra.get("split", ""),
            "cache_ctx_len": W,
            "n_tokens": meta.n_tokens,
            "n_splits": n_splits,
            "batch_size": 1,
            "source": "sae analyze: stored example windows (top-N and quantile samples)",
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    logger.info("wrote a Delphi latent cache (%d rows) to %s", len(rows), out / meta.hook_name)
    return out / meta.hook_name
