"""Foreign layouts built by hand from raw tensors, checked against direct computation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sae import DictionaryFormatError
from sae.formats import saelens
from sae.io import load_dictionary
from tests.sae.util import ARCHS, random_dictionary

D, F = 6, 12


def _raw(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D, F, generator=g),
        "b_enc": torch.randn(F, generator=g) * 0.1,
        "W_dec": torch.randn(F, D, generator=g),
        "b_dec": torch.randn(D, generator=g),
        "threshold": torch.rand(F, generator=g) * 0.5,
    }


def _x(n: int = 5) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(99)) * 2


def _write_saelens(path: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "sae_weights.safetensors"))
    return path


# -- SAELens -----------------------------------------------------------------------------------
def test_saelens_v6_standard(tmp_path: Path) -> None:
    r = _raw()
    cfg = {
        "architecture": "standard",
        "d_in": D,
        "d_sae": F,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {
            "model_name": "gpt2",
            "hook_name": "blocks.3.hook_resid_pre",
            "sae_lens_version": "6.5.0",
        },
    }
    d = load_dictionary(_write_saelens(tmp_path / "s", cfg, {k: r[k] for k in list(r)[:4]}))
    x = _x()
    f = torch.relu((x - r["b_dec"]) @ r["W_enc"] + r["b_enc"])
    torch.testing.assert_close(d.encode(x), f)
    torch.testing.assert_close(d.decode(f), f @ r["W_dec"] + r["b_dec"])
    assert (d.architecture, d.cfg.hook_name, d.cfg.model_name) == (
        "relu",
        "blocks.3.hook_resid_pre",
        "gpt2",
    )
    assert d.cfg.provenance["source_format"] == "saelens"


def test_saelens_pre6_flat_topk_via_activation_fn_kwargs(tmp_path: Path) -> None:
    r = _raw(1)
    cfg = {
        "d_in": D,
        "d_sae": F,
        "dtype": "torch.float32",
        "hook_point": "blocks.1.hook_mlp_out",
        "model_name": "pythia-70m",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 3},
        "apply_b_dec_to_input": False,
        "sae_lens_training_version": "3.1.0",
    }
    d = load_dictionary(_write_saelens(tmp_path / "s", cfg, {k: r[k] for k in list(r)[:4]}))
    x = _x()
    pre = x @ r["W_enc"] + r["b_enc"]  # no b_dec subtraction: apply_b_dec_to_input honoured
    top = pre.topk(3, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    torch.testing.assert_close(d.encode(x), f)
    torch.testing.assert_close(d(x).x_hat, f @ r["W_dec"] + r["b_dec"])
    assert d.architecture == "topk" and d.cfg.k == 3 and d.cfg.hook_name == "blocks.1.hook_mlp_out"


@pytest.mark.parametrize("log_form", [False, True])
def test_saelens_jumprelu_threshold_or_log_threshold(tmp_path: Path, log_form: bool) -> None:
    r = _raw(2)
    tensors = dict(r)
    if log_form:
        tensors["log_threshold"] = tensors.pop("threshold").log()
    cfg = {
        "architecture": "jumprelu",
        "d_in": D,
        "d_sae": F,
        "apply_b_dec_to_input": False,
        "meta": {"hook_name": "blocks.0.hook_resid_post"},
    }
    d = load_dictionary(_write_saelens(tmp_path / "s", cfg, tensors))
    x = _x()
    pre = x @ r["W_enc"] + r["b_enc"]
    f = torch.relu(pre) * (pre > r["threshold"])
    torch.testing.assert_close(d.encode(x), f)
    torch.testing.assert_close(d(x).x_hat, f @ r["W_dec"] + r["b_dec"])
    assert d.cfg.hook_name == "blocks.0.hook_resid_post"


@pytest.mark.parametrize("where", ["cfg", "scaler_file"])
def test_saelens_expected_average_only_in_is_folded(tmp_path: Path, where: str) -> None:
    r = _raw(3)
    s = 0.25
    cfg = {
        "architecture": "standard",
        "d_in": D,
        "d_sae": F,
        "normalize_activations": "expected_average_only_in",
    }
    if where == "cfg":
        cfg["norm_scaling_factor"] = s
    root = _write_saelens(tmp_path / "s", cfg, {k: r[k] for k in list(r)[:4]})
    if where == "scaler_file":
        (root / "activation_scaler.json").write_text(json.dumps({"scaling_factor": s}))
    d = load_dictionary(root)
    x = _x()
    # SAELens runs the SAE on s*x and un-scales the output; we take raw x.
    f = torch.relu((s * x - r["b_dec"]) @ r["W_enc"] + r["b_enc"])
    torch.testing.assert_close(d.encode(x), f)
    torch.testing.assert_close(d(x).x_hat, (f @ r["W_dec"] + r["b_dec"]) / s)
    assert d.cfg.normalization["folded_input_scale"] == s


def test_saelens_missing_scaling_factor_and_unfoldable_norms(tmp_path: Path) -> None:
    r = {k: v for k, v in list(_raw().items())[:4]}
    cfg = {"d_in": D, "d_sae": F, "normalize_activations": "expected_average_only_in"}
    with pytest.raises(
        DictionaryFormatError, match=r"\[normalize_activations\].*no scaling factor"
    ):
        load_dictionary(_write_saelens(tmp_path / "a", cfg, r))
    cfg["normalize_activations"] = "layer_norm"
    with pytest.raises(DictionaryFormatError, match="cannot be folded"):
        load_dictionary(_write_saelens(tmp_path / "b", cfg, r))


def test_saelens_finetuning_scaling_factor_folds_into_decoder(tmp_path: Path) -> None:
    r = _raw(4)
    sf = torch.rand(F) + 0.5
    tensors = {**{k: r[k] for k in list(r)[:4]}, "scaling_factor": sf}
    d = load_dictionary(_write_saelens(tmp_path / "s", {"d_in": D, "d_sae": F}, tensors))
    x = _x()
    f = torch.relu((x - r["b_dec"]) @ r["W_enc"] + r["b_enc"])
    torch.testing.assert_close(d.encode(x), f)
    torch.testing.assert_close(d(x).x_hat, (f * sf) @ r["W_dec"] + r["b_dec"])


def test_saelens_unsupported_architecture(tmp_path: Path) -> None:
    r = {k: v for k, v in list(_raw().items())[:4]}
    root = _write_saelens(tmp_path / "g", {"architecture": "gated", "d_in": D, "d_sae": F}, r)
    with pytest.raises(DictionaryFormatError, match=r"cfg.json \[architecture\].*gated"):
        load_dictionary(root)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_to_saelens_round_trips(arch: str, tmp_path: Path) -> None:
    d = random_dictionary(arch, hook_name="blocks.2.hook_resid_post", model_name="tiny")
    saelens.export(d, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    expect = {"relu": "standard", "topk": "topk"}.get(arch, "jumprelu")
    assert (
        cfg["architecture"] == expect and cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post"
    )
    assert set(load_file(tmp_path / "out" / "sae_weights.safetensors")) >= {
        "W_enc",
        "b_enc",
        "W_dec",
        "b_dec",
    }
    e = load_dictionary(tmp_path / "out")
    ref = d.to_inference() if arch == "batchtopk" else d  # type: ignore[operator]
    for name, t in ref.state_dict().items():
        assert torch.equal(e.state_dict()[name], t), name
    assert e.cfg.k == ref.cfg.k and e.cfg.model_name == "tiny"


# -- sparsify ----------------------------------------------------------------------------------
def _write_sparsify(path: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "sae.safetensors"))
    return path


def _sparsify_tensors(seed: int = 5) -> dict[str, torch.Tensor]:
    r = _raw(seed)
    return {
        "encoder.weight": r["W_enc"].T.contiguous(),
        "encoder.bias": r["b_enc"],
        "W_dec": r["W_dec"],
        "b_dec": r["b_dec"],
    }


def test_sparsify_topk(tmp_path: Path) -> None:
    t = _sparsify_tensors()
    cfg = {
        "activation": "topk",
        "expansion_factor": 2,
        "normalize_decoder": True,
        "num_latents": 0,
        "k": 4,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": D,
    }
    run = tmp_path / "run"
    root = _write_sparsify(run / "layers.3", cfg, t)
    (run / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m"}))
    d = load_dictionary(root)
    x = _x()
    # sparsify: TopK(ReLU(encoder(x - b_dec))), decode top_acts @ W_dec[idx] + b_dec.
    pre = torch.nn.functional.linear(x - t["b_dec"], t["encoder.weight"], t["encoder.bias"])
    acts, idx = torch.relu(pre).topk(4, dim=-1)
    x_hat = torch.einsum("bk,bkd->bd", acts, t["W_dec"][idx]) + t["b_dec"]
    got = d.encode_sparse(x)
    torch.testing.assert_close(got.top_acts, acts)
    assert torch.equal(got.top_indices, idx)
    torch.testing.assert_close(d(x).x_hat, x_hat)
    assert (d.architecture, d.d_sae, d.cfg.k) == ("topk", 2 * D, 4)
    assert (
        d.cfg.hook_name == "blocks.3.hook_resid_post"
        and d.cfg.model_name == "EleutherAI/pythia-70m"
    )


def test_sparsify_rejects_skip_connection(tmp_path: Path) -> None:
    t = {**_sparsify_tensors(), "W_skip": torch.zeros(D, D)}
    root = _write_sparsify(tmp_path / "a", {"d_in": D, "num_latents": F, "k": 2}, t)
    with pytest.raises(DictionaryFormatError, match=r"\[W_skip\]"):
        load_dictionary(root)
    root = _write_sparsify(
        tmp_path / "b", {"d_in": D, "num_latents": F, "k": 2, "skip_connection": True}, t
    )
    with pytest.raises(DictionaryFormatError, match=r"cfg.json \[skip_connection\]"):
        load_dictionary(root)


def test_sparsify_shape_mismatch_names_source_tensor(tmp_path: Path) -> None:
    root = _write_sparsify(
        tmp_path / "a", {"d_in": D, "num_latents": F + 1, "k": 2}, _sparsify_tensors()
    )
    with pytest.raises(DictionaryFormatError, match=r"sae.safetensors \[encoder.weight\]: shape"):
        load_dictionary(root)


# -- Gemma Scope -------------------------------------------------------------------------------
def test_gemma_scope_params_npz(tmp_path: Path) -> None:
    r = _raw(6)
    root = tmp_path / "gemma-scope-2b-pt-res" / "layer_20" / "width_16k" / "average_l0_71"
    root.mkdir(parents=True)
    np.savez(root / "params.npz", **{k: v.numpy() for k, v in r.items()})
    d = load_dictionary(root / "params.npz")  # the file itself works too
    x = _x()
    pre = x @ r["W_enc"] + r["b_enc"]  # Gemma Scope: no b_dec subtraction
    f = torch.relu(pre) * (pre > r["threshold"])
    torch.testing.assert_close(d.encode(x), f)
    torch.testing.assert_close(d(x).x_hat, f @ r["W_dec"] + r["b_dec"])
    assert d.architecture == "jumprelu" and not d.cfg.apply_b_dec_to_input
    assert (d.cfg.hook_name, d.cfg.model_name) == ("blocks.20.hook_resid_post", "gemma-2-2b")


def test_gemma_scope_missing_threshold(tmp_path: Path) -> None:
    r = _raw(6)
    del r["threshold"]
    np.savez(tmp_path / "params.npz", **{k: v.numpy() for k, v in r.items()})
    with pytest.raises(DictionaryFormatError, match=r"params.npz \[threshold\]: missing"):
        load_dictionary(tmp_path)
