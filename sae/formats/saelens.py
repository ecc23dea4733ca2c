"""SAELens layout: `cfg.json` + `sae_weights.safetensors` (read, and write for export).

Weights use our names already (W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec, and
threshold or log_threshold for jumprelu). The config comes in two layouts: before SAELens 6
everything is flat (`hook_name` or `hook_point`, `activation_fn_str`, `activation_fn_kwargs.k`);
from 6 on, model facts sit under `metadata` (`meta` in some 6.x releases) and topk has `k`.

Scaling is folded so the loaded dictionary acts on raw activations, as SAELens's own
`from_pretrained` does: `normalize_activations = expected_average_only_in` (Anthropic's
April 2024 update: inputs scaled by sqrt(d_in) / E||x||) needs its factor, found in cfg.json
(`norm_scaling_factor`) or SAELens 6's `activation_scaler.json`; a per-feature
`scaling_factor` tensor (SAELens's fine-tuning scale, applied to f before decoding) is
folded into the decoder rows. Per-token normalisations (constant_norm_rescale, layer_norm)
are not linear in x, so they cannot be folded and are refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from sae import io
from sae.atomic import atomic_dir
from sae.base import Dictionary
from sae.devices import DTYPES
from sae.errors import DictionaryFormatError, UserError

WEIGHTS_FILE = "sae_weights.safetensors"
SCALER_FILE = "activation_scaler.json"
# Our architecture -> SAELens 6 architecture name.
EXPORT_NAMES = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}
# The layout we write is SAELens 6's; its loader converts anything older than 6.0 as a
# pre-6 flat config, so the file must say it is in the 6.x layout.
SAELENS_LAYOUT_VERSION = "6.0.0"


def detect(root: Path) -> bool:
    return (root / io.CFG_FILE).is_file() and (root / WEIGHTS_FILE).is_file()


def load(root: Path) -> Dictionary:
    cfg_path = root / io.CFG_FILE
    raw = io.read_json(cfg_path)
    meta = raw.get("metadata") or raw.get("meta") or {}
    if not isinstance(meta, dict):
        raise DictionaryFormatError(cfg_path, "metadata", "expected a JSON object")

    def get(*keys: str) -> Any:
        for key in keys:
            for source in (meta, raw):
                if source.get(key) is not None:
                    return source[key]
        return None

    arch, k = _architecture(cfg_path, raw)
    scale = _input_scale(root, raw)
    dtype = str(raw.get("dtype") or "float32").removeprefix("torch.")
    if dtype not in DTYPES:
        raise DictionaryFormatError(
            cfg_path, "dtype", f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}"
        )
    provenance = {
        "source_format": "saelens",
        "sae_lens_version": get("sae_lens_version"),
        "sae_lens_training_version": get("sae_lens_training_version"),
        "neuronpedia_id": get("neuronpedia_id"),
        "hook_head_index": get("hook_head_index", "hook_point_head_index"),
        # hook_z dictionaries read [..., n_heads, d_head] flattened to [..., d_in].
        "reshape_activations": raw.get("reshape_activations"),
    }
    mapped = {
        "architecture": arch,
        "d_in": raw.get("d_in"),
        "d_sae": raw.get("d_sae"),
        "dtype": dtype,
        "hook_name": get("hook_name", "hook_point"),
        "model_name": get("model_name"),
        "k": k,
        "apply_b_dec_to_input": raw.get("apply_b_dec_to_input", True),
        "provenance": {key: v for key, v in provenance.items() if v not in (None, "none")},
    }
    cfg = io.config_from_json(cfg_path, {key: v for key, v in mapped.items() if v is not None})
    d = io.build_checked(cfg_path, cfg)

    weights_path = root / WEIGHTS_FILE
    tensors = {
        name: io.check_float(weights_path, name, t)
        for name, t in io.read_safetensors(weights_path).items()
    }
    if arch == "jumprelu" and "threshold" not in tensors and "log_threshold" in tensors:
        # SAELens's JumpReLU training form stores log(threshold) to keep it positive.
        tensors["threshold"] = tensors.pop("log_threshold").double().exp()
    feature_scale = tensors.pop("scaling_factor", None)
    if feature_scale is None:
        feature_scale = tensors.pop("finetuning_scaling_factor", None)
    if feature_scale is not None:
        io.expect_shape(weights_path, "scaling_factor", feature_scale, (cfg.d_sae,), "[d_sae]")
    target = DTYPES[dtype]
    io.assign_weights(weights_path, d, {n: t.to(target) for n, t in tensors.items()}, target)
    with torch.no_grad():
        if feature_scale is not None and not bool((feature_scale == 1).all()):
            d.W_dec.mul_(feature_scale.to(d.W_dec)[:, None])
    if scale is not None:
        d.fold_input_scale(scale)
        d.cfg.normalization = {**d.cfg.normalization, "saelens": "expected_average_only_in"}
    return d


def _architecture(cfg_path: Path, raw: dict[str, Any]) -> tuple[str, int | None]:
    arch = raw.get("architecture") or "standard"
    act = raw.get("activation_fn") or raw.get("activation_fn_str") or "relu"
    if arch == "standard" and act == "topk":
        arch = "topk"
    elif arch == "standard" and act != "relu":
        raise DictionaryFormatError(
            cfg_path, "activation_fn", f"unsupported SAELens activation {act!r} (relu or topk)"
        )
    if arch == "standard":
        return "relu", None
    if arch == "jumprelu":
        return "jumprelu", None
    if arch == "topk":
        kwargs = raw.get("activation_fn_kwargs") or {}
        k = raw.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None)
        if k is None:
            raise DictionaryFormatError(cfg_path, "k", "missing for a topk SAE")
        return "topk", k
    raise DictionaryFormatError(
        cfg_path,
        "architecture",
        f"unsupported SAELens architecture {arch!r}; supported: standard, topk, jumprelu "
        "(a batchtopk training checkpoint: load the inference model SAELens saves as jumprelu)",
    )


def _input_scale(root: Path, raw: dict[str, Any]) -> float | None:
    cfg_path = root / io.CFG_FILE
    norm = raw.get("normalize_activations", "none")
    if norm is True:  # SAELens < 3 wrote a bool for the April-update scaling
        norm = "expected_average_only_in"
    if norm in (None, False, "none"):
        return None
    if norm != "expected_average_only_in":
        raise DictionaryFormatError(
            cfg_path,
            "normalize_activations",
            f"{norm!r} rescales each token by its own norm, which cannot be folded into the "
            "weights; supported: none, expected_average_only_in",
        )
    candidates: list[tuple[Path, Any]] = [
        (cfg_path, raw.get(key)) for key in ("norm_scaling_factor", "scaling_factor")
    ]
    if (root / SCALER_FILE).is_file():
        candidates.append(
            (root / SCALER_FILE, io.read_json(root / SCALER_FILE).get("scaling_factor"))
        )
    for path, value in candidates:
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (math.isfinite(value) and value > 0)
        ):
            raise DictionaryFormatError(
                path, "scaling_factor", f"expected a positive number, got {value!r}"
            )
        return float(value)
    raise DictionaryFormatError(
        cfg_path,
        "normalize_activations",
        "is expected_average_only_in but no scaling factor was found (norm_scaling_factor in "
        f"cfg.json or {SCALER_FILE}); without it the dictionary would see unscaled inputs",
    )


def export(d: Dictionary, out: str | Path) -> Path:
    """Write `d` in SAELens 6's layout (loadable by `SAE.load_from_disk(out)`); returns `out`."""
    from safetensors.torch import save_file

    to_inference = getattr(d, "to_inference", None)
    if callable(to_inference):
        d = to_inference()
    name = EXPORT_NAMES.get(d.cfg.architecture)
    if name is None:
        raise UserError(
            f"cannot export architecture {d.cfg.architecture!r} to SAELens "
            f"(supported: {', '.join(EXPORT_NAMES)})"
        )
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in d.state_dict().items()}
    cfg: dict[str, Any] = {
        "architecture": name,
        "d_in": d.d_in,
        "d_sae": d.d_sae,
        "dtype": io.dtype_name(d.dtype),
        "device": "cpu",
        "apply_b_dec_to_input": d.cfg.apply_b_dec_to_input,
        # Our weights already act on raw activations (scaling folded on save).
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": d.cfg.model_name,
            "hook_name": d.cfg.hook_name,
            "sae_lens_version": SAELENS_LAYOUT_VERSION,
            "sae_lens_training_version": None,
        },
    }
    if name == "topk":
        cfg["k"] = d.cfg.k
    out = Path(out)
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / io.CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return out
