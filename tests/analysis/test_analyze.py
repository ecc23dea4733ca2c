"""The analysis end to end on a tiny real model: store contents, logit effects through the
real weights, pairing errors up front, labels across re-analysis, compare and export."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from activations.model import load_model
from activations.text import TextConfig
from analysis.accumulator import AnalysisConfig
from analysis.analyze import analyze
from analysis.cli import format_feature, pick_features
from analysis.compare import compare_dictionaries
from analysis.export import export_delphi, export_neuronpedia
from analysis.logit_effects import logit_effects, residual_directions
from analysis.store import FeatureStore
from sae.base import DictionaryConfig, build
from sae.cli import main
from sae.errors import UserError
from tests.conftest import TINY_TEXT

HOOK = "blocks.0.mlp.hook_post"


@pytest.fixture(scope="module")
def model(tiny_lm_dir: Path):
    return load_model(str(tiny_lm_dir))


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("text")
    for i, doc in enumerate(TINY_TEXT * 3):
        (root / f"doc{i}.py").write_text(doc)
    return root


def make_dict(d_in: int = 64, d_sae: int = 32, hook: str = HOOK, seed: int = 0, arch="relu"):
    torch.manual_seed(seed)
    d = build(DictionaryConfig(architecture=arch, d_in=d_in, d_sae=d_sae, hook_name=hook, k=4))
    with torch.no_grad():
        d.W_enc.normal_(0, 0.3)
        d.W_dec.copy_(d.W_enc.T)
        d.b_enc.fill_(-0.05)
    return d


def text_cfg(text_dir: Path) -> TextConfig:
    return TextConfig(dataset=str(text_dir), context_size=16, batch_size=4, shuffle_buffer=0)


CFG = AnalysisConfig(n_tokens=400, n_top=5, context_before=4, context_after=2, n_quantiles=2,
                     examples_per_quantile=2, n_logits=4)  # fmt: skip


def test_analysis_matches_direct_encoding(model, text_dir: Path, tmp_path: Path) -> None:
    d = make_dict()
    arrays = analyze(model, d, text_cfg(text_dir), CFG, progress=False)
    # Reference: all activations of the same contexts, encoded at once.
    from activations.hooks import ActivationCapture
    from activations.text import context_batches

    batches = list(context_batches(text_cfg(text_dir), model.tokenizer, max_contexts=25))
    tokens = torch.cat([b.tokens for b in batches])
    with ActivationCapture(model, [HOOK]) as cap, torch.no_grad():
        f = d.encode(cap(tokens)[HOOK]).reshape(-1, d.d_sae)
    assert arrays.meta.n_tokens == tokens.numel() == 400
    assert arrays.n_fires.tolist() == (f > 0).sum(0).tolist()
    np.testing.assert_allclose(arrays.max_act, f.max(0).values.numpy(), rtol=1e-6)
    np.testing.assert_allclose(arrays.sum_acts, f.double().sum(0).numpy(), rtol=1e-5)
    best = f.argmax(0)  # first maximum: ties go to the earliest token
    assert (arrays.top_sequence[:, 0] * 16 + arrays.top_position[:, 0]).tolist() == best.tolist()
    vocab = arrays.vocab
    assert vocab[int(tokens[0, 1])] == model.tokenizer.decode([int(tokens[0, 1])])

    with FeatureStore.open(tmp_path) as store:
        store.replace_statistics(arrays)
        fid = int(np.argmax(arrays.n_fires))
        ex = store.top_examples(fid)[0]
        s, p = ex.sequence, ex.position
        assert ex.token_ids[ex.max_index] == int(tokens[s, p])
        assert ex.max_act == pytest.approx(float(f[s * 16 + p, fid]))
        text = format_feature(store, fid)
        assert f"feature {fid}:" in text and "[[" in text and "promotes" in text
        assert len(pick_features(store, 3)) == 3


@pytest.mark.parametrize("drop_bos", [False, True])
def test_analysis_from_the_activation_cache(model, tiny_lm_dir, text_dir, tmp_path, drop_bos):
    """Reading `sae cache` output (contexts straddling shards) gives the same analysis as
    running the model; dropped BOS rows are not counted and never chosen."""
    from activations.cache import CacheConfig, cache_activations

    d = make_dict()
    cache_cfg = CacheConfig(out=tmp_path / "cache", model=str(tiny_lm_dir), hooks=(HOOK,),
                            text=text_cfg(text_dir), dtype="float32", max_tokens=160,
                            shard_tokens=23, drop_bos=drop_bos, device="cpu")  # fmt: skip
    cache_activations(cache_cfg, model=model)
    cfg = dataclasses.replace(CFG, n_tokens=160)
    from_cache = analyze(model, d, text_cfg(text_dir), cfg, progress=False,
                         cache=tmp_path / "cache")  # fmt: skip
    if not drop_bos:
        direct = analyze(model, d, text_cfg(text_dir), cfg, progress=False)
        assert from_cache.meta.n_tokens == direct.meta.n_tokens == 160
        for name in ("n_fires", "top_sequence", "top_position", "top_token_ids", "q_sequence"):
            assert np.array_equal(getattr(from_cache, name), getattr(direct, name)), name
        np.testing.assert_allclose(from_cache.top_acts, direct.top_acts, rtol=1e-6)
    else:
        assert from_cache.meta.n_tokens == 160  # rows the cache holds: BOS rows left out
        assert int(from_cache.n_fires.sum()) <= 160 * 32
        live = from_cache.top_sequence >= 0
        assert live.any() and (from_cache.top_position[live] > 0).all()
        # Windows reaching back to position 0 show the BOS token the cache left out.
        f, slot = np.nonzero(live & (from_cache.top_position < CFG.context_before))
        assert len(f)
        at = CFG.context_before - from_cache.top_position[f, slot]
        ids = from_cache.top_token_ids[f, slot, at]
        assert (ids == model.tokenizer.bos_token_id).all()
        assert (from_cache.top_acts[f, slot, at] == 0).all()


def test_logit_effects_follow_the_real_weights(model) -> None:
    d = make_dict()
    eff = logit_effects(model, HOOK, d.W_dec, k=5)
    assert eff is not None
    # The mlp.hook_post -> residual map is the layer's own linear output: check it against
    # the model by patching hook_post and reading hook_mlp_out.
    dirs = residual_directions(model, HOOK, d.W_dec)
    assert dirs is not None
    tokens = torch.tensor([[0, 5, 9]])
    unit = d.W_dec[3] / d.W_dec[3].norm()
    with torch.no_grad():
        base = model.run_with_cache(tokens, names_filter="blocks.0.hook_mlp_out")[1]
    cache: dict[str, torch.Tensor] = {}

    def grab(x, hook):
        cache["out"] = x.detach().clone()
        return x

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda x, hook: x + unit),
                                                ("blocks.0.hook_mlp_out", grab)])  # fmt: skip
    delta = cache["out"] - base["blocks.0.hook_mlp_out"]
    torch.testing.assert_close(delta[0, 1], dirs[3], atol=1e-4, rtol=1e-4)
    logits = dirs @ model.W_U
    top = logits.topk(5, dim=1)
    assert torch.equal(eff.promoted_ids, top.indices)
    assert torch.equal(eff.suppressed_ids, logits.topk(5, dim=1, largest=False).indices)
    assert (eff.promoted[:, :-1] >= eff.promoted[:, 1:]).all()
    # A residual-stream hook uses the decoder direction as is.
    d_res = make_dict(d_in=32, hook="blocks.0.hook_resid_post")
    res = residual_directions(model, "blocks.0.hook_resid_post", d_res.W_dec)
    assert res is not None
    torch.testing.assert_close(res.norm(dim=1), torch.ones(32))
    assert residual_directions(model, "blocks.0.attn.hook_pattern", d_res.W_dec) is None


def test_bad_pairing_fails_up_front(model, text_dir: Path) -> None:
    with pytest.raises(UserError, match=r"d_in 48.*width 64"):
        analyze(model, make_dict(d_in=48), text_cfg(text_dir), CFG, progress=False)
    with pytest.raises(UserError, match="unknown hook"):
        analyze(model, make_dict(hook="blocks.7.mlp.hook_post"), text_cfg(text_dir), CFG,
                progress=False)  # fmt: skip


def test_cli_labels_survive_reanalysis_and_export(
    tiny_lm_dir: Path, text_dir: Path, tmp_path: Path, capsys
) -> None:
    d = make_dict()
    d.cfg.model_name = str(tiny_lm_dir)
    d.save(tmp_path / "dict")
    args = ["analyze", str(tmp_path / "dict"), "--text", str(text_dir), "--context-size", "16",
            "--n-top", "3", "--context-before", "3", "--context-after", "2"]  # fmt: skip
    assert main([*args, "--tokens", "160", "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert "analysed 160 tokens" in out and out.count("feature ") >= 2
    with FeatureStore.open(tmp_path / "dict") as store:
        store.add_label(1, "loop keyword", "tester")
    assert main([*args, "--tokens", "320"]) == 0
    with FeatureStore.open(tmp_path / "dict", readonly=True) as store:
        assert store.meta().n_tokens == 320 and store.meta().generation == 2
        assert [lab.text for lab in store.labels(1)] == ["loop keyword"]
        assert [s.feature_id for s in store.search("loop")] == [1]
        np_dir = export_neuronpedia(store, tmp_path / "np")
        doc = json.loads((np_dir / "1.json").read_text())
        assert doc["explanations"] == [{"description": "loop keyword", "authorId": "tester"}]
        assert doc["activations"] and doc["pos_str"] and "frac_nonzero" in doc
        first = doc["activations"][0]
        assert first["values"][first["maxValueTokenIndex"]] == pytest.approx(first["maxValue"])
        with pytest.raises(UserError, match="not a Neuronpedia export"):
            export_neuronpedia(store, tmp_path / "dict")  # would replace the dictionary
        export_neuronpedia(store, tmp_path / "np")  # a previous export is replaced
        delphi = export_delphi(store, tmp_path / "delphi")
        from safetensors.numpy import load_file

        split = load_file(str(delphi / "0_31.safetensors"))
        rows, pos, lat = split["locations"].astype(np.int64).T
        width = json.loads((delphi / "config.json").read_text())["cache_ctx_len"]
        assert split["tokens"].shape[1] == width == 3 + 1 + 2
        # Row 0 is the first top example of the first feature that has one.
        assert rows[0] == 0
        ex = store.top_examples(int(lat[0]))[0]
        left = 3 - ex.max_index
        assert split["tokens"][0, left : left + len(ex.token_ids)].tolist() == ex.token_ids
        assert float(split["activations"][0]) == pytest.approx(ex.acts[pos[0] - left], rel=1e-2)
    assert main(["analyze", str(tmp_path / "dict"), "--skip-analysis", "--features", "1"]) == 0
    assert "label: 'loop keyword'" in capsys.readouterr().out
    # sae compare: a dictionary against itself matches every feature to itself.
    assert main(["compare", str(tmp_path / "dict"), str(tmp_path / "dict"), "--text",
                 str(text_dir), "--context-size", "16", "--tokens", "64", "-k", "2"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "a_to_b.frac_cosine_above_0.7: 1.000" in out
    doc = json.loads((tmp_path / "dict" / "analysis" / "compare-dict.json").read_text())
    assert [row["cosine"][0][0] for row in doc["a_to_b"]] == list(range(32))
    # A dictionary for another hook width fails before any text is read.
    make_dict(d_in=48).save(tmp_path / "bad")
    assert main(["analyze", str(tmp_path / "bad"), "--model", str(tiny_lm_dir)]) == 2
    assert "d_in 48" in capsys.readouterr().err


def test_compare_finds_the_same_dictionary(model, text_dir: Path) -> None:
    a = make_dict(seed=0)
    b = make_dict(seed=1)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # c is a with its features shuffled: a perfect match exists
        c = make_dict(seed=0)
        c.W_enc.copy_(a.W_enc[:, perm])
        c.b_enc.copy_(a.b_enc[perm])
        c.W_dec.copy_(a.W_dec[perm])
    cmp = compare_dictionaries(model, a, c, text_cfg(text_dir), 200, k=3, progress=False)
    inverse = torch.argsort(perm)
    assert torch.equal(cmp.a_to_b.cosine_ids[:, 0], inverse)
    torch.testing.assert_close(cmp.a_to_b.cosine[:, 0], torch.ones(32))
    fired = cmp.a_to_b.correlation[:, 0] != 0
    assert fired.any()
    assert torch.equal(cmp.a_to_b.correlation_ids[fired, 0], inverse[fired])
    torch.testing.assert_close(cmp.a_to_b.correlation[fired, 0], torch.ones(int(fired.sum())))
    other = compare_dictionaries(model, a, b, text_cfg(text_dir), 200, k=3, progress=False)
    assert other.a_to_b.cosine[:, 0].mean() < 0.9
    with pytest.raises(UserError, match="same hook"):
        compare_dictionaries(model, a, make_dict(d_in=32, hook="blocks.0.hook_resid_post"),
                             text_cfg(text_dir), 10)  # fmt: skip
