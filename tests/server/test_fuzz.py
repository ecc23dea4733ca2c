"""Property-based fuzzing from the OpenAPI schema (schemathesis) against the real server:
valid and invalid requests to every operation, with the key, never get a 5xx, every error
has the one error body shape, and a request the schema calls valid is never refused for a
limit the schema does not state. Search text is also fuzzed with what FTS5 would read as
syntax (NUL, quotes, operators), and a stateful run interleaves label writes, searches and
reads, checking that each read sees the writes before it. Bounded and deterministic.

Random dictionary names would almost always stop at a 404, so most generated cases have
their dictionary names and feature addresses pointed at the served dictionaries, to reach
the model, the store and steering with fuzzed text and numbers. (Hypothesis is driven per
operation rather than through schemathesis's pytest plugin, whose fixture loader does not
run under pytest 9.)"""

from __future__ import annotations

import random
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test
from schemathesis.generation import GenerationMode

from tests.server.conftest import API_KEY

EXAMPLES = 10
"""Examples per operation and generation mode (12 operations x 2 modes)."""
NAMES = ("mlp0", "bare")


def aim(case: Any, rnd: random.Random) -> None:
    """Point most cases at served dictionaries and (mostly existing) features, in place."""
    if rnd.random() < 0.25:
        return

    def address() -> str:
        return f"{rnd.choice(NAMES)}/{rnd.randrange(130)}"  # 128 and 129 do not exist

    path = case.path_parameters or {}
    if "dictionary" in path:
        path["dictionary"] = rnd.choice(NAMES)
    if isinstance(path.get("feature_id"), int):
        path["feature_id"] %= 130
    if isinstance(case.query, dict) and "dictionary" in case.query:
        case.query["dictionary"] = rnd.choice(NAMES)
    body = case.body
    if isinstance(body, dict):
        if "dictionary" in body:
            body["dictionary"] = rnd.choice(NAMES)
        if isinstance(body.get("features"), list):
            body["features"] = [address() for _ in body["features"]]
        for iv in body.get("interventions") or []:
            if isinstance(iv, dict) and "feature" in iv:
                iv["feature"] = address()


