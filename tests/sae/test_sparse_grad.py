"""The sparse-gradient forward equals the dense reference: outputs, every gradient, training."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import sae.base
from sae import Dictionary
from sae.architectures.batchtopk import RANKING_MARGIN
from sae.sparse_grad import (
    MAX_ACTIVE_FRACTION,
    _sampled_dot,
    codes_from_indices,
    codes_from_mask,
    decode_active,
    firing_counts,
    gather_pre_acts,
)
from tests.sae.util import random_dictionary
from training.config import DictionaryShape, ObjectiveConfig, ResampleConfig, TrainConfig
from training.distributed import DistInfo
from training.member import Member

SPARSE_ARCHS = ["relu", "topk", "batchtopk", "jumprelu"]


def _sparse_dictionary(arch: str, **cfg: Any) -> Dictionary:
    """float64, d_in 8, d_sae 64, k 4: few enough active codes for the sparse path."""
    d = random_dictionary(arch, d_in=8, d_sae=64, k=4, **cfg).double()
    if arch in ("relu", "jumprelu"):
        with torch.no_grad():
            d.b_enc.sub_(7.0)  # a few percent of random pre-activations stay positive
    return d


def _outputs_and_grads(d: Dictionary, x: torch.Tensor, sparse: bool) -> list[torch.Tensor]:
    """Forward (sparse or the dense reference), a loss reading x_hat and the codes, backward."""
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    code_weights = torch.randn(d.d_sae, generator=gen, dtype=x.dtype)
    d.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    out = d(x) if sparse else d.dense_forward(x)
    assert out.pre_acts.requires_grad is not sparse  # the path asked for was taken
    loss = ((out.x_hat - target) ** 2).sum() + (out.feature_acts * code_weights).sum()
    loss.backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in d.parameters()]
    assert x.grad is not None
    return [out.x_hat, out.feature_acts, out.pre_acts, x.grad, *grads]


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
@pytest.mark.parametrize("arch", SPARSE_ARCHS)
def test_sparse_forward_equals_dense_in_outputs_and_every_gradient(
    arch: str, apply_b_dec_to_input: bool
) -> None:
    d = _sparse_dictionary(arch, apply_b_dec_to_input=apply_b_dec_to_input)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    dense = _outputs_and_grads(d, x, sparse=False)
    sparse = _outputs_and_grads(d, x, sparse=True)
    assert dense[1].count_nonzero() > 0 and dense[4].abs().sum() > 0  # codes and W_enc grads
    for a, b in zip(sparse, dense, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cutoff_of_kth", [0.5, 0.99, 2.0])  # fast, fast, fallback
def test_batchtopk_ranking_above_its_running_threshold_changes_nothing(
    cutoff_of_kth: float,
) -> None:
    d = _sparse_dictionary("batchtopk")
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kth = torch.relu(d.pre_activations(x)).flatten().topk(4 * 16).values.min()
    with torch.no_grad():
        d.get_buffer("threshold").fill_(float(kth) * cutoff_of_kth / RANKING_MARGIN)
    assert d.ranking_cutoff() == pytest.approx(float(kth) * cutoff_of_kth)  # type: ignore[operator]
    dense = _outputs_and_grads(d, x, sparse=False)
    sparse = _outputs_and_grads(d, x, sparse=True)
    for a, b in zip(sparse, dense, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)


def test_too_many_active_codes_fall_back_to_the_dense_forward() -> None:
    d = random_dictionary("relu", d_in=8, d_sae=64).double()  # about half the codes fire
    x = torch.randn(16, 8, dtype=torch.float64)
    assert codes_from_mask(d.pre_activations(x) > 0) is None
    out = d(x)
    assert out.pre_acts.requires_grad  # the dense path, with its own gradients
    torch.testing.assert_close(out.x_hat, d.dense_forward(x).x_hat, rtol=0, atol=0)
    # The same for topk when k is not a small share of the features.
    dk = random_dictionary("topk", d_in=8, d_sae=16, k=4)
    assert MAX_ACTIVE_FRACTION * 16 < 4 and dk(torch.randn(3, 8)).pre_acts.requires_grad


def test_codes_from_mask_limit_and_order() -> None:
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[2, [9, 1]] = True
    mask[0, 5] = True
    codes = codes_from_mask(mask)
    assert codes is not None
    assert codes.rows.tolist() == [0, 2, 2] and codes.cols.tolist() == [5, 1, 9]
    assert codes.offsets.tolist() == [0, 1, 1, 3, 3]
    assert codes.cols[codes.col_order].tolist() == [1, 5, 9]
    limit = int(MAX_ACTIVE_FRACTION * mask.numel())
    mask.zero_().view(-1)[:limit] = True
    assert codes_from_mask(mask) is not None
    mask.view(-1)[limit] = True
    assert codes_from_mask(mask) is None


def test_gather_and_decode_of_any_codes_match_indexing_and_the_dense_decode() -> None:
    gen = torch.Generator().manual_seed(3)
    d = random_dictionary("relu", d_in=8, d_sae=64).double()
    x = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    idx = torch.randperm(64, generator=gen)[:15].reshape(5, 3)  # unsorted within rows
    codes = codes_from_indices(idx, 64)
    results = []
    for sparse in (True, False):
        d.zero_grad()
        pre = d.pre_activations(x)
        pre = pre.detach() if sparse else pre
        values = gather_pre_acts(d, x, pre, codes)
        if sparse:
            x_hat = decode_active(values, codes, d.W_dec)
        else:
            f = torch.zeros(5, 64, dtype=torch.float64).index_put((codes.rows, codes.cols), values)
            x_hat = f @ d.W_dec
        x_hat.pow(3).sum().backward()
        results.append([x_hat.detach(), values.detach(), *(p.grad for p in d.parameters())])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_portable_sampled_dot_matches_the_dense_product() -> None:
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(6, 8, generator=gen), torch.randn(20, 8, generator=gen)
    codes = codes_from_indices(torch.randint(0, 20, (6, 1), generator=gen), 20)
    expected = (a @ b.T)[codes.rows, codes.cols]
    torch.testing.assert_close(_sampled_dot(a, b, codes), expected)  # sparse-CSR kernel
    half = _sampled_dot(a.bfloat16(), b.bfloat16(), codes)  # the chunked fallback
    torch.testing.assert_close(half.float(), expected, rtol=2e-2, atol=5e-2)


def _train(objective: str, sparse_grad: bool, steps: int, batches: list[torch.Tensor]) -> Member:
    batch = batches[0].shape[0]
    cfg = TrainConfig(
        total_tokens=steps * batch,
        batch_size=batch,
        device="cpu",
        sparse_grad=sparse_grad,
        dictionary=DictionaryShape(d_sae=64, b_dec_init="mean"),
        objective=ObjectiveConfig(name=objective, k=4, dead_tokens=batch, l1_coefficient=1.0),
        resample=ResampleConfig(enabled=False),
    )
    m = Member(objective, cfg, 8, torch.device("cpu"), DistInfo())
    m.dictionary.double()  # float64, so Adam's normalisation cannot magnify rounding
    m.initialize(torch.cat(batches), 1.0)
    with torch.no_grad():
        m.dictionary.b_enc.fill_(-0.2)  # sparse from the start (relu_l1 encodes at 0.1 scale)
    for step, x in enumerate(batches):
        m.train_step(x, step, (step + 1) * batch, want_metrics=False, tokens_before=step * batch)
    return m


@pytest.mark.parametrize("objective", ["relu_l1", "relu_l1_2024", "topk_auxk", "batchtopk"])
def test_training_steps_give_the_same_parameters_with_the_switch_on_and_off(
    objective: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = sae.base.sparse_forward

    def counted(*args: Any) -> Any:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(sae.base, "sparse_forward", counted)
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(32, 8, generator=gen, dtype=torch.float64) for _ in range(6)]
    dense = _train(objective, False, 6, batches)
    assert not calls
    sparse = _train(objective, True, 6, batches)
    assert len(calls) == 6  # every step took the sparse path
    if objective in ("topk_auxk", "batchtopk"):
        assert bool((dense.firing.tokens_since_fired >= 32).any())  # AuxK had dead latents
    for (name, a), b in zip(
        dense.dictionary.state_dict().items(), sparse.dictionary.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11, msg=name)
    torch.testing.assert_close(sparse.firing.tokens_since_fired, dense.firing.tokens_since_fired)


def _grads_of(module: Any, d: Dictionary, x: torch.Tensor) -> list[torch.Tensor]:
    d.zero_grad()
    out = module(x)
    ((out.x_hat - x) ** 2).sum().backward()
    return [out.x_hat.detach().float(), *(p.grad.clone() for p in d.parameters())]  # type: ignore[union-attr]


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_bf16_autocast_sparse_forward_matches_the_dense_one(arch: str) -> None:
    d = _sparse_dictionary(arch).float()
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sparse = _grads_of(d, d, x)
        dense = _grads_of(d.dense_forward, d, x)
    assert all(g.dtype == torch.float32 for g in sparse[1:])
    for a, b in zip(sparse, dense, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))


def test_compiled_forward_takes_the_sparse_path_with_the_same_gradients() -> None:
    d = _sparse_dictionary("topk").float()
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(7))
    compiled = torch.compile(d)
    assert not compiled(x).pre_acts.requires_grad  # the sparse path
    for a, b in zip(_grads_of(compiled, d, x), _grads_of(d.dense_forward, d, x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk"])
def test_firing_counts_of_the_sparse_codes_equal_the_dense_count(arch: str) -> None:
    d = _sparse_dictionary(arch)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    for shift in (0.0, 1e3):  # then every pre-activation is negative: topk picks zero codes
        with torch.no_grad():
            d.b_enc.sub_(shift)
        out = d(x)
        assert out.active is not None and d.dense_forward(x).active is None
        expected = (d.dense_forward(x).feature_acts != 0).sum(0).float()
        assert bool(expected.sum() > 0) == (shift == 0)
        torch.testing.assert_close(firing_counts(out), expected, rtol=0, atol=0)
        torch.testing.assert_close(firing_counts(d.dense_forward(x)), expected, rtol=0, atol=0)
