"""The one model loader and the bundled model it ships."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from activations.corpus import iter_documents
from activations.model import (
    BUNDLED_DIR,
    BUNDLED_MODEL,
    heal_prompt,
    load_model,
    resolve_model_path,
)
from sae.errors import UserError

# --- the bundled model ----------------------------------------------------------------------


def test_bundled_model_loads_offline_with_classic_hooks(bundled) -> None:
    assert (bundled.cfg.n_layers, bundled.cfg.d_model, bundled.cfg.d_mlp) == (1, 128, 512)
    assert bundled.cfg.n_ctx == 256
    assert bundled.cfg.d_vocab == len(bundled.tokenizer)
    tokens = bundled.to_tokens("def area(r):\n    return 3.14 * r ** 2\n")
    bos = bundled.tokenizer.bos_token_id
    assert tokens[0, 0] == bos and tokens[0, 1] != bos  # exactly one BOS, as in training
    names = ("blocks.0.mlp.hook_post", "blocks.0.hook_resid_post")
    _, cache = bundled.run_with_cache(tokens, names_filter=lambda n: n in names)
    assert cache["blocks.0.mlp.hook_post"].shape == (1, tokens.shape[1], 512)
    assert cache["blocks.0.hook_resid_post"].shape == (1, tokens.shape[1], 128)


def test_bridge_predicts_what_transformers_predicts(bundled) -> None:
    """The bundled model's unembedding is its own matrix (not tied to the embedding): the
    TransformerLens bridge must use it, giving the log-probabilities transformers gives."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(BUNDLED_DIR)
    assert not hf.config.tie_word_embeddings
    tokens = bundled.to_tokens("import os\n\ndef main(argv):\n    return len(argv)\n")
    with torch.no_grad():
        expected = hf(input_ids=tokens).logits.log_softmax(-1)
        got = bundled(tokens).log_softmax(-1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_bundled_aliases_resolve_to_the_package_directory() -> None:
    assert resolve_model_path("bundled") == resolve_model_path(BUNDLED_MODEL)
    assert resolve_model_path("bundled") == str(BUNDLED_DIR)


SNIPPETS = [
    "def f(x, *args, **kwargs):\n\treturn x  # tab-indented\n",
    "s = 'caf\u00e9 \u2603 \U0001f40d'\nb = b'\\x00\\xff'\n",
    "\n\n\n    \n  trailing spaces   \n",
]


def test_tokenizer_round_trips_real_source(bundled) -> None:
    tokenizer = bundled.tokenizer
    docs = [doc[:4000] for doc, _ in zip(iter_documents("validation"), range(8), strict=False)]
    for text in docs + SNIPPETS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids, clean_up_tokenization_spaces=False) == text
    assert len(tokenizer.encode(docs[0], add_special_tokens=False)) < len(docs[0]) / 2


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=80))
def test_tokenizer_round_trips_any_text(bundled, text: str) -> None:
    tokenizer = bundled.tokenizer
    if "<|endoftext|>" in text:
        return  # the special token is matched as one token by design, like GPT-2
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids, clean_up_tokenization_spaces=False) == text


def test_heal_prompt_lets_the_first_token_absorb_a_trailing_space(bundled) -> None:
    tokenizer = bundled.tokenizer
    ids, allowed = heal_prompt(tokenizer, "def ")
    assert ids == [tokenizer.bos_token_id, *tokenizer.encode("def", add_special_tokens=False)]
    assert allowed is not None and allowed.shape == (len(tokenizer),)
    vocab = tokenizer.get_vocab()
    assert allowed[vocab["\u0120self"]] and not allowed[vocab["self"]]  # \u0120: byte-level " "
    assert not allowed[tokenizer.bos_token_id]
    assert heal_prompt(tokenizer, "").first_token_allowed is None


# --- the loader on local directories and hub names ------------------------------------------


def test_local_directory_loads_through_the_bridge(tiny_lm_dir: Path) -> None:
    bridge = load_model(str(tiny_lm_dir))
    assert resolve_model_path(str(tiny_lm_dir)) == str(tiny_lm_dir)
    _, cache = bridge.run_with_cache("def f(x):\n    return x\n")
    assert cache["blocks.0.mlp.hook_post"].shape[-1] == 64
    assert cache["blocks.0.hook_resid_post"].shape[-1] == 32


def test_paths_that_are_not_model_directories(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no config\.json"):
        load_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(UserError, match="is a file"):
        load_model(str(tmp_path / "weights.bin"))


OFFLINE_MESSAGE = (
    "model {name!r} is not available offline: the hub is unreachable and it is not in the "
    "local cache; pass a local directory or the bundled model 'stdlib-1l-512'"
)


@pytest.mark.parametrize("name", ["gpt2", "EleutherAI/pythia-70m"])
def test_uncached_hub_name_offline_is_one_clear_line(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache, whatever the machine has
    with pytest.raises(UserError) as info:
        load_model(name)
    assert str(info.value) == OFFLINE_MESSAGE.format(name=name)


def test_cli_reports_an_uncached_hub_model_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sae.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    code = main(["cache", "--model", "gpt2", "--out", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"sae cache: error: {OFFLINE_MESSAGE.format(name='gpt2')}\n"
