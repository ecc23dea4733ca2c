"""Architectures: hand-set weights with exact outputs, invariants, sparse-vs-dense decode."""

from __future__ import annotations

import pytest
import torch

from sae import ARCHITECTURES, DictionaryConfig, build
from tests.sae.util import ARCHS, random_dictionary


def test_every_builtin_is_registered() -> None:
    build(DictionaryConfig("relu", 2, 2))  # imports sae.architectures
    assert set(ARCHS) <= set(ARCHITECTURES)


def _hand_set(arch: str, **cfg: object):
    """d_in=2, d_sae=3: W_enc picks x0, x1, x0-x1; W_dec maps features back to known rows."""
    d = build(DictionaryConfig(arch, 2, 3, **cfg))  # type: ignore[arg-type]
    with torch.no_grad():
        d.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]]))
        d.b_enc.copy_(torch.tensor([0.0, -0.5, 0.0]))
        d.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
        d.b_dec.copy_(torch.tensor([0.5, 0.0]))
    return d


X = torch.tensor([[2.5, 1.0], [0.5, 3.0]])
# pre = (x - b_dec) W_enc + b_enc:  row0 x-b=[2,1] -> [2, 0.5, 1];  row1 [0,3] -> [0, 2.5, -3]
PRE = torch.tensor([[2.0, 0.5, 1.0], [0.0, 2.5, -3.0]])


def test_relu_exact() -> None:
    d = _hand_set("relu")
    out = d(X)
    f = torch.tensor([[2.0, 0.5, 1.0], [0.0, 2.5, 0.0]])
    torch.testing.assert_close(out.pre_acts, PRE, rtol=0, atol=0)
    torch.testing.assert_close(out.feature_acts, f, rtol=0, atol=0)
    # x_hat = f W_dec + b_dec
    x_hat = torch.tensor([[2 + 1 + 0.5, 0.5 - 1], [0.5, 2.5]])
    torch.testing.assert_close(out.x_hat, x_hat, rtol=0, atol=0)


def test_topk_exact() -> None:
    d = _hand_set("topk", k=1)
    out = d(X)
    f = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.5, 0.0]])
    torch.testing.assert_close(out.feature_acts, f, rtol=0, atol=0)
    torch.testing.assert_close(out.x_hat, torch.tensor([[2.5, 0.0], [0.5, 2.5]]))
    acts, idx = d.encode_sparse(X)
    assert idx.tolist() == [[0], [1]] and acts.tolist() == [[2.0], [2.5]]


def test_topk_never_fires_negative_features() -> None:
    # k=3 but row 1 has only one positive pre-activation: the others give 0, not -3.
    d = _hand_set("topk", k=3)
    f = d.encode(X)
    assert (f >= 0).all() and (f[1] != 0).sum() == 1
    acts, _ = d.encode_sparse(X)
    assert acts.shape == (2, 3) and acts[0].tolist() == [2.0, 1.0, 0.5]


def test_jumprelu_exact_gemma_scope_form() -> None:
    d = _hand_set("jumprelu", apply_b_dec_to_input=False)
    with torch.no_grad():
        d.threshold.copy_(torch.tensor([2.5, 0.5, -5.0]))
    # No b_dec subtraction: pre = x W_enc + b_enc = [[2.5, 0.5, 1.5], [0.5, 2.5, -2.5]].
    out = d(X)
    torch.testing.assert_close(out.pre_acts, torch.tensor([[2.5, 0.5, 1.5], [0.5, 2.5, -2.5]]))
    # Strictly above threshold fires; ReLU still zeroes the negative one (threshold -5).
    f = torch.tensor([[0.0, 0.0, 1.5], [0.0, 2.5, 0.0]])
    torch.testing.assert_close(out.feature_acts, f, rtol=0, atol=0)
    torch.testing.assert_close(out.x_hat, f @ d.W_dec + d.b_dec)


def test_batchtopk_keeps_k_times_batch_over_the_batch() -> None:
    d = _hand_set("batchtopk", k=1)
    f = d.encode(X)
    # Top 2 of relu(PRE) across both rows: 2.5 (row 1) and 2.0 (row 0).
    torch.testing.assert_close(f, torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.5, 0.0]]))
    d2 = _hand_set("batchtopk", k=2)
    f2 = d2.encode(X)  # top 4: 2.5, 2.0, 1.0, 0.5 -> row 0 keeps three, row 1 one
    assert (f2 != 0).sum(-1).tolist() == [3, 1]


