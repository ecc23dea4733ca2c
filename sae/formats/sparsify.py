"""EleutherAI sparsify layout: `cfg.json` + `sae.safetensors`, one directory per hookpoint.

cfg.json holds `d_in`, `k`, `num_latents` (0 means d_in * `expansion_factor`), `activation`
(topk or groupmax), `normalize_decoder`, `multi_topk`, `skip_connection`, `transcode`.
The weights are `encoder.weight` [F, D] (an nn.Linear, so W_enc transposed), `encoder.bias`
[F], `W_dec` [F, D], `b_dec` [D], and `W_skip` [D, D] with a skip connection.

sparsify encodes TopK(ReLU(encoder(x - b_dec))) and decodes top_acts @ W_dec[idx] + b_dec:
exactly our `topk`. Skip connections and transcoders map x to something other than a
reconstruction of x, so they are refused rather than silently dropped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sae import io
from sae.base import Dictionary
from sae.errors import DictionaryFormatError

SPARSIFY_KEYS = ("num_latents", "expansion_factor", "multi_topk", "normalize_decoder")
# sparsify names hookpoints by the HF module path; these map onto TransformerLens hook names
# (a decoder layer's output is the residual stream after that block).
_HOOKS = [
    (re.compile(r"(?:.*\.)?layers\.(\d+)"), "blocks.{}.hook_resid_post"),
    (re.compile(r"(?:.*\.)?layers\.(\d+)\.mlp"), "blocks.{}.hook_mlp_out"),
    (re.compile(r"(?:.*\.)?h\.(\d+)"), "blocks.{}.hook_resid_post"),
    (re.compile(r"(?:.*\.)?h\.(\d+)\.mlp"), "blocks.{}.hook_mlp_out"),
]


def detect(root: Path) -> bool:
    if not ((root / io.CFG_FILE).is_file() and (root / io.WEIGHTS_FILE).is_file()):
        return False
    raw = io.read_json(root / io.CFG_FILE)
    ours = "format_version" in raw or "architecture" in raw
    return not ours and any(key in raw for key in SPARSIFY_KEYS)


def load(root: Path) -> Dictionary:
    cfg_path = root / io.CFG_FILE
    raw = io.read_json(cfg_path)
    for flag in ("skip_connection", "transcode", "embed_skip", "gram_lookup"):
        if raw.get(flag):
            raise DictionaryFormatError(
                cfg_path, flag, "not supported: the output is not a reconstruction of the input"
            )
    activation = raw.get("activation", "topk")
    if activation != "topk":
        raise DictionaryFormatError(
            cfg_path, "activation", f"unsupported sparsify activation {activation!r} (topk)"
        )
    d_in = raw.get("d_in")
    if d_in is None:
        raise DictionaryFormatError(cfg_path, "d_in", "missing required field")
    num_latents = raw.get("num_latents") or 0
    expansion = raw.get("expansion_factor", 32)  # sparsify's default
    d_sae = num_latents or (d_in * expansion if isinstance(d_in, int) else None)
    if not isinstance(d_sae, int) or isinstance(d_sae, bool):
        raise DictionaryFormatError(
            cfg_path, "num_latents", f"cannot derive d_sae from {num_latents!r}, {expansion!r}"
        )

    weights_path = root / io.WEIGHTS_FILE
    src = io.read_safetensors(weights_path)
    if "W_skip" in src:
        raise DictionaryFormatError(weights_path, "W_skip", "skip connections are not supported")
    w_enc = io.require_tensor(weights_path, src, "encoder.weight")
    io.check_float(weights_path, "encoder.weight", w_enc)
    io.expect_shape(weights_path, "encoder.weight", w_enc, (d_sae, d_in), "[num_latents, d_in]")
    tensors = {
        "W_enc": w_enc.T.contiguous(),
        "b_enc": io.require_tensor(weights_path, src, "encoder.bias"),
        "W_dec": io.require_tensor(weights_path, src, "W_dec"),
        "b_dec": io.require_tensor(weights_path, src, "b_dec"),
    }
    extra = sorted(set(src) - {"encoder.weight", "encoder.bias", "W_dec", "b_dec"})
    if extra:
        raise DictionaryFormatError(weights_path, extra[0], "unexpected tensor")
    for name, t in tensors.items():
        io.check_float(weights_path, name, t)

    hookpoint = root.resolve().name
    provenance: dict[str, Any] = {"source_format": "sparsify", "hookpoint": hookpoint}
    if raw.get("multi_topk"):
        provenance["multi_topk"] = True
    mapped = {
        "architecture": "topk",
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": io.dtype_name(w_enc.dtype),
        "hook_name": _hook_name(hookpoint),
        "model_name": _model_name(root),
        "k": raw.get("k", 32),
        "apply_b_dec_to_input": True,
        "provenance": provenance,
    }
    cfg = io.config_from_json(cfg_path, {key: v for key, v in mapped.items() if v is not None})
    d = io.build_checked(cfg_path, cfg)
    io.assign_weights(weights_path, d, tensors, w_enc.dtype)
    return d


def _hook_name(hookpoint: str) -> str | None:
    for pattern, template in _HOOKS:
        m = pattern.fullmatch(hookpoint)
        if m:
            return template.format(m.group(1))
    return None


def _model_name(root: Path) -> str | None:
    """sparsify writes the run's config (with the model name) one level up."""
    run_cfg = root.parent / "config.json"
    if not run_cfg.is_file():
        return None
    try:
        model = io.read_json(run_cfg).get("model")
    except DictionaryFormatError:
        return None
    return model if isinstance(model, str) else None
