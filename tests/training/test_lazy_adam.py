"""Lazy Adam: features a step did not train keep their parameters and Adam moments."""

from __future__ import annotations

import torch

from sae.base import DictionaryConfig, build
from training.lazy_adam import hold_silent_features


def test_a_feature_that_did_not_fire_keeps_its_weights_and_moments_while_the_rest_move():
    torch.manual_seed(0)
    d = build(DictionaryConfig("relu", d_in=4, d_sae=5))
    with torch.no_grad():
        for p in d.parameters():
            p.normal_()
    opt = torch.optim.Adam(d.parameters(), lr=0.1)
    x = torch.randn(16, 4)
    for _ in range(3):  # every feature fires: moments everywhere
        opt.zero_grad()
        with torch.no_grad():
            d.b_enc.fill_(10.0)
        (d(x).x_hat - x).pow(2).sum().backward()
        opt.step()
    with torch.no_grad():
        d.b_enc.copy_(torch.tensor([10.0, -100.0, 10.0, -100.0, 10.0]))  # 1 and 3 never fire
    before = {n: p.detach().clone() for n, p in d.named_parameters()}
    moments = {n: opt.state[p]["exp_avg_sq"].clone() for n, p in d.named_parameters()}
    opt.zero_grad()
    (d(x).x_hat - x).pow(2).sum().backward()
    assert d.b_enc.grad[[1, 3]].eq(0).all() and d.b_enc.grad[[0, 2, 4]].ne(0).all()

    restore = hold_silent_features(opt, d)
    opt.step()
    restore()

    silent, fired = [1, 3], [0, 2, 4]
    params = dict(d.named_parameters())
    for name, dim in (("W_enc", 1), ("b_enc", 0), ("W_dec", 0)):
        p, sq = params[name], opt.state[params[name]]["exp_avg_sq"]
        idx = torch.tensor(silent)
        assert torch.equal(p.index_select(dim, idx), before[name].index_select(dim, idx))
        assert torch.equal(sq.index_select(dim, idx), moments[name].index_select(dim, idx))
        moved = p.index_select(dim, torch.tensor(fired)) - before[name].index_select(
            dim, torch.tensor(fired)
        )
        assert moved.abs().amin() > 0  # plain Adam steps for the features that fired
    assert not torch.equal(params["b_dec"], before["b_dec"])  # shared: always updated
