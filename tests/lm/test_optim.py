"""The optimizers of `sae train-lm`: Muon's orthogonalisation and step size, its split of the
model's parameters, and its AdamW half against torch's AdamW."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lm.config import TrainLMConfig
from lm.optim import OPTIMIZERS, MuonAdamW, make_optimizer, orthogonalize


@pytest.mark.parametrize("shape", [(16, 48), (64, 16), (32, 32)])
def test_orthogonalize_flattens_the_spectrum(shape: tuple[int, int]) -> None:
    """Singular values spread over six orders of magnitude all land near 1 (five quintic
    Newton-Schulz steps leave them in about [0.7, 1.2], not exactly at 1)."""
    torch.manual_seed(0)
    a, b = shape
    u, _ = torch.linalg.qr(torch.randn(a, a))
    v, _ = torch.linalg.qr(torch.randn(b, b))
    k = min(a, b)
    s = torch.logspace(-3, 3, k)
    g = u[:, :k] @ torch.diag(s) @ v[:, :k].T
    out = orthogonalize(g)
    assert out.shape == g.shape
    sv = torch.linalg.svdvals(out)
    # The smallest singular values (1e-6 of the largest after normalisation) grow by the
    # slope at zero, 3.4445 per step: five steps do not reach 1 from there, the rest do.
    well_conditioned = sv[s.flip(0) > 1e-2 * s.max()]
    assert well_conditioned.min() > 0.6 and sv.max() < 1.25
    # Same singular vectors: out is g with its spectrum replaced.
    top_in = torch.linalg.svd(g).U[:, 0]
    assert torch.abs(top_in @ out @ torch.linalg.svd(g).Vh[0]) > 0.6


def _tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=50,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_inner=32,
        tie_word_embeddings=False,
        resid_pdrop=0.0,  # no dropout: the two twins must see the same forward pass
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def test_muon_takes_the_block_matrices_and_adamw_the_rest() -> None:
    model = _tiny_gpt2()
    opt = make_optimizer(model, TrainLMConfig(optimizer="muon"))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]}
    assert muon == {
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.mlp.c_fc.weight",
        "transformer.h.0.mlp.c_proj.weight",
    }
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] for p in g["params"]}
    assert decayed - muon == {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_muon_step_has_the_rms_of_an_adamw_step() -> None:
    """Rescaled by 0.2 sqrt(max(fan_in, fan_out)), a Muon step moves a matrix by an RMS of about
    0.2 lr whatever its shape, as an AdamW step typically does: one lr serves both."""
    lr = 1e-2
    for shape in [(16, 64), (64, 16), (48, 48)]:
        p = torch.nn.Parameter(torch.zeros(shape))
        opt = MuonAdamW([{"params": [p], "muon": True}], lr=lr)
        p.grad = torch.randn(shape)
        opt.step()
        rms = p.detach().pow(2).mean().sqrt().item()
        assert 0.15 * lr < rms < 0.25 * lr, (shape, rms / lr)


def test_adamw_half_matches_torch_adamw() -> None:
    """Parameters outside the Muon groups follow torch.optim.AdamW step for step."""
    model = _tiny_gpt2()
    twin = copy.deepcopy(model)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    ours = MuonAdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-3,
    )
    reference = OPTIMIZERS["adamw"].build(twin, TrainLMConfig(optimizer="adamw", lr=3e-3))
    x = torch.randint(0, 50, (4, 16))
    for _ in range(5):
        for m, opt in ((model, ours), (twin, reference)):
            m(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        # float rounding only: a wrong bias correction or decay would be off by ~lr = 3e-3
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=name)


def test_unknown_optimizer_is_refused() -> None:
    with pytest.raises(ValueError, match="optimizer must be one of adamw, muon"):
        TrainLMConfig(optimizer="sgd")
