"""Evals: loss recovered and KL with the real tiny GPT-2 through TransformerBridge, with
dictionaries whose answers are known exactly; batch metrics against hand computation."""

from __future__ import annotations

import pytest
import torch

from sae.base import DictionaryConfig, build
from training.evals import batch_metrics, evaluate
from training.heldout import HeldOutContexts, HeldOutEval

HOOK = "blocks.0.mlp.hook_post"


@pytest.fixture(scope="module")
def model(tiny_lm_dir):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(tiny_lm_dir), device="cpu")
    bridge.enable_compatibility_mode(disable_warnings=True)
    return bridge


def identity_dictionary(d_in: int):
    """relu(x) - relu(-x) = x exactly: W_enc = [I, -I], W_dec = [I; -I]."""
    d = build(DictionaryConfig("relu", d_in=d_in, d_sae=2 * d_in))
    eye = torch.eye(d_in)
    with torch.no_grad():
        d.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        d.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return d


def held_out(model, tokens, valid=None):
    acts = torch.randn(64, model.cfg.d_mlp)
    return HeldOutEval(
        acts, model=model, hook_name=HOOK, contexts=HeldOutContexts(tokens, valid), context_batch=1
    )


class Figures:
    def __init__(self, figures):
        self.__dict__.update(figures)


def test_loss_recovered_is_one_for_a_perfect_and_zero_for_an_empty_dictionary(model):
    torch.manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (3, 16))
    d_mlp = model.cfg.d_mlp
    evaluator = held_out(model, tokens)

    def loss_recovered(model, d, hook, tokens, input_scale=1.0):
        return Figures(evaluator(d, input_scale))

    perfect = loss_recovered(model, identity_dictionary(d_mlp), HOOK, tokens)
    with torch.no_grad():
        reference = float(model(tokens, return_type="loss"))
    assert perfect.clean_loss == pytest.approx(reference, rel=1e-5)
    assert perfect.spliced_loss == pytest.approx(perfect.clean_loss, abs=1e-5)
    assert perfect.loss_recovered == pytest.approx(1.0, abs=1e-3)
    assert perfect.kl_div == pytest.approx(0.0, abs=1e-6)
    assert perfect.zero_ablated_loss != pytest.approx(perfect.clean_loss, abs=1e-4)

    empty = build(DictionaryConfig("relu", d_in=d_mlp, d_sae=8))  # all-zero weights: x_hat = 0
    none = loss_recovered(model, empty, HOOK, tokens)
    assert none.spliced_loss == pytest.approx(none.zero_ablated_loss, abs=1e-5)
    assert none.loss_recovered == pytest.approx(0.0, abs=1e-3)
    assert none.kl_div > 0

    # A dictionary still in training space (it expects inputs x 3) measured with
    # input_scale=3 equals the same dictionary with the scale folded in, measured raw.
    shrink = identity_dictionary(d_mlp)
    with torch.no_grad():
        shrink.b_enc.fill_(-0.2)  # soft threshold: not scale-equivariant
    in_training_space = loss_recovered(model, shrink, HOOK, tokens, input_scale=3.0)
    shrink.fold_input_scale(3.0)
    folded = loss_recovered(model, shrink, HOOK, tokens)
    assert in_training_space.spliced_loss == pytest.approx(folded.spliced_loss, rel=1e-5)
    assert folded.kl_div > 0  # it is not the identity any more


def test_the_splice_leaves_positions_without_activations_alone(model):
    """A cache that dropped BOS has no activation there: only valid positions are spliced."""
    torch.manual_seed(1)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 16))
    empty = build(DictionaryConfig("relu", d_in=model.cfg.d_mlp, d_sae=8))
    nothing = torch.zeros_like(tokens, dtype=torch.bool)
    untouched = held_out(model, tokens, nothing)(empty)
    assert untouched["spliced_loss"] == pytest.approx(untouched["clean_loss"], abs=1e-6)
    assert untouched["kl_div"] == pytest.approx(0.0, abs=1e-7)
    no_bos = nothing.clone()
    no_bos[:, 1:] = True
    partial = held_out(model, tokens, no_bos)(empty)
    everywhere = held_out(model, tokens)(empty)
    # Zero-ablation is masked the same way, so an empty dictionary still recovers nothing.
    assert partial["loss_recovered"] == pytest.approx(0.0, abs=1e-3)
    assert partial["zero_ablated_loss"] != pytest.approx(everywhere["zero_ablated_loss"], abs=1e-6)


def test_batch_metrics_and_evaluate_match_hand_computation():
    torch.manual_seed(0)
    x = torch.randn(32, 4)
    x_hat = x + 0.1 * torch.randn(32, 4)
    f = torch.relu(torch.randn(32, 10))
    m = batch_metrics(x, x_hat, f)
    sse = ((x - x_hat) ** 2).sum()
    var = ((x - x.mean(0)) ** 2).sum()
    assert float(m["mse"]) == pytest.approx(float(sse / x.numel()))
    assert float(m["fvu"]) == pytest.approx(float(sse / var))
    assert float(m["explained_variance"]) == pytest.approx(float(1 - sse / var))
    assert float(m["l0"]) == pytest.approx(float((f > 0).sum(-1).float().mean()))

    d = identity_dictionary(4)
    with torch.no_grad():
        d.b_enc[7] = -100.0  # feature 7 (-x_3) can never fire
    r = evaluate(d, [x[:16], x[16:]])
    assert r.fvu > 0  # x_3 < 0 values are lost
    assert r.dead_fraction == pytest.approx(1 / 8)
    assert r.density[7] == 0
    assert r.l0 == pytest.approx(float((d.encode(x) > 0).sum(-1).float().mean()))