def test_batchtopk_threshold_and_inference_form() -> None:
    d = _hand_set("batchtopk", k=1)
    with pytest.raises(ValueError, match="never estimated"):
        d.to_inference()
    d.update_threshold(d.encode(X))
    assert float(d.threshold) == 2.0  # first call: the smallest kept activation
    d.update_threshold(torch.tensor([[1.0, 0.0]]), lr=0.5)
    assert float(d.threshold) == 1.5  # then an exponential moving average
    j = d.to_inference()
    assert j.architecture == "jumprelu" and j.cfg.provenance["trained_as"] == "batchtopk"
    torch.testing.assert_close(j.get_parameter("threshold"), torch.full((3,), 1.5))
    # relu(PRE) > 1.5 -> only 2.0 and 2.5 fire, independent of the batch.
    torch.testing.assert_close(j.encode(X), torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.5, 0.0]]))
    torch.testing.assert_close(j.encode(X[1:]), torch.tensor([[0.0, 2.5, 0.0]]))


def test_topk_rejects_bad_k() -> None:
    with pytest.raises(ValueError, match="k"):
        build(DictionaryConfig("topk", 2, 3, k=4))
    with pytest.raises(ValueError, match="k"):
        build(DictionaryConfig("batchtopk", 2, 3))


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_of_encode_equals_forward(arch: str) -> None:
    d = random_dictionary(arch)
    x = torch.randn(5, 6)
    out = d(x)
    torch.testing.assert_close(d.decode(d.encode(x)), out.x_hat)
    torch.testing.assert_close(d.encode(x), out.feature_acts)
    torch.testing.assert_close(d.pre_activations(x), out.pre_acts)
    # Any leading dims work (e.g. [batch, seq, d_in]).
    x3 = torch.randn(2, 4, 6)
    assert d(x3).x_hat.shape == (2, 4, 6) and d.encode(x3).shape == (2, 4, 10)


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_decode_matches_dense_in_values_and_gradients(arch: str) -> None:
    d = random_dictionary(arch).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    target = torch.randn(7, 6, dtype=torch.float64)
    acts, idx = d.encode_sparse(x)
    results = []
    for sparse in (False, True):
        d.zero_grad()
        a = acts.detach().clone().requires_grad_(True)
        if sparse:
            x_hat = d.decode_sparse(a, idx)
        else:
            f = torch.zeros(7, d.d_sae, dtype=torch.float64).scatter(-1, idx, a)
            x_hat = d.decode(f)
        ((x_hat - target) ** 2).sum().backward()
        assert d.W_dec.grad is not None and d.b_dec.grad is not None and a.grad is not None
        results.append((x_hat.detach(), d.W_dec.grad.clone(), d.b_dec.grad.clone(), a.grad))
    for dense, sparse in zip(*results, strict=True):
        torch.testing.assert_close(sparse, dense)
    # The sparse view holds every active feature: decoding it reproduces forward exactly.
    torch.testing.assert_close(results[1][0], d(x).x_hat)


def test_topk_forward_sparse_path_matches_dense_reference() -> None:
    d = random_dictionary("topk").double()
    x = torch.randn(9, 6, dtype=torch.float64)
    grads = []
    for sparse in (True, False):
        d.sparse_decode = sparse  # type: ignore[attr-defined]
        d.zero_grad()
        out = d(x)
        (out.x_hat**2).sum().backward()
        grads.append((out.x_hat.detach(), *(p.grad.clone() for p in d.parameters())))  # type: ignore[union-attr]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("arch", ARCHS)
def test_feature_direction_is_unit_decoder_row(arch: str) -> None:
    d = random_dictionary(arch)
    v = d.feature_direction(3)
    torch.testing.assert_close(v.norm(), torch.tensor(1.0))
    torch.testing.assert_close(v * d.W_dec[3].norm(), d.W_dec[3])
    with pytest.raises(IndexError):
        d.feature_direction(10)


@pytest.mark.parametrize("arch", ARCHS)
def test_folded_scale_on_raw_x_equals_unfolded_on_scaled_x(arch: str) -> None:
    d = random_dictionary(arch).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    s = 0.37
    before = d(s * x)
    d.fold_input_scale(s)
    after = d(x)
    torch.testing.assert_close(after.feature_acts, before.feature_acts)
    torch.testing.assert_close(after.x_hat, before.x_hat / s)  # reconstruction in raw units
    assert d.cfg.normalization["folded_input_scale"] == s
