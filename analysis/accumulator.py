"""The streaming per-feature accumulator of `sae analyze` (analysis/analyze.py): what one
analysis pass collects (`AnalysisConfig`) and how it collects it for every feature at once in
O(d_sae x N) memory (`FeatureAccumulator`): top-N activating contexts, a uniform sample of
firings bucketed by quantile, firing counts, mean and max activation and a histogram.

Streaming top-N, exact and deterministic. Every (feature, token) activation gets a unique
int64 key: the float32 bit pattern of the activation (monotone for positive floats) in the
high 32 bits, `2**32 - 1 - global token index` in the low 32 bits. Larger key = larger
activation, ties broken by the earlier token. Per batch, only activations above a feature's
current N-th value can enter; they are merged with the running N on the device
(`torch.topk` over the concatenation), so memory is O(d_sae x N), never O(tokens), and the
result equals a full sort of all activations by (value desc, token index asc).

Quantile examples (what auto-interpretation such as Delphi samples from): the same merge over
hashed keys keeps a uniform random sample (bottom-k sampling) of each feature's firings; at
the end the sample is sorted by activation and cut into `n_quantiles` equal-count buckets.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from analysis.logit_effects import LogitEffects
from analysis.store_records import FeatureArrays, StoreMeta
from sae.errors import UserError

logger = logging.getLogger(__name__)

_LOW32 = (1 << 32) - 1
_MAX_KEY = (1 << 63) - 1


@dataclass
class AnalysisConfig:
    """What one analysis pass collects."""

    n_tokens: int = 1_000_000
    """Tokens of text to analyse (whole contexts; the last batch may overshoot)."""
    n_top: int = 20
    """Top-activating examples kept per feature."""
    context_before: int = 24
    """Tokens shown before the activating token in an example."""
    context_after: int = 7
    """Tokens shown after the activating token in an example (24 + 1 + 7 = 32-token windows,
    Delphi's default example length)."""
    n_quantiles: int = 5
    """Activation-quantile buckets of the sampled examples."""
    examples_per_quantile: int = 5
    """Sampled examples per quantile bucket."""
    n_logits: int = 10
    """Promoted and suppressed output tokens kept per feature."""
    histogram_bins: int = 60
    """Bins of the activation histogram, log-spaced between histogram_min and histogram_max."""
    histogram_min: float = 1e-3
    """Lower edge of the histogram; smaller activations count in the first bin."""
    histogram_max: float = 1e3
    """Upper edge of the histogram; larger activations count in the last bin."""
    seed: int = 0
    """Seed of the example sampling hash: same seed, same quantile examples."""
    bookkeeping_threads: int = 1
    """CPU threads for the per-batch bookkeeping after the scan for firings (0: leave torch's
    setting). It is many small ops; on a busy machine each multi-threaded small op waits for
    a descheduled worker, so one thread is the faster choice there."""

    def __post_init__(self) -> None:
        for name in ("n_tokens", "n_top", "n_quantiles", "examples_per_quantile"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.context_before < 0 or self.context_after < 0:
            raise ValueError("context_before and context_after must be >= 0")
        if self.n_logits < 0 or self.histogram_bins < 1:
            raise ValueError("n_logits must be >= 0 and histogram_bins >= 1")
        if not 0 < self.histogram_min < self.histogram_max:
            raise ValueError("need 0 < histogram_min < histogram_max")

    @property
    def window(self) -> int:
        return self.context_before + 1 + self.context_after

    @property
    def n_sampled(self) -> int:
        return self.n_quantiles * self.examples_per_quantile

    def histogram_edges(self) -> Float[Tensor, " B1"]:
        return torch.logspace(
            math.log10(self.histogram_min),
            math.log10(self.histogram_max),
            self.histogram_bins + 1,
            dtype=torch.float64,
        )


def activation_keys(values: Float[Tensor, " Z"], token_index: Int[Tensor, " Z"]) -> Tensor:
    """Unique int64 sort keys of positive activations: by value, then earlier token first."""
    bits = values.float().view(torch.int32).long()  # monotone in the value for values > 0
    return (bits << 32) | (_LOW32 - token_index)


def key_values(keys: Int[Tensor, "..."]) -> Float[Tensor, "..."]:
    """The activation a key was made from (0 for empty slots, key -1)."""
    vals = (keys.clamp_min(0) >> 32).int().view(torch.float32)
    return torch.where(keys >= 0, vals, torch.zeros_like(vals))


def sample_keys(token_index: Int[Tensor, " Z"], feature: Int[Tensor, " Z"], seed: int) -> Tensor:
    """Unique int64 keys in random order (a fixed hash of token, feature and seed); keeping
    the largest N keeps a uniform sample without replacement of size N (bottom-k sampling)."""
    x = (token_index & 0x7FFFFFFF) * 0x2545F491 + feature * 0x1B873593 + seed * 0x68E31DA4
    x = x & _LOW32
    for _ in range(2):  # a 32-bit integer mix (Wang/Mueller hash); no int64 overflow below
        x = (((x >> 16) ^ x) * 0x45D9F3B) & _LOW32
    x = (x >> 16) ^ x
    return _MAX_KEY - (((x >> 1) << 32) | (token_index & _LOW32))


@contextlib.contextmanager
def _threads(device: torch.device, n: int) -> Iterator[None]:
    """Run the block with `n` intra-op CPU threads (no-op off the CPU or for n = 0)."""
    before = torch.get_num_threads()
    if device.type != "cpu" or n <= 0 or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ExampleSlots:
    """The running best `n` (feature, token) pairs of every feature, by key, with their
    token windows and the feature's activation on every window token.

    Slots are unordered while streaming: a merge writes only the entries that enter, into
    the slots of the entries they evict (no per-batch reshuffle of the [F, N, W] windows);
    `sorted()` orders them by key at the end.
    """

    def __init__(self, d_sae: int, n: int, before: int, after: int, device: torch.device):
        self.n, self.before, self.after = n, before, after
        W = before + 1 + after
        self.keys = torch.full((d_sae, n), -1, dtype=torch.long, device=device)
        self.token_ids = torch.full((d_sae, n, W), -1, dtype=torch.int32, device=device)
        self.acts = torch.zeros((d_sae, n, W), dtype=torch.float32, device=device)
        self.sequence = torch.full((d_sae, n), -1, dtype=torch.long, device=device)
        self.position = torch.zeros((d_sae, n), dtype=torch.int32, device=device)

    def threshold(self) -> Int[Tensor, " F"]:
        """A candidate must have a larger key than this to enter (-1 while slots are free)."""
        return self.keys.min(dim=1).values

    def merge(
        self,
        feats: Int[Tensor, " C"],
        keys: Int[Tensor, " C"],
        rows: Int[Tensor, " C"],
        batch: _Batch,
    ) -> None:
        """Merge candidates (feature, key, row of the flattened batch) into the slots."""
        if feats.numel() == 0:
            return
        n = self.n
        # Each feature's n best candidates: sort by key desc, then stably by feature.
        order = keys.argsort(descending=True)
        order = order[feats[order].argsort(stable=True)]
        feats, keys, rows = feats[order], keys[order], rows[order]
        touched, local, counts = torch.unique_consecutive(
            feats, return_inverse=True, return_counts=True
        )
        starts = counts.cumsum(0) - counts
        rank = torch.arange(feats.numel(), device=feats.device) - starts[local]
        keep = rank < n
        local, keys, rows, rank = local[keep], keys[keep], rows[keep], rank[keep]
        U = touched.numel()
        cand_keys = torch.full((U, n), -1, dtype=torch.long, device=keys.device)
        cand_keys[local, rank] = keys
        cand_rows = torch.zeros((U, n), dtype=torch.long, device=keys.device)
        cand_rows[local, rank] = rows

        # The n best of old + candidates. Keys are unique (empty slots aside), so the chosen
        # set is deterministic; only its membership matters here.
        _, src = torch.cat([self.keys[touched], cand_keys], dim=1).topk(n, dim=1)
        chosen = torch.zeros((U, 2 * n), dtype=torch.bool, device=keys.device)
        chosen.scatter_(1, src, True)
        # Evicted old slots and entering candidates pair up row by row (equal counts per
        # feature, both listed in row-major order).
        u_slot, slot = (~chosen[:, :n]).nonzero(as_tuple=True)
        u_cand, cand = chosen[:, n:].nonzero(as_tuple=True)
        if slot.numel() == 0:
            return
        f = touched[u_slot]
        new_keys = cand_keys[u_cand, cand]
        self.keys[f, slot] = new_keys
        tok, act, seq, pos = batch.windows(cand_rows[u_cand, cand], f, self.before, self.after)
        empty = new_keys < 0  # only when fewer than n firings exist so far
        self.token_ids[f, slot] = torch.where(empty[:, None], torch.full_like(tok, -1), tok)
        self.acts[f, slot] = torch.where(empty[:, None], torch.zeros_like(act), act)
        self.sequence[f, slot] = torch.where(empty, torch.full_like(seq, -1), seq)
        self.position[f, slot] = pos

    def sorted(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(keys, token_ids, acts, sequence, position) with each feature's slots by key desc."""
        order = self.keys.argsort(dim=1, descending=True)
        W = self.token_ids.shape[-1]
        o3 = order[..., None].expand(-1, -1, W)
        return (
            self.keys.gather(1, order),
            self.token_ids.gather(1, o3),
            self.acts.gather(1, o3),
            self.sequence.gather(1, order),
            self.position.gather(1, order),
        )


class _Batch(NamedTuple):
    """One batch of contexts, flattened to rows: what windows are cut from."""

    tokens: Int[Tensor, "S T"]
    sequence: Int[Tensor, " S"]
    acts: Float[Tensor, "BT F"]

    def windows(
        self, rows: Int[Tensor, " M"], feats: Int[Tensor, " M"], before: int, after: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Token ids [M, W] (-1 outside the context), activations [M, W], sequence, position."""
        T = self.tokens.shape[1]
        s, t = rows // T, rows % T
        offsets = torch.arange(-before, after + 1, device=rows.device)
        where = t[:, None] + offsets  # [M, W]
        inside = (where >= 0) & (where < T)
        where = where.clamp(0, T - 1)
        tok = self.tokens[s[:, None], where].int()
        tok = torch.where(inside, tok, torch.full_like(tok, -1))
        act = self.acts[s[:, None] * T + where, feats[:, None]]
        act = torch.where(inside, act, torch.zeros_like(act))
        return tok, act, self.sequence[s], t.int()


class FeatureAccumulator:
    """Streaming per-feature statistics over batches of contexts; memory O(d_sae x N)."""

    def __init__(self, d_sae: int, cfg: AnalysisConfig, device: torch.device | str = "cpu"):
        device = torch.device(device)
        self.cfg, self.d_sae = cfg, d_sae
        self.n_tokens = 0
        self.context_size: int | None = None
        self.edges = cfg.histogram_edges().to(device)
        self.hist = torch.zeros((d_sae, cfg.histogram_bins), dtype=torch.long, device=device)
        self.sum_acts = torch.zeros(d_sae, dtype=torch.float64, device=device)
        b, a = cfg.context_before, cfg.context_after
        self.top = ExampleSlots(d_sae, cfg.n_top, b, a, device)
        self.sample = ExampleSlots(d_sae, cfg.n_sampled, b, a, device)

    @torch.no_grad()
    def update(
        self,
        tokens: Int[Tensor, "S T"],
        sequence: Int[Tensor, " S"],
        feature_acts: Float[Tensor, "S T F"],
        valid: Bool[Tensor, "S T"] | None = None,
    ) -> None:
        """Add a batch: contexts `tokens`, their indices in the context stream, and codes.
        Positions where `valid` is False (e.g. BOS rows a cache left out) are not counted."""
        S, T = tokens.shape
        if self.context_size is None:
            self.context_size = T
        elif self.context_size != T:
            raise ValueError(f"contexts of {T} tokens after contexts of {self.context_size}")
        device = self.hist.device
        tokens, sequence = tokens.to(device), sequence.to(device)
        acts = feature_acts.reshape(S * T, self.d_sae).to(device=device, dtype=torch.float32)
        token_index = (sequence[:, None] * T + torch.arange(T, device=device)).reshape(-1)
        if int(token_index.max()) > _LOW32:
            raise UserError("analysis supports at most 2**32 tokens per run")
        if valid is None:
            self.n_tokens += S * T
        else:
            valid = valid.to(device).reshape(S * T, 1)
            acts = acts * valid
            self.n_tokens += int(valid.sum())

        # Every firing, in one scan of the codes (no boolean temporary); O(l0) per token after.
        rows, feats = acts.nonzero(as_tuple=True)
        with _threads(device, self.cfg.bookkeeping_threads):
            self._add_firings(rows, feats, acts, tokens, sequence, token_index)

    def _add_firings(
        self,
        rows: Int[Tensor, " Z"],
        feats: Int[Tensor, " Z"],
        acts: Float[Tensor, "BT F"],
        tokens: Int[Tensor, "S T"],
        sequence: Int[Tensor, " S"],
        token_index: Int[Tensor, " BT"],
    ) -> None:
        vals = acts[rows, feats]
        fires = vals > 0  # codes are >= 0 in every architecture; NaN or negatives never fire
        if not bool(fires.all()):
            rows, feats, vals = rows[fires], feats[fires], vals[fires]
        self.sum_acts += torch.bincount(feats, weights=vals.double(), minlength=self.d_sae)
        bins = torch.bucketize(vals.double(), self.edges[1:-1], right=True)
        flat = feats * self.cfg.histogram_bins + bins
        self.hist += torch.bincount(flat, minlength=self.hist.numel()).view_as(self.hist)

        batch = _Batch(tokens, sequence, acts)
        tok_idx = token_index[rows]
        keys = activation_keys(vals, tok_idx)
        enter = keys > self.top.threshold()[feats]
        self.top.merge(feats[enter], keys[enter], rows[enter], batch)
        skeys = sample_keys(tok_idx, feats, self.cfg.seed)
        enter = skeys > self.sample.threshold()[feats]
        self.sample.merge(feats[enter], skeys[enter], rows[enter], batch)

    def result(
        self, meta: StoreMeta, vocab: list[str], logits: LogitEffects | None
    ) -> FeatureArrays:
        """Everything collected, as the numpy arrays the feature store keeps."""
        F, L = self.d_sae, self.cfg.context_before
        top_keys, top_tok, top_act, top_seq, top_pos = self.top.sorted()
        top_vals = key_values(top_keys)
        # Quantile buckets: sort the uniform sample by activation (ties: by sample key), cut
        # into equal counts.
        s_keys, s_tok, s_act, s_seq, s_pos = self.sample.sorted()
        valid = s_keys >= 0
        act_at = torch.where(valid, s_act[:, :, L], torch.full_like(s_act[:, :, L], math.inf))
        order = act_at.argsort(dim=1, stable=True)
        W = s_act.shape[-1]
        q_tok = s_tok.gather(1, order[..., None].expand(-1, -1, W))
        q_act = s_act.gather(1, order[..., None].expand(-1, -1, W))
        q_seq, q_pos = s_seq.gather(1, order), s_pos.gather(1, order)
        count = valid.sum(1, keepdim=True).clamp_min(1)
        rank = torch.arange(self.sample.n, device=count.device)[None, :]
        bucket = torch.where(
            rank < count, rank * self.cfg.n_quantiles // count, torch.full_like(rank, -1)
        )
        K = self.cfg.n_logits
        empty_ids = np.zeros((F, 0), dtype=np.int32)
        empty_vals = np.zeros((F, 0), dtype=np.float32)

        def np_(t: Tensor, dtype: Any) -> np.ndarray:
            return t.detach().cpu().numpy().astype(dtype)

        return FeatureArrays(
            meta=meta,
            vocab=vocab,
            n_fires=np_(self.hist.sum(1), np.int64),
            sum_acts=np_(self.sum_acts, np.float64),
            max_act=np_(top_vals[:, 0], np.float32),
            hist_counts=np_(self.hist, np.int64),
            top_token_ids=np_(top_tok, np.int32),
            top_acts=np_(top_act, np.float32),
            top_sequence=np_(top_seq, np.int64),
            top_position=np_(top_pos, np.int32),
            q_token_ids=np_(q_tok, np.int32),
            q_acts=np_(q_act, np.float32),
            q_sequence=np_(q_seq, np.int64),
            q_position=np_(q_pos, np.int32),
            q_bucket=np_(bucket.expand(F, -1), np.int16),
            promoted_ids=np_(logits.promoted_ids[:, :K], np.int32) if logits else empty_ids,
            promoted_values=np_(logits.promoted[:, :K], np.float32) if logits else empty_vals,
            suppressed_ids=np_(logits.suppressed_ids[:, :K], np.int32) if logits else empty_ids,
            suppressed_values=np_(logits.suppressed[:, :K], np.float32) if logits else empty_vals,
        )
