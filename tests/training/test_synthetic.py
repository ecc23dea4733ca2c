"""The realistic ground-truth generator keeps its promises (hierarchy, exclusivity, magnitudes,
marginals, determinism) and the ground-truth metrics give hand-checkable answers on oracle
codes."""

from __future__ import annotations

import torch
from torch import Tensor

from sae.base import Dictionary, DictionaryConfig, ForwardOutput, register
from training.synthetic import RealisticActivations, RealisticConfig, nearly_orthogonal
from training.synthetic_metrics import ground_truth_metrics, matched_cosines

SMALL = RealisticConfig(
    d_in=32, n_features=256, n_trees=8, branching=3, depth=2, p_max=0.3, orthogonalize_steps=5
)


def test_children_fire_only_with_their_parent_one_at_a_time_scaled_by_it():
    truth = RealisticActivations(SMALL, batch_size=512)
    b = truth.sample(0)
    events = {
        (int(r), int(f)): float(m) for r, f, m in zip(b.rows, b.features, b.magnitudes, strict=True)
    }
    assert len(events) == b.rows.numel()  # no feature fires twice in a row
    n_children, child_ratio, parent_ratio = 0, [], []
    per_parent: dict[tuple[int, int], int] = {}
    for (row, feat), mag in events.items():
        parent = int(truth.parent[feat])
        if parent < 0:
            continue
        n_children += 1
        assert (row, parent) in events  # a child fires only with its parent
        per_parent[(row, parent)] = per_parent.get((row, parent), 0) + 1
        child_ratio.append(mag / float(truth.mean_magnitude[feat]))
        parent_ratio.append(events[(row, parent)] / float(truth.mean_magnitude[parent]))
    assert n_children > 100
    assert max(per_parent.values()) == 1  # siblings are mutually exclusive
    corr = torch.corrcoef(torch.tensor([child_ratio, parent_ratio]))[0, 1]
    assert corr > 0.5  # a child's magnitude scales with its parent's

    x = truth.bias + torch.zeros(512, 32).index_add_(
        0, b.rows, b.magnitudes[:, None] * truth.features[b.features]
    )
    assert torch.allclose(b.x, x, atol=1e-5)
    assert torch.equal(truth.sample(0).x, b.x)  # deterministic from the seed
    assert not torch.equal(truth.held_out(10**9).sample(0).x, b.x)


def test_marginals_zipf_and_correlations():
    truth = RealisticActivations(SMALL, batch_size=1024)
    counts = torch.zeros(SMALL.n_features)
    together = 0.0
    same = (truth.factor[:, None] == truth.factor[None, :]) & (
        truth.loading[:, None] * truth.loading[None, :] > 0
    )
    top = (truth.base_probs > 0.05).nonzero().squeeze(-1)
    pairs = same[top][:, top].float().triu(1)
    active_all = []
    for i in range(40):
        b = truth.sample(i)
        counts.index_add_(0, b.features, torch.ones(b.features.numel()))
        active = torch.zeros(1024, SMALL.n_features)
        active[b.rows, b.features] = 1
        active_all.append(active[:, top])
    empirical = counts / (40 * 1024)
    assert (empirical - truth.probs).abs().sum() < 0.05 * truth.probs.sum()
    a = torch.cat(active_all)
    p = a.mean(0)
    joint = (a.T @ a) / a.shape[0]
    lift = joint / (p[:, None] * p[None, :]).clamp_min(1e-9)
    together = float((lift * pairs).sum() / pairs.sum())
    assert together > 1.1  # features loading alike on a factor fire together more often
    ranked = truth.base_probs[truth.base_probs > 0].sort(descending=True).values
    assert torch.allclose(ranked[9] / ranked[0], torch.tensor(10**-SMALL.zipf_exponent))


def test_directions_are_pushed_apart():
    gen = torch.Generator().manual_seed(0)
    cos0 = nearly_orthogonal(512, 32, 0, gen)
    cos1 = nearly_orthogonal(512, 32, 30, torch.Generator().manual_seed(0))
    excess = [((g @ g.T).fill_diagonal_(0).abs().max()) for g in (cos0, cos1)]
    assert excess[1] < excess[0] - 0.05


@register("oracle_for_tests")
class Oracle(Dictionary):
    """Replays given codes, one [B, F] tensor per call."""

    queue: list[Tensor]

    def forward(self, x: Tensor) -> ForwardOutput:
        f = self.queue.pop(0)
        return ForwardOutput(x_hat=self.decode(f), feature_acts=f, pre_acts=f)


def test_metrics_on_oracle_codes_perfect_then_absorbed():
    truth = RealisticActivations(SMALL, batch_size=256)
    batches = [truth.sample(i) for i in range(4)]
    d = Oracle(DictionaryConfig("oracle_for_tests", d_in=32, d_sae=256))
    with torch.no_grad():
        d.W_dec.copy_(truth.features)
        d.b_dec.copy_(truth.bias)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    _, mcc = matched_cosines(truth.features[perm][:100], truth.features)
    assert abs(mcc - 1.0) < 1e-5  # the matching finds a permuted subset exactly
    _, flipped = matched_cosines(-truth.features[perm][:100], truth.features)
    assert abs(flipped - 1.0) < 1e-5  # a direction's negative is the same feature

    def codes(absorb: bool) -> list[Tensor]:
        out = []
        for b in batches:
            f = torch.zeros(256, 256)
            f[b.rows, b.features] = b.magnitudes
            if absorb:  # a parent's latent is silent whenever a leaf child of it fires
                leaf = (truth.parent[b.features] >= 0) & (truth.children[b.features, 0] < 0)
                f[b.rows[leaf], truth.parent[b.features[leaf]]] = 0
            out.append(f)
        return out

    d.queue = codes(absorb=False)
    m = ground_truth_metrics(d, truth, batches)
    # Every latent that fired detects its feature perfectly; rare features that never fired
    # in these samples leave dead latents, which score 0.
    assert 0 < m.dead_fraction < 0.1
    assert abs(m.f1 - (1 - m.dead_fraction)) < 1e-6
    assert m.absorption == 0 and m.uniqueness == 1.0
    assert abs(m.explained_variance - 1) < 1e-5 and abs(m.shrinkage - 1) < 1e-5
    expected_l0 = sum(b.rows.numel() for b in batches) / 1024
    assert abs(m.l0 - expected_l0) < 1e-6

    # Co-active (parent, child) events whose child is a leaf, out of all co-active pairs.
    children = torch.cat([b.features[truth.parent[b.features] >= 0] for b in batches])
    leaf_share = float((truth.children[children, 0] < 0).float().mean())
    assert 0.2 < leaf_share < 0.9
    d.queue = codes(absorb=True)
    m = ground_truth_metrics(d, truth, batches)
    assert abs(m.absorption - leaf_share) < 1e-6 and m.f1 < 0.99
