"""Odd input never gets a 5xx: search text that is FTS5 syntax or holds NUL, totals past the
end, digits of other scripts in feature ids, lone surrogates in JSON; and the dictionary
specs `sae serve` takes (a sweep member's folder `name=MEMBER` by its bare path)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.settings import settings_from_env, spec_name, spec_path
from tests.server.helpers import assert_error

ODD_QUERIES = [
    "\x00",
    "zebu\x00",
    "a\x00b",
    '"',
    '"zebu',
    'zebu"',
    "'",
    "NOT",
    "zebu AND",
    "OR zebu",
    "NEAR(zebu quagga)",
    "zebu*",
    "*",
    "^zebu",
    "labels:zebu",
    "(",
    ")",
    "-zebu",
    "+",
    "\t\n\r\x0b",
    "\x1b[31m",
    "\ufffd",
    "😀 zebu",
]


def test_search_text_is_never_syntax(client: httpx.Client, auth: dict[str, str]) -> None:
    r = client.post("/api/features/mlp0/7/labels", json={"text": "zebu (quagga)"}, headers=auth)
    assert r.status_code == 201
    for q in ODD_QUERIES:
        r = client.get("/api/search", params={"dictionary": "mlp0", "q": q})
        assert r.status_code == 200, (q, r.text)
        page = r.json()
        assert page["total"] == len(page["items"]), q
    found = client.get("/api/search", params={"dictionary": "mlp0", "q": "zebu\x00"}).json()
    assert [f["feature_id"] for f in found["items"]] == [7]  # NUL dropped, the word searched
    found = client.get("/api/search", params={"dictionary": "mlp0", "q": "(quagga)"}).json()
    assert [f["feature_id"] for f in found["items"]] == [7]


def test_search_total_is_the_number_found(client: httpx.Client, state: Any) -> None:
    store = state.dictionaries["mlp0"].store
    word = store.feature(store.features(0, 1, "max_act", True)[0].feature_id).top_tokens[0]
    q = word.strip() or "x"
    everything = store.search(q, limit=1000)
    assert everything
    for offset, limit in ((0, 1), (0, 20), (len(everything), 5), (10**6, 5)):
        page = client.get(
            "/api/search", params={"dictionary": "mlp0", "q": q, "offset": offset, "limit": limit}
        ).json()
        assert page["total"] == len(everything), (offset, limit)
        assert len(page["items"]) == min(limit, max(0, len(everything) - offset))


def test_feature_ids_are_ascii_digits(client: httpx.Client) -> None:
    assert client.get("/api/features/mlp0/12").status_code == 200
    for fid in ("١٢", "１２", "12\u0662"):
        assert_error(client.get(f"/api/features/mlp0/{fid}"), 422, "validation_error")
        assert_error(
            client.get("/api/features/mlp0", params={"offset": fid}), 422, "validation_error"
        )
        body = {"features": [f"mlp0/{fid}"]}
        assert_error(client.post("/api/features/batch", json=body), 422, "validation_error")
        body = {"text": "a", "features": [f"mlp0/{fid}"]}
        assert_error(client.post("/api/activations", json=body), 422, "validation_error")


def test_lone_surrogates_are_refused(client: httpx.Client, auth: dict[str, str]) -> None:
    headers = {**auth, "Content-Type": "application/json"}
    for url, body in (
        ("/api/features/mlp0/3/labels", '{"text": "a\\ud800b"}'),
        ("/api/features/mlp0/3/labels", '{"text": "ok", "author": "\\udfff"}'),
        ("/api/activations", '{"text": "\\ud83d", "features": ["mlp0/1"]}'),
        ("/api/top-features", '{"text": "x\\ud83d", "dictionary": "mlp0"}'),
    ):
        err = assert_error(client.post(url, content=body, headers=headers), 422)
        assert err["detail"][0]["loc"][0] == "body", err
    # A paired surrogate escape is one real character and is fine.
    r = client.post("/api/features/mlp0/3/labels", json={"text": "\U0001f600"}, headers=auth)
    assert r.status_code == 201


def test_dictionary_specs(tmp_path: Path) -> None:
    member = tmp_path / "train" / "name=relu_l1"
    member.mkdir(parents=True)
    assert spec_name(str(member)) == "relu_l1" and spec_path(str(member)) == str(member)
    assert spec_name(str(member) + "/") == "relu_l1"
    other = tmp_path / "l1_coefficient=0.01-k=32"
    other.mkdir()
    assert spec_name(str(other)) == "l1_coefficient=0.01-k=32"
    # Not an existing path: NAME=PATH, as before.
    assert spec_name("feats=/no/such/dir") == "feats"
    assert spec_path("feats=/no/such/dir") == "/no/such/dir"
    assert spec_name(f"mine={member}") == "mine" and spec_path(f"mine={member}") == str(member)
    assert settings_from_env({}, dictionaries=[str(member)]).dictionaries == [str(member)]
    # A run's own folder `RUN/dictionary` (sae train without a sweep) is served as RUN.
    run_dict = tmp_path / "train" / "topk_auxk" / "dictionary"
    run_dict.mkdir(parents=True)
    assert spec_name(str(run_dict)) == "topk_auxk" and spec_name("dictionary") == "dictionary"


@pytest.mark.slow
def test_serve_a_sweep_member_by_its_bare_path(dict_dirs: dict[str, Path], tmp_path: Path) -> None:
    from server.app import create_app
    from tests.server.conftest import make_settings, running_server

    member = tmp_path / "train" / "name=relu_l1"
    shutil.copytree(dict_dirs["mlp0"], member)
    app = create_app(make_settings(dict_dirs, dictionaries=[str(member)]))
    with running_server(app) as url, httpx.Client(base_url=url) as c:
        names = [d["name"] for d in c.get("/api/dictionaries").json()["dictionaries"]]
        assert names == ["relu_l1"]
        assert c.get("/api/features/relu_l1/1").json()["stats"] is not None
