"""Steering: strength 0 is the baseline token for token, a large `add` raises the feature's
promoted tokens (measured), clamp keeps the reconstruction error, units are documented."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import torch

from tests.server.conftest import API_KEY

PROMPT = "def add(a, b):\n"


def steer(client: httpx.Client, **body: Any) -> dict[str, Any]:
    body.setdefault("prompt", PROMPT)
    r = client.post("/api/steer", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize(
    "decoding", [{"temperature": 0.0}, {"temperature": 1.0, "top_k": 50, "seed": 7}]
)
def test_strength_zero_is_the_baseline(client: httpx.Client, decoding: dict[str, Any]) -> None:
    ivs = [
        {"feature": "mlp0/3", "mode": "add", "strength": 0.0},
        {"feature": "bare/9", "strength": 0},
    ]
    r = steer(client, interventions=ivs, max_new_tokens=16, **decoding)
    assert r["steered"]["token_ids"] == r["baseline"]["token_ids"]
    assert r["steered"]["text"] == r["baseline"]["text"]
    assert len(r["baseline"]["token_ids"]) > 0


def test_sampling_is_seeded(client: httpx.Client) -> None:
    ivs = [{"feature": "mlp0/3", "strength": 2.0}]
    a = steer(client, interventions=ivs, max_new_tokens=12, temperature=1.5, seed=11)
    b = steer(client, interventions=ivs, max_new_tokens=12, temperature=1.5, seed=11)
    c = steer(client, interventions=ivs, max_new_tokens=12, temperature=1.5, seed=12)
    assert a == b
    assert a["baseline"]["token_ids"] != c["baseline"]["token_ids"]


def _promoted(state: Any, address: str, n: int) -> list[int]:
    """The feature's top promoted tokens: the store's logit effects when analysed."""
    name, fid = address.split("/")
    sd = state.dictionaries[name]
    if sd.has_analysis():
        return [e.token_id for e in sd.store.feature(int(fid)).promoted[:n]]
    from analysis.logit_effects import logit_effects

    return (
        logit_effects(
            state.model_for(sd),
            sd.dictionary.cfg.hook_name,
            sd.dictionary.W_dec[int(fid) : int(fid) + 1],
            n,
        )
        .promoted_ids[0]
        .tolist()
    )


@pytest.mark.parametrize("address", ["mlp0/3", "bare/21"])
def test_large_add_raises_promoted_tokens(client: httpx.Client, state: Any, address: str) -> None:
    from server.inference import tokenize
    from server.steering import Steer, next_token_logits, prompt_norm_unit, steering_hooks

    name, fid = address.split("/")
    sd = state.dictionaries[name]
    model = state.model_for(sd)
    promoted = _promoted(state, address, 5)
    ids = tokenize(model, PROMPT, 64)
    unit = (
        sd.store.feature(int(fid)).max_act
        if sd.has_analysis()
        else prompt_norm_unit(model, ids, sd.dictionary, int(fid))
    )

    def mass(strength: float) -> float:
        hooks = steering_hooks([Steer(sd.dictionary, int(fid), "add", strength, unit)])
        p = torch.softmax(next_token_logits(model, ids, hooks), -1)
        return float(p[promoted].sum())

    base, weak, strong = mass(0.0), mass(2.0), mass(50.0)
    assert base < 0.2
    assert base < weak < strong
    assert strong > 0.9
    # Through the API: the steered greedy completion is made of promoted tokens.
    r = steer(client, interventions=[{"feature": address, "strength": 100.0}], max_new_tokens=8)
    steered = r["steered"]["token_ids"]
    in_promoted = sum(t in promoted for t in steered) / len(steered)
    in_base = sum(t in promoted for t in r["baseline"]["token_ids"]) / max(
        len(r["baseline"]["token_ids"]), 1
    )
    assert in_promoted > 0.8 and in_promoted > in_base
    assert steered[0] == promoted[0]


def test_units_of_strength(client: httpx.Client, state: Any) -> None:
    r = steer(
        client,
        interventions=[
            {"feature": "mlp0/3", "strength": 1.0},
            {"feature": "bare/3", "strength": 1.0},
            {"feature": "mlp0/4", "mode": "clamp", "strength": 0.5},
        ],
        max_new_tokens=2,
    )
    analysed, bare, clamp = r["interventions"]
    assert analysed["unit_source"] == "analysis_max_activation"
    assert analysed["unit"] == pytest.approx(state.dictionaries["mlp0"].store.feature(3).max_act)
    assert bare["unit_source"] == "prompt_norm" and bare["unit"] > 0
    assert clamp["unit_source"] == "raw" and clamp["unit"] is None


def test_clamp_keeps_the_reconstruction_error(state: Any) -> None:
    """x' = x + (v - f_i) W_dec[i] is exactly decode(f with f_i = v) + (x - decode(f))."""
    from server.steering import Steer, _apply

    d = state.dictionaries["bare"].dictionary
    x = torch.randn(3, 5, d.d_in, generator=torch.Generator().manual_seed(0))
    for fid, value in ((4, 2.5), (17, 0.0)):
        x2 = _apply([Steer(d, fid, "clamp", value)], x)
        f = d.encode(x)
        f2 = f.clone()
        f2[..., fid] = value
        assert torch.allclose(x2 - d.decode(f2), x - d.decode(f), atol=1e-5)
    # Clamping a feature to its own activation changes nothing.
    fid = int(d.encode(x).reshape(-1, d.d_sae).max(0).values.argmax())
    same = _apply([Steer(d, fid, "clamp", 0.0)], x)
    f = d.encode(x)[..., fid]
    assert torch.allclose(same + f[..., None] * d.W_dec[fid], x, atol=1e-5)


def test_steer_errors(client: httpx.Client) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = client.post(
        "/api/steer",
        json={"prompt": "x", "interventions": [{"feature": "mlp0/999", "strength": 1}]},
        headers=headers,
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.post("/api/steer", json={"prompt": "x", "interventions": []}, headers=headers)
    assert r.status_code == 422
    r = client.post(
        "/api/steer", json={"prompt": "x", "interventions": [{"feature": "mlp0/1", "strength": 1}]}
    )
    assert r.status_code == 401


def test_extreme_decoding_settings_are_not_errors(client: httpx.Client) -> None:
    """A temperature of 1e-300 is greedy, not NaN (found by the schema fuzz)."""
    ivs = [{"feature": "mlp0/3", "strength": 1.0}]
    tiny = steer(client, interventions=ivs, max_new_tokens=4, temperature=1e-300, seed=1)
    greedy = steer(client, interventions=ivs, max_new_tokens=4, temperature=0.0)
    assert tiny["steered"]["token_ids"] == greedy["steered"]["token_ids"]
    hot = steer(client, interventions=ivs, max_new_tokens=4, temperature=10.0, top_k=1)
    assert hot["steered"]["token_ids"] == greedy["steered"]["token_ids"]  # top_k=1 is greedy
