"""The web feature browser in real headless Chromium (Debian's package) driven by Playwright,
against the real server: browse, a feature page with highlighted examples, labels, search,
text activations, steering, and errors shown to the user.

Set SAE_FEATURE_PAGE_SCREENSHOT=docs/feature_page.png to keep the feature-page screenshot."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sae.evaluation import summary_line
from tests.server.conftest import API_KEY, HELD_OUT, HELD_OUT_SOURCE

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (make setup installs it)"
)
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser: Any, base_url: str) -> Iterator[Any]:
    context = browser.new_context(base_url=base_url, viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.set_default_timeout(20_000)
    yield pg
    context.close()
    # Failed requests the test provokes on purpose log a console error; nothing else may.
    assert [e for e in errors if "401" not in e] == []


def go(page: Any, hash_: str) -> None:
    page.evaluate("h => { document.body.dataset.ready = ''; location.hash = h; }", hash_)
    page.wait_for_selector("body[data-ready='1']")


def test_browse_and_feature_page(page: Any, state: Any, tmp_path: Path) -> None:
    page.goto("/")
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#dict-select option").count() == 2
    assert page.locator("table.feature-list tbody tr").count() == 20  # the server's max_page
    shown = page.locator("p.evaluation").inner_text()
    assert shown == f"{summary_line(HELD_OUT)} (on {HELD_OUT_SOURCE})"
    store = state.dictionaries["mlp0"].store
    top = store.features(0, 1, order_by="max_act", descending=True)[0]
    page.select_option("#order-by", "max_activation")
    # The re-ordered list puts the strongest feature first.
    page.wait_for_function(
        "a => document.querySelector('table.feature-list tbody tr a')?.textContent === a",
        arg=f"mlp0/{top.feature_id}",
    )
    page.locator("table.feature-list tbody tr a").first.click()
    page.wait_for_selector("section.feature")
    assert page.locator(".addr").inner_text() == f"mlp0/{top.feature_id}"
    examples = page.locator(".examples .example")
    n_stored = len(store.top_examples(top.feature_id, 0, 100))
    assert examples.count() == min(10, n_stored)
    # The strongest token of the first example is highlighted most and carries its value.
    first = store.top_examples(top.feature_id, 0, 1)[0]
    tok = examples.nth(0).locator(".tok").nth(first.max_index)
    assert float(tok.get_attribute("data-value")) == pytest.approx(first.max_act, rel=1e-5)
    background = "e => getComputedStyle(e).backgroundColor"
    assert tok.evaluate(background) == "rgb(255, 120, 0)"  # full strength at the max
    values = [
        float(v)
        for v in examples.nth(0).locator(".tok").evaluate_all("ts => ts.map(t => t.dataset.value)")
    ]
    if min(values) <= 0:  # a silent token is not highlighted at all
        silent = examples.nth(0).locator(".tok").nth(values.index(min(values)))
        assert silent.evaluate(background) == "rgba(0, 0, 0, 0)"
    assert page.locator(".hist .bar").count() == len(store.feature(top.feature_id).histogram.counts)
    assert page.locator(".logits .pos li").count() > 0
    if n_stored > 10:
        page.locator(".more-examples").click()
        page.wait_for_function("() => document.querySelectorAll('.examples .example').length > 10")
    shot = tmp_path / "feature_page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("SAE_FEATURE_PAGE_SCREENSHOT")
    if keep:
        Path(keep).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, keep)

    # Try text on this feature: the activations come back per token.
    page.fill(".try-form textarea", "import os\nprint(os.getcwd())\n")
    page.click(".try-form button")
    page.wait_for_selector(".try-out .tok")
    assert page.locator(".try-out .tok").first.inner_text() == "<|endoftext|>"


def test_labels_and_search(page: Any) -> None:
    page.goto("/#/f/mlp0/9")
    page.wait_for_selector("section.feature")
    # Without a key the write is refused and the user is told why.
    page.fill(".label-form input[name=text]", "quokka feature")
    page.click(".label-form button")
    page.wait_for_selector("#status.error")
    assert "401" in page.inner_text("#status")
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    page.click(".label-form button")
    page.wait_for_function(
        "() => document.querySelector('.label-text').textContent === 'quokka feature'"
    )
    assert "quokka feature" in page.inner_text(".labels")
    page.fill("#search-q", "quokka")
    page.click("#search-form button")
    page.wait_for_selector("table.feature-list tbody tr")
    rows = page.locator("table.feature-list tbody tr")
    assert rows.count() == 1 and "mlp0/9" in rows.first.inner_text()


def test_text_and_steering(page: Any) -> None:
    # The URL `sae serve` prints carries the key in its fragment; the page keeps it.
    page.goto(f"/#key={API_KEY}")
    page.wait_for_selector("body[data-ready='1']")
    assert page.input_value("#api-key") == API_KEY
    assert page.evaluate("location.hash") == "#/"
    go(page, "#/text")
    page.fill("#text-input", "def add(a, b):\n    return a + b\n")
    page.click("#text-form button")
    page.wait_for_selector("#text-out .overall li")
    page.locator("#text-out .tok").nth(2).click()
    page.wait_for_selector(".per-token li")
    href = page.locator("#text-out .overall li a").first.get_attribute("href")
    assert href.startswith("#/f/mlp0/")

    go(page, "#/steer/mlp0/3")
    page.fill("#steer-form input[name=strength]", "0")
    page.fill("#steer-form input[name=max_new_tokens]", "6")
    page.click("#steer-form button")
    page.wait_for_selector("#steer-out pre.steered")
    assert page.inner_text("pre.steered") == page.inner_text("pre.baseline")
    assert "analysis_max_activation" in page.inner_text("#steer-out")


def test_the_page_runs_under_its_content_security_policy(browser: Any, base_url: str) -> None:
    """The policy is in force (an injected inline script does not run) and the page needs no
    exception to it: the `page` fixture's other tests fail on any console error, which is
    where a refused script, style or request would show."""
    context = browser.new_context(base_url=base_url)
    pg = context.new_page()
    violations: list[str] = []
    pg.on("console", lambda m: violations.append(m.text) if m.type == "error" else None)
    response = pg.goto("/")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    pg.wait_for_selector("body[data-ready='1']")
    assert pg.locator("table.feature-list tbody tr").count() > 0
    assert violations == []
    ran = pg.evaluate(
        """() => { const s = document.createElement('script');
                   s.textContent = 'window.injected = 1'; document.body.append(s);
                   return window.injected === 1; }"""
    )
    assert ran is False
    for _ in range(50):  # the console message arrives on its own time
        if violations:
            break
        pg.wait_for_timeout(100)
    assert any("Content Security Policy" in v for v in violations), violations
    context.close()


@pytest.fixture(scope="module")
def sparse_url(served_lm_dir: Path, dict_dirs: dict[str, Path]) -> Iterator[str]:
    """A server of one analysed dictionary whose first 64 features never fire."""
    import torch

    from activations.model import load_model
    from activations.text import TextConfig
    from analysis.accumulator import AnalysisConfig
    from analysis.analyze import analyze
    from analysis.store import FeatureStore
    from server.app import create_app
    from server.deps import load_state
    from tests.server.conftest import make_settings, random_relu, running_server

    d = random_relu(served_lm_dir, seed=2)
    with torch.no_grad():
        d.b_enc[:64] = -1e4
    path = dict_dirs["mlp0"].parent / "sparse"
    d.save(path)
    arrays = analyze(
        load_model(str(served_lm_dir)),
        d,
        TextConfig(dataset=str(dict_dirs["mlp0"].parent / "docs"), context_size=32, batch_size=8),
        AnalysisConfig(n_tokens=512, n_top=4, context_before=4, context_after=1),
        dictionary_name="sparse",
        model_name=str(served_lm_dir),
        progress=False,
    )
    assert (arrays.n_fires[:64] == 0).all() and (arrays.n_fires[64:] > 0).any()
    with FeatureStore.open(path) as store:
        store.replace_statistics(arrays)
    state = load_state(make_settings(dict_dirs, dictionaries=[str(path)]))
    try:
        with running_server(create_app(state=state)) as url:
            yield url
    finally:
        state.close()


def test_the_list_opens_on_live_features(browser: Any, sparse_url: str) -> None:
    context = browser.new_context(base_url=sparse_url)
    page = context.new_page()
    page.goto("/")
    page.wait_for_selector("body[data-ready='1']")
    rows = page.locator("table.feature-list tbody tr")
    assert page.input_value("#order-by") == "frequency"
    first = rows.first.locator("td")
    feature_id = int(first.nth(0).inner_text().split("/")[1])
    assert feature_id >= 64  # a live feature, not feature 0
    assert "never fired" not in rows.first.inner_text()
    assert float(first.nth(3).inner_text()) > 0
    width = rows.first.locator(".density .fill").evaluate("e => e.getBoundingClientRect().width")
    assert width > 0
    # Densest first: the frequencies on the page never increase.
    freqs = [float(t) for t in rows.locator("td:nth-child(4)").all_inner_texts()]
    assert freqs == sorted(freqs, reverse=True)
    # In id order the dead features say so, instead of zeros, and have no bar.
    go(page, "#/d/sparse/0/feature_id")
    assert rows.count() == 20
    for i in range(rows.count()):
        row = rows.nth(i)
        assert row.get_attribute("class") == "dead"
        cells = row.locator("td").all_inner_texts()
        assert cells[2] == "never fired" and cells[3] == "never fired", cells
        assert row.locator(".density .fill").count() == 0
    go(page, "#/f/sparse/3")
    assert page.inner_text(".stats") == "activity\nnever fired in the analysis"
    context.close()
