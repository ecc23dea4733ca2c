"""Objective pieces with hand-computed answers: JumpReLU straight-through gradients, the
decoder constraints, the 2024 norm folding, AuxK, and the schedules."""

from __future__ import annotations

import pytest
import torch

from sae.architectures.batchtopk import batch_topk
from sae.base import DictionaryConfig, build
from training.config import ObjectiveConfig, OptimConfig
from training.objectives.base import StepContext, normalize_decoder_rows_, remove_parallel_grad_
from training.objectives.jumprelu import JumpReLUFn, StepFn
from training.objectives.matryoshka_batchtopk import MatryoshkaBatchTopK
from training.objectives.relu_l1_2024 import fold_decoder_norms_
from training.objectives.topk_auxk import TopKAuxK, auxk_loss
from training.schedules import L0Controller, lr_factor, sparsity_warmup_factor


def test_jumprelu_straight_through_gradients():
    pre = torch.tensor([[0.5, 0.0105, 0.0001]], requires_grad=True)
    theta = torch.tensor([0.01, 0.01, 0.01], requires_grad=True)
    eps = 0.002
    f = JumpReLUFn.apply(pre, theta, eps)
    assert torch.allclose(f, torch.tensor([[0.5, 0.0105, 0.0]]))
    f.sum().backward()
    # d f/d theta = -(theta/eps) K((pre - theta)/eps): only the middle one is within eps/2.
    assert theta.grad.tolist() == pytest.approx([0.0, -5.0, 0.0])
    assert pre.grad.tolist() == [[1.0, 1.0, 0.0]]

    theta.grad = None
    StepFn.apply(pre, theta, eps).sum().backward()
    assert theta.grad.tolist() == pytest.approx([0.0, -500.0, 0.0])


def test_parallel_gradient_removal_keeps_rows_unit_norm_to_first_order():
    torch.manual_seed(0)
    d = build(DictionaryConfig("relu", d_in=8, d_sae=5))
    with torch.no_grad():
        d.W_dec.normal_()
    normalize_decoder_rows_(d)
    d.W_dec.grad = torch.randn(5, 8)
    remove_parallel_grad_(d)
    assert torch.allclose((d.W_dec.grad * d.W_dec).sum(-1), torch.zeros(5), atol=1e-6)
    assert torch.allclose(d.W_dec.norm(dim=-1), torch.ones(5))


def test_folding_decoder_norms_keeps_reconstructions_and_makes_the_penalty_plain_l1():
    torch.manual_seed(0)
    d = build(DictionaryConfig("relu", d_in=6, d_sae=10))
    with torch.no_grad():
        for p in d.parameters():
            p.normal_()
    x = torch.randn(4, 6)
    before = d(x)
    weighted_l1 = (before.feature_acts * d.W_dec.norm(dim=-1)).sum()
    fold_decoder_norms_(d)
    after = d(x)
    assert torch.allclose(after.x_hat, before.x_hat, atol=1e-5)
    assert torch.allclose(d.W_dec.norm(dim=-1), torch.ones(10))
    assert float(after.feature_acts.sum().detach()) == pytest.approx(
        float(weighted_l1.detach()), rel=1e-5
    )


def test_auxk_only_uses_dead_latents():
    torch.manual_seed(0)
    obj = TopKAuxK(ObjectiveConfig(name="topk_auxk", k=2, dead_tokens=100), d_in=6, d_sae=12)
    d = build(obj.dictionary_config(6, 12))
    obj.init_weights(d, torch.Generator().manual_seed(0))
    x = torch.randn(16, 6)
    since = torch.zeros(12, dtype=torch.long)
    assert float(obj.loss(d, x, x, StepContext(0.0, since)).parts["auxk"]) == 0.0

    since[[3, 7]] = 1000  # two latents have not fired for 1000 tokens: dead
    out = d(x)
    aux = auxk_loss(d, x, x, out, since >= 100, auxk_k=3)
    assert float(aux.detach()) > 0
    aux.backward()
    touched = d.W_enc.grad.abs().sum(0).nonzero().squeeze(-1).tolist()
    assert set(touched) <= {3, 7} and touched
    rows = d.W_dec.grad.abs().sum(-1).nonzero().squeeze(-1).tolist()
    assert set(rows) <= {3, 7}


def test_schedules():
    cfg = OptimConfig(warmup_steps=10, decay="linear", decay_start_fraction=0.8)
    assert lr_factor(0, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 100, cfg) == 1.0
    assert lr_factor(50, 100, cfg) == 1.0
    assert lr_factor(90, 100, cfg) == pytest.approx(0.5)
    assert lr_factor(100, 100, cfg) == 0.0
    cos = OptimConfig(warmup_steps=0, decay="cosine", decay_start_fraction=0.0, min_lr_fraction=0.1)
    assert lr_factor(50, 100, cos) == pytest.approx(0.55)
    assert sparsity_warmup_factor(4, 100, 0.1) == pytest.approx(0.5)
    assert sparsity_warmup_factor(10, 100, 0.1) == 1.0
    c = L0Controller(target=10.0, rate=0.1, coefficient=1.0)
    assert c.update(20.0) > 1.0  # too dense: stronger penalty
    c2 = L0Controller(target=10.0, rate=0.1, coefficient=1.0)
    assert c2.update(5.0) < 1.0
    c3 = L0Controller(target=10.0, rate=0.1, coefficient=1.0)
    assert c3.update(0.0) == pytest.approx(float(torch.tensor(-0.1).exp()))  # clipped


