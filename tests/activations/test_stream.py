"""The no-disk stream: same batches contract, rows equal the model's, resumable."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from activations.hooks import ActivationCapture
from activations.source import ResumableSource
from activations.stream import stream_activations
from activations.text import TextConfig, token_batches
from tests.helpers import make_docs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HOOK = "blocks.0.mlp.hook_post"


def test_stream_yields_every_row_of_the_text_once_and_resumes(tmp_path, tiny_model):
    text = TextConfig(dataset=str(make_docs(tmp_path / "d", 16)), context_size=16, batch_size=8)
    stream = stream_activations(tiny_model, HOOK, text, batch_size=50, mix_passes=3, seed=1)
    assert isinstance(stream, ResumableSource)
    batches = list(stream)
    assert all(b.shape == (50, 64) for b in batches[:-1]) and batches[-1].dtype == torch.float32
    tokens = torch.cat(list(token_batches(text, tiny_model.tokenizer)))
    with ActivationCapture(tiny_model, [HOOK]) as capture:
        want = capture(tokens)[HOOK][:, 1:].reshape(-1, 64)  # BOS dropped
    got = torch.cat(batches)
    assert Counter(r.numpy().tobytes() for r in got) == Counter(r.numpy().tobytes() for r in want)
    assert not torch.equal(got, want)  # mixed, not in stream order

    for stop in (2, 5):
        first = stream_activations(tiny_model, HOOK, text, batch_size=50, mix_passes=3, seed=1)
        it = iter(first)
        for _ in range(stop):
            next(it)
        again = stream_activations(tiny_model, HOOK, text, batch_size=50, mix_passes=3, seed=1)
        again.load_state_dict(first.state_dict())
        rest = list(again)
        assert len(rest) == len(batches) - stop
        assert all(torch.equal(a, b) for a, b in zip(rest, batches[stop:], strict=True))
