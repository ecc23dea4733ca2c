"""Every endpoint of a real uvicorn server and parity with the Python API (what the service
returns, a loaded Dictionary and model reproduce). Access and limits: test_limits.py."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import torch

from sae.evaluation import summary_line
from tests.server.conftest import API_KEY, HELD_OUT, HELD_OUT_SOURCE, HOOK
from tests.server.helpers import assert_error

TEXT = "import os\nprint(os.getcwd())\n"


def test_health_and_ready(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["dictionaries"] == 2 and ready["queue"] == 0


def test_dictionaries(client: httpx.Client) -> None:
    ds = {d["name"]: d for d in client.get("/api/dictionaries").json()["dictionaries"]}
    assert set(ds) == {"mlp0", "bare"}
    assert ds["mlp0"]["has_analysis"] and ds["mlp0"]["analysis"]["n_top"] == 12
    assert not ds["bare"]["has_analysis"] and ds["bare"]["analysis"] is None
    # The held-out figures saved with the dictionary, and the line `sae info` prints.
    assert ds["mlp0"]["evaluation"] == HELD_OUT and ds["bare"]["evaluation"] is None
    assert ds["mlp0"]["evaluation_summary"] == summary_line(HELD_OUT)
    assert "never fired 0.8%" in ds["mlp0"]["evaluation_summary"]
    assert ds["mlp0"]["evaluation_source"] == HELD_OUT_SOURCE
    one = client.get("/api/dictionaries/bare").json()
    assert one == ds["bare"] and one["d_sae"] == 128 and one["hook_name"] == HOOK
    assert_error(client.get("/api/dictionaries/nope"), 404, "not_found")


def _firing_feature(state: Any) -> int:
    """An analysed feature with stored examples (the strongest)."""
    store = state.dictionaries["mlp0"].store
    return store.features(0, 1, order_by="max_act", descending=True)[0].feature_id


def test_feature_page_is_the_store(client: httpx.Client, state: Any) -> None:
    fid = _firing_feature(state)
    store = state.dictionaries["mlp0"].store
    rec = store.feature(fid)
    f = client.get(f"/api/features/mlp0/{fid}", params={"limit": 5}).json()
    assert f["address"] == f"mlp0/{fid}" and f["feature_id"] == fid
    assert f["stats"]["max_activation"] == pytest.approx(rec.max_act)
    assert f["stats"]["frequency"] == pytest.approx(rec.density)
    assert f["stats"]["count"] == rec.n_fires > 0
    assert f["histogram"]["counts"] == rec.histogram.counts
    assert len(f["histogram"]["bin_edges"]) == len(f["histogram"]["counts"]) + 1
    assert [e["token_id"] for e in f["logit_effects"]["positive"]] == [
        e.token_id for e in rec.promoted
    ]
    # Pagination: two pages are the first ten of the stored top examples, in order.
    all_examples = store.top_examples(fid, 0, 100)
    page1 = f["top_examples"]
    page2 = client.get(f"/api/features/mlp0/{fid}", params={"offset": 5, "limit": 5}).json()[
        "top_examples"
    ]
    assert page1["total"] == page2["total"] == len(all_examples)
    got = [e["max_value"] for e in page1["items"] + page2["items"]]
    assert got == pytest.approx([e.max_act for e in all_examples[:10]])
    assert got == sorted(got, reverse=True)
    ex = page1["items"][0]
    assert ex["values"][ex["max_index"]] == pytest.approx(ex["max_value"])
    assert len(ex["tokens"]) == len(ex["values"])


def test_feature_without_analysis_has_computed_logit_effects(
    client: httpx.Client, state: Any
) -> None:
    from analysis.logit_effects import logit_effects

    f = client.get("/api/features/bare/7").json()
    assert f["stats"] is None and f["histogram"] is None and f["top_examples"]["total"] == 0
    sd = state.dictionaries["bare"]
    ref = logit_effects(state.model_for(sd), HOOK, sd.dictionary.W_dec, 10)
    assert [e["token_id"] for e in f["logit_effects"]["positive"]] == ref.promoted_ids[7].tolist()
    assert [e["value"] for e in f["logit_effects"]["negative"]] == pytest.approx(
        ref.suppressed[7].tolist(), rel=1e-5
    )


def test_feature_errors(client: httpx.Client) -> None:
    assert_error(client.get("/api/features/mlp0/128"), 404, "not_found")
    assert_error(client.get("/api/features/nope/1"), 404, "not_found")
    assert_error(client.get("/api/features/mlp0/-1"), 422, "validation_error")
    assert_error(client.get("/api/features/mlp0/abc"), 422, "validation_error")
    assert_error(client.get("/api/features/mlp0/99999999999999999999"), 422, "validation_error")
    assert_error(client.get("/api/features/mlp0/1", params={"limit": 21}), 422, "limit_exceeded")


def test_list_features(client: httpx.Client, state: Any) -> None:
    page = client.get("/api/features/mlp0", params={"limit": 7, "offset": 3}).json()
    assert [f["feature_id"] for f in page["items"]] == list(range(3, 10)) and page["total"] == 128
    by_max = client.get(
        "/api/features/mlp0", params={"order_by": "max_activation", "descending": True, "limit": 20}
    ).json()["items"]
    maxes = [f["max_activation"] for f in by_max]
    assert maxes == sorted(maxes, reverse=True) and maxes[0] > 0
    bare = client.get("/api/features/bare", params={"descending": True, "limit": 2}).json()
    assert [f["feature_id"] for f in bare["items"]] == [127, 126]
    assert_error(
        client.get("/api/features/bare", params={"order_by": "frequency"}), 409, "no_analysis"
    )
    assert_error(client.get("/api/features/mlp0", params={"order_by": "bogus"}), 422)


def test_batch(client: httpx.Client) -> None:
    r = client.post(
        "/api/features/batch",
        json={"features": ["bare/3", "mlp0/1", "bare/3"], "examples_limit": 2},
    )
    assert [f["address"] for f in r.json()["features"]] == ["bare/3", "mlp0/1", "bare/3"]
    assert all(len(f["top_examples"]["items"]) <= 2 for f in r.json()["features"])
    assert_error(client.post("/api/features/batch", json={"features": ["mlp0/999"]}), 404)
    assert_error(
        client.post("/api/features/batch", json={"features": ["mlp0"]}), 422, "validation_error"
    )
    assert_error(client.post("/api/features/batch", json={"features": []}), 422)
    many = {"features": [f"mlp0/{i}" for i in range(9)]}
    assert_error(client.post("/api/features/batch", json=many), 422, "limit_exceeded")


def test_labels_need_the_key_and_are_searchable(
    client: httpx.Client, auth: dict[str, str], state: Any
) -> None:
    url = "/api/features/mlp0/5/labels"
    body = {"text": "zebracorn imports", "author": "tester"}
    assert_error(client.post(url, json=body), 401, "unauthorized")
    assert_error(
        client.post(url, json=body, headers={"Authorization": "Bearer wrong-key-xxxx"}), 401
    )
    assert_error(client.post(url, json=body, headers={"X-API-Key": "nope"}), 401)
    r = client.post(url, json=body, headers={"X-API-Key": API_KEY})
    assert r.status_code == 201 and r.json()["text"] == "zebracorn imports"
    r = client.post(url, json={"text": "zebracorn, second"}, headers=auth)
    assert r.status_code == 201 and r.json()["author"] == "anonymous"
    f = client.get("/api/features/mlp0/5").json()
    assert f["label"] == "zebracorn, second"
    assert [lab["text"] for lab in f["labels"]][-2:] == ["zebracorn imports", "zebracorn, second"]
    assert state.dictionaries["mlp0"].store.labels(5)[-2].author == "tester"  # in the SQLite store
    found = client.get("/api/search", params={"dictionary": "mlp0", "q": "zebrac"}).json()
    assert [f["feature_id"] for f in found["items"]] == [5]
    assert_error(client.post(url, json={"text": ""}, headers=auth), 422)
    assert_error(client.post(url, json={"text": "x", "extra": 1}, headers=auth), 422)
    assert_error(client.post("/api/features/mlp0/500/labels", json=body, headers=auth), 404)
    # A dictionary with no store gets one (labels only) on its first label.
    r = client.post("/api/features/bare/2/labels", json={"text": "bare label"}, headers=auth)
    assert r.status_code == 201
    assert client.get("/api/features/bare/2").json()["label"] == "bare label"
    assert (
        client.get("/api/features/bare", params={"offset": 2, "limit": 1}).json()["items"][0][
            "label"
        ]
        == "bare label"
    )
    assert_error(
        client.get("/api/search", params={"dictionary": "bare", "q": "bare"}), 409, "no_analysis"
    )


def test_search_by_token_ranks_by_logit_effect(client: httpx.Client, state: Any) -> None:
    from analysis.logit_effects import logit_effects

    sd = state.dictionaries["bare"]
    model = state.model_for(sd)
    token = next(
        t
        for t in ("import", " return", "def", "x")
        if len(model.tokenizer(t, add_special_tokens=False)["input_ids"]) == 1
    )
    ids = model.tokenizer(token, add_special_tokens=False)["input_ids"]
    full = logit_effects(model, HOOK, sd.dictionary.W_dec, int(model.cfg.d_vocab))
    # Column of the full [F, vocab] effect matrix for this token, from the sorted top lists.
    col = torch.zeros(sd.d_sae)
    for f in range(sd.d_sae):
        col[f] = full.promoted[f][full.promoted_ids[f] == ids[0]][0]
    r = client.get(
        "/api/search", params={"dictionary": "bare", "q": token, "by": "token", "limit": 5}
    ).json()
    assert [f["feature_id"] for f in r["items"]] == col.argsort(descending=True)[:5].tolist()
    assert [f["score"] for f in r["items"]] == pytest.approx(
        col.sort(descending=True).values[:5].tolist(), rel=1e-4
    )
    r2 = client.get(
        "/api/search", params={"dictionary": "mlp0", "q": token, "by": "token", "limit": 3}
    )
    assert r2.status_code == 200 and r2.json()["items"][0]["max_activation"] is not None
    assert_error(
        client.get("/api/search", params={"dictionary": "bare", "q": "import os", "by": "token"}),
        422,
    )
    assert_error(client.get("/api/search", params={"dictionary": "nope", "q": "x"}), 404)
    assert_error(client.get("/api/search", params={"dictionary": "mlp0"}), 422)


def _reference_acts(state: Any, name: str, text: str) -> tuple[list[str], torch.Tensor]:
    """Independently: tokenize like analysis, run_with_cache, Dictionary.encode."""
    from sae.base import Dictionary

    sd = state.dictionaries[name]
    model = state.model_for(sd)
    ids = [
        model.tokenizer.bos_token_id,
        *model.tokenizer(text, add_special_tokens=False)["input_ids"],
    ]
    _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=HOOK)
    d = Dictionary.load(sd.path)
    with torch.no_grad():
        f = d.encode(cache[HOOK][0])
    return [model.tokenizer.decode([i]) for i in ids], f


def test_activations_parity_with_python_api(client: httpx.Client, state: Any) -> None:
    feats = ["mlp0/3", "bare/10", "mlp0/77"]
    r = client.post("/api/activations", json={"text": TEXT, "features": feats}).json()
    for trace in r["features"]:
        name, fid = trace["address"].split("/")
        tokens, f = _reference_acts(state, name, TEXT)
        assert r["tokens"] == tokens
        assert trace["values"] == pytest.approx(f[:, int(fid)].tolist(), abs=1e-6)
        assert trace["max_value"] == pytest.approx(float(f[:, int(fid)].max()), abs=1e-6)
    assert [t["address"] for t in r["features"]] == feats
    # Addresses come back canonical, however they were spelled.
    r = client.post("/api/activations", json={"text": "a", "features": ["mlp0/007"]}).json()
    assert r["features"][0]["address"] == "mlp0/7"


def test_top_features_parity(client: httpx.Client, state: Any) -> None:
    r = client.post(
        "/api/top-features", json={"text": TEXT, "dictionary": "mlp0", "k": 3, "limit": 10}
    ).json()
    _tokens, f = _reference_acts(state, "mlp0", TEXT)
    assert len(r["per_token"]) == f.shape[0]
    for t, row in enumerate(r["per_token"]):
        ref = f[t].topk(3)
        want = [(int(i), float(v)) for v, i in zip(ref.values, ref.indices, strict=True) if v > 0]
        assert [x["feature_id"] for x in row] == [i for i, _ in want]
        assert [x["value"] for x in row] == pytest.approx([v for _, v in want], abs=1e-6)
    fmax = f.max(0).values
    assert [o["feature_id"] for o in r["overall"]] == fmax.topk(10).indices.tolist()
    top = r["overall"][0]
    assert top["count"] == int((f[:, top["feature_id"]] > 0).sum())
    assert top["sum_value"] == pytest.approx(float(f[:, top["feature_id"]].sum()), abs=1e-5)
    assert_error(client.post("/api/top-features", json={"text": TEXT, "dictionary": "nope"}), 404)
    assert_error(
        client.post("/api/top-features", json={"text": TEXT, "dictionary": "mlp0", "limit": 21}),
        422,
        "limit_exceeded",
    )


def test_concurrent_requests_are_batched_and_agree(state: Any) -> None:
    """Requests that arrive while the worker is busy share one forward pass, and each gets
    exactly what it would get alone (right padding is exact for a causal model)."""
    import dataclasses

    from server.app import create_app
    from server.worker import ModelQueue
    from tests.server.conftest import running_server

    texts = [TEXT, "x = 1\n", "def f(a):\n    return a * 2\n", "import sys"]
    alone = {}
    queue = ModelQueue(16)
    batched_state = dataclasses.replace(state, queue=queue)
    release = threading.Event()
    try:
        with running_server(create_app(state=batched_state)) as url:
            with httpx.Client(base_url=url, timeout=60) as c:
                for t in texts:
                    alone[t] = c.post(
                        "/api/activations", json={"text": t, "features": ["mlp0/3", "bare/4"]}
                    ).json()
            assert queue.batches == len(texts) == queue.batched_jobs
            queue.submit(release.wait)

            def post(t: str) -> Any:
                with httpx.Client(base_url=url, timeout=60) as c:
                    return c.post(
                        "/api/activations", json={"text": t, "features": ["mlp0/3", "bare/4"]}
                    ).json()

            with ThreadPoolExecutor(len(texts)) as pool:
                futures = [pool.submit(post, t) for t in texts]
                for _ in range(500):  # every request waits at the worker
                    if queue.pending == len(texts):
                        break
                    threading.Event().wait(0.01)
                threading.Event().wait(0.2)
                release.set()
                results = [f.result() for f in futures]
            # Both dictionaries read the same hook: one activation job per request, and all
            # four jobs, queued behind the busy worker, ran as one forward pass.
            assert queue.batched_jobs == 2 * len(texts)
            assert queue.batches == len(texts) + 1
        for t, r in zip(texts, results, strict=True):
            assert r["tokens"] == alone[t]["tokens"]
            for got, want in zip(r["features"], alone[t]["features"], strict=True):
                assert got["values"] == pytest.approx(want["values"], abs=1e-5)
    finally:
        release.set()
        queue.close()


def test_concurrent_reads_and_text_agree(client: httpx.Client, base_url: str) -> None:
    body = {"text": TEXT, "features": ["mlp0/3", "bare/4"]}
    want = client.post("/api/activations", json=body).json()

    def one(i: int) -> Any:
        with httpx.Client(base_url=base_url, timeout=60) as c:
            if i % 2:
                return c.get("/api/features/mlp0/3").status_code
            return c.post("/api/activations", json=body).json()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(16)))
    assert all(r == 200 for r in results[1::2])
    assert all(r == want for r in results[0::2])


def test_openapi_and_browser_page(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    paths = set(spec["paths"])
    assert {
        "/healthz",
        "/readyz",
        "/api/dictionaries",
        "/api/dictionaries/{dictionary}",
        "/api/features/{dictionary}",
        "/api/features/{dictionary}/{feature_id}",
        "/api/features/batch",
        "/api/features/{dictionary}/{feature_id}/labels",
        "/api/search",
        "/api/activations",
        "/api/top-features",
        "/api/steer",
    } == paths
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert_error(client.get("/static/nope.js"), 404)


def test_app_loads_its_state_in_the_lifespan(dict_dirs: Any) -> None:
    """create_app(settings): models, dictionaries and stores load at start-up, close at exit."""
    from server.app import create_app
    from tests.server.conftest import make_settings, running_server

    app = create_app(make_settings(dict_dirs, dictionaries=[f"only={dict_dirs['mlp0']}"]))
    with running_server(app) as url, httpx.Client(base_url=url) as c:
        assert c.get("/readyz").json()["dictionaries"] == 1
        assert c.get("/api/features/only/1").json()["stats"] is not None
    assert app.state.sae is None