@pytest.mark.slow
def test_no_request_gets_a_5xx(base_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 12
    statuses: Counter[int] = Counter()
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                derandomize=True,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=op.as_strategy(generation_mode=mode), rnd=st.randoms(use_true_random=False))
            def run(case: Any, rnd: random.Random) -> None:
                aim(case, rnd)
                r = case.call(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
                statuses[r.status_code] += 1
                assert r.status_code < 500, (r.status_code, r.text[:300], case.as_curl_command())
                if r.status_code >= 400:
                    body = r.json()
                    assert set(body) == {"error"}, body
                    assert set(body["error"]) == {"code", "message", "detail"}, body
                    # Valid by the schema: only the prompt's token count (which the schema
                    # can only describe) may be over a limit.
                    if (
                        mode is GenerationMode.POSITIVE  # noqa: B023 (run() runs in this iteration)
                        and body["error"]["code"] == "limit_exceeded"
                    ):
                        assert " tokens; the limit is " in body["error"]["message"], body

            try:
                run()
            except Unsatisfiable:
                # No invalid request exists for an operation without inputs (/healthz).
                assert mode is GenerationMode.NEGATIVE
    # The fuzz really ran, and reached handlers (2xx) as well as validation (4xx).
    assert sum(statuses.values()) >= 12 * EXAMPLES
    assert sum(n for s, n in statuses.items() if s < 300) >= 20, statuses
    print("fuzz statuses:", dict(sorted(statuses.items())))


FTS_WORDS = st.sampled_from(
    ["AND", "OR", "NOT", "NEAR", "NEAR(", "*", "^", ":", "(", ")", '"', "'", "-", "+", "\x00"]
)
SEARCH_TEXT = st.lists(
    st.one_of(FTS_WORDS, st.text(min_size=1, max_size=6), st.sampled_from(["zebu", "def", " "])),
    min_size=1,
    max_size=6,
).map("".join)


@pytest.mark.slow
def test_search_text_is_never_syntax(base_url: str) -> None:
    with httpx.Client(base_url=base_url, timeout=60) as c:

        @settings(max_examples=150, deadline=None, derandomize=True, database=None)
        @given(
            q=SEARCH_TEXT,
            by=st.sampled_from(["text", "token"]),
            dictionary=st.sampled_from(NAMES),
            offset=st.integers(0, 200),
            limit=st.integers(0, 20),
        )
        def run(q: str, by: str, dictionary: str, offset: int, limit: int) -> None:
            params = {"dictionary": dictionary, "q": q, "by": by, "offset": offset, "limit": limit}
            r = c.get("/api/search", params=params)
            assert r.status_code < 500, (params, r.text)
            if r.status_code == 200:
                page = r.json()
                assert len(page["items"]) <= limit
                assert len(page["items"]) == max(0, min(limit, page["total"] - offset)), params

        run()


class LabelsAndSearch(RuleBasedStateMachine):
    """Labels written with odd text are read back and found by search, in any order of
    writes, reads and searches; nothing gets a 5xx."""

    client: httpx.Client
    labels: dict[int, str]
    """The latest label of each feature, kept across examples (the store keeps them too)."""

    @rule(fid=st.integers(0, 127), text=SEARCH_TEXT, word=st.sampled_from(["okapi", "tapir"]))
    def write_label(self, fid: int, text: str, word: str) -> None:
        label = f"{word}{fid}x {text}"
        r = self.client.post(
            f"/api/features/fuzzed/{fid}/labels",
            json={"text": label},
            headers={"X-API-Key": API_KEY},
        )
        assert r.status_code in (201, 400), r.text  # 400: nothing left once stripped
        if r.status_code == 201:
            self.labels[fid] = r.json()["text"]

    @rule(fid=st.integers(0, 127))
    def read(self, fid: int) -> None:
        r = self.client.get(f"/api/features/fuzzed/{fid}")
        assert r.status_code == 200, r.text
        assert r.json()["label"] == self.labels.get(fid)

    @rule(i=st.integers(0, 10**6))
    def search_a_written_label(self, i: int) -> None:
        # An index, not sampled_from(labels): what is drawn must not depend on the store.
        mine = sorted(f for f, text in self.labels.items() if text.startswith(("okapi", "tapir")))
        if not mine:  # only labels written here: others (an emoji, say) may hold no word
            return
        fid = mine[i % len(mine)]
        word = self.labels[fid].split()[0]  # okapiNx: unique to the feature
        page = self.client.get("/api/search", params={"dictionary": "fuzzed", "q": word}).json()
        assert fid in [f["feature_id"] for f in page["items"]], (word, page)

    @rule(q=SEARCH_TEXT, offset=st.integers(0, 300))
    def search_anything(self, q: str, offset: int) -> None:
        r = self.client.get(
            "/api/search", params={"dictionary": "fuzzed", "q": q, "offset": offset}
        )
        assert r.status_code == 200, r.text
        page = r.json()
        assert page["total"] >= len(page["items"]) and (
            page["items"] == [] or offset < page["total"]
        )


@pytest.mark.slow
def test_stateful_labels_and_search(dict_dirs: dict[str, Path], tmp_path: Path) -> None:
    from server.app import create_app
    from server.deps import load_state
    from tests.server.conftest import make_settings, running_server

    path = tmp_path / "fuzzed"
    shutil.copytree(dict_dirs["mlp0"], path)
    state = load_state(make_settings(dict_dirs, dictionaries=[str(path)]))
    store = state.dictionaries["fuzzed"].store
    LabelsAndSearch.labels = {f: ls[-1].text for f in range(128) if (ls := store.labels(f))}
    try:
        with running_server(create_app(state=state)) as url, httpx.Client(base_url=url) as c:
            LabelsAndSearch.client = c
            run_state_machine_as_test(
                LabelsAndSearch,
                settings=settings(
                    max_examples=12,
                    stateful_step_count=15,
                    deadline=None,
                    derandomize=True,
                    database=None,
                ),
            )
    finally:
        state.close()
