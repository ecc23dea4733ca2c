"""Hook capture: several hooks, one pass, nothing computed after the last of them; hook edits
give the logits TransformerLens's run_with_hooks gives."""

from __future__ import annotations

import pytest
import torch

from activations.hooks import (
    ActivationCapture,
    check_hook_names,
    hook_activations,
    hook_layer,
    hook_widths,
    run_with_edits,
)
from sae.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HOOKS = ["blocks.0.hook_resid_post", "blocks.0.mlp.hook_post", "blocks.0.attn.hook_z"]


def test_capture_equals_run_with_cache_and_stops_after_the_last_hook(tiny_model):
    tokens = torch.randint(0, 250, (3, 20))
    _, cache = tiny_model.run_with_cache(tokens, names_filter=HOOKS)
    after = []  # a hook that would fire later in the pass: the final layer norm
    later = [("ln_final.hook_in", lambda t, hook: after.append(1))]
    with tiny_model.hooks(fwd_hooks=later), ActivationCapture(tiny_model, HOOKS) as capture:
        got = capture(tokens)
    for name in HOOKS:
        assert torch.equal(got[name], cache[name].reshape(3, 20, -1))
    assert got["blocks.0.attn.hook_z"].shape == (3, 20, 32)  # heads x d_head flattened
    assert after == []  # the pass stopped at the last requested hook
    assert hook_widths(tiny_model, HOOKS) == {HOOKS[0]: 32, HOOKS[1]: 64, HOOKS[2]: 32}


def test_bad_names_fail_with_the_valid_list(tiny_model):
    with pytest.raises(
        UserError, match=r"unknown hook 'blocks\.7\.mlp\.hook_post'.*blocks\.0\.mlp\.hook_post"
    ):
        check_hook_names(tiny_model, ["blocks.0.mlp.hook_post", "blocks.7.mlp.hook_post"])
    with pytest.raises(UserError, match="use_attn_result"):
        check_hook_names(tiny_model, ["blocks.0.attn.hook_result"])
    pattern = ActivationCapture(tiny_model, ["blocks.0.attn.hook_pattern"])
    with pytest.raises(UserError, match="per-token"), pattern as capture:
        capture(torch.randint(0, 250, (2, 5)))
    assert check_hook_names(tiny_model, [HOOKS[0], HOOKS[0]]) == [HOOKS[0]]
    assert hook_layer("blocks.12.hook_resid_pre") == 12 and hook_layer("hook_embed") is None


def test_an_open_capture_does_not_disturb_another_or_a_plain_forward(tiny_model):
    tokens = torch.randint(0, 250, (2, 10))
    full = tiny_model(tokens)
    with ActivationCapture(tiny_model, HOOKS[:1]) as outer:
        with ActivationCapture(tiny_model, HOOKS[1:2]) as inner:
            got = inner(tokens)
        assert torch.equal(tiny_model(tokens), full)  # the open capture stays passive
        assert set(outer(tokens)) == {HOOKS[0]} and set(got) == {HOOKS[1]}


def test_run_with_edits_equals_run_with_hooks_and_hook_activations_reads_one_hook(tiny_model):
    tokens = torch.randint(0, 250, (2, 12))
    hook = HOOKS[1]

    def double(x: torch.Tensor, hook: object = None) -> torch.Tensor:
        return 2 * x

    assert torch.equal(run_with_edits(tiny_model, tokens, {}), tiny_model(tokens))
    want = tiny_model.run_with_hooks(tokens, fwd_hooks=[(hook, double)], return_type="logits")
    got = run_with_edits(tiny_model, tokens, {hook: double})
    assert torch.equal(got, want) and not torch.equal(got, tiny_model(tokens))
    with ActivationCapture(tiny_model, [hook]) as capture:
        acts = capture(tokens)[hook]
    assert torch.equal(hook_activations(tiny_model, tokens, hook), acts)
    with ActivationCapture(tiny_model, [hook]) as capture:
        one = capture(tokens[1:])[hook][0]
    assert torch.equal(hook_activations(tiny_model, tokens[1], hook), one)  # one text [T]