@pytest.mark.parametrize("prefix_codes", ["own", "shared"])
def test_matryoshka_prefix_errors_equal_dense_decodes(prefix_codes):
    """own: each prefix decodes its own batch top-k; shared: the whole dictionary's codes."""
    torch.manual_seed(0)
    cfg = ObjectiveConfig(
        name="matryoshka_batchtopk",
        k=3,
        matryoshka_prefixes=(0.25, 0.5),
        matryoshka_prefix_codes=prefix_codes,
    )
    obj = MatryoshkaBatchTopK(cfg, d_in=6, d_sae=16)
    assert obj.widths() == [4, 8, 16]
    d = build(obj.dictionary_config(6, 16))
    obj.init_weights(d, torch.Generator().manual_seed(0))
    with torch.no_grad():
        d.b_dec.normal_()
    x = torch.randn(10, 6)
    res = obj.loss(d, x, x, StepContext(0.0, torch.zeros(16, dtype=torch.long)))
    f = res.out.feature_acts
    assert torch.equal(f, d(x).feature_acts)  # the whole dictionary's BatchTopK codes
    assert int((f != 0).sum()) == 30
    total = (x - x.mean(0)).pow(2).sum()
    pre = torch.relu(d.pre_activations(x)).detach()
    expected = []
    for m in (4, 8, 16):
        if prefix_codes == "own":  # the 3 x 10 largest activations among the first m latents
            kept = pre[:, :m].flatten().topk(30).indices
            codes = torch.zeros(10 * m).index_copy_(0, kept, pre[:, :m].flatten()[kept])
            codes = codes.view(10, m)
        else:
            codes = f[:, :m]
        x_hat = codes @ d.W_dec[:m] + d.b_dec
        expected.append(float(((x_hat - x).pow(2).sum() / total).detach()))
    assert float(res.parts["fvu_prefix_4"]) == pytest.approx(expected[0], rel=1e-5)
    assert float(res.parts["fvu_prefix_8"]) == pytest.approx(expected[1], rel=1e-5)
    assert float(res.parts["fvu"]) == pytest.approx(expected[2], rel=1e-5)
    assert float(res.loss.detach()) == pytest.approx(sum(expected), rel=1e-5)  # summed
    assert torch.allclose(res.out.x_hat, d(x).x_hat, atol=1e-5)
    # Own codes give the first prefix 30 codes, more than the whole dictionary's ranking does.
    assert int((f[:, :4] != 0).sum()) < 30


def test_batch_topk_ranks_above_a_cutoff_only_when_that_is_exact():
    torch.manual_seed(0)
    pre = torch.randn(32, 50)
    flat = torch.relu(pre).flatten()
    ref = set(flat.topk(4 * 32).indices.tolist())
    kth = float(flat.topk(4 * 32).values.min())
    for cutoff in (0.0, 0.5 * kth, 0.999 * kth, 2 * kth):  # none, fast, fast, fallback
        rows, cols = batch_topk(pre, 4, cutoff)
        flat_index = rows * 50 + cols
        assert set(flat_index.tolist()) == ref
        assert torch.equal(flat_index, flat_index.sort().values)  # sorted by row, then latent


@pytest.mark.parametrize("prefix_codes", ["own", "shared"])
def test_matryoshka_sparse_gradients_equal_the_dense_reference(prefix_codes):
    torch.manual_seed(0)
    cfg = ObjectiveConfig(
        name="matryoshka_batchtopk", k=3, dead_tokens=10, matryoshka_prefix_codes=prefix_codes
    )
    obj = MatryoshkaBatchTopK(cfg, d_in=6, d_sae=16)
    d = build(obj.dictionary_config(6, 16)).double()
    obj.init_weights(d, torch.Generator().manual_seed(0))
    x = torch.randn(12, 6, dtype=torch.float64)
    since = torch.zeros(16, dtype=torch.long)
    since[[2, 9]] = 100  # two dead latents: AuxK takes part
    grads = []
    for sparse in (True, False):
        d.sparse_grad = sparse
        d.zero_grad()
        res = obj.loss(d, x, x, StepContext(0.0, since))
        assert res.out.pre_acts.requires_grad is not sparse
        res.loss.backward()
        grads.append({n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None})
    assert set(grads[0]) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-9, atol=1e-12)
