"""Server fixtures: two dictionaries on the tiny test model (one analysed into a feature
store, one bare), their loaded state, and real uvicorn servers on 127.0.0.1 free ports."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.conftest import TINY_TEXT, make_tiny_lm_dir

API_KEY = "test-key-0123456789"
HOOK = "blocks.0.mlp.hook_post"


def random_relu(model_dir: Path, seed: int, d_sae: int = 128) -> Any:
    """A relu dictionary with random weights that fires sparsely on the tiny model's MLP."""
    from sae.base import DictionaryConfig, build

    cfg = DictionaryConfig(
        architecture="relu", d_in=64, d_sae=d_sae, hook_name=HOOK, model_name=str(model_dir)
    )
    d = build(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        d.W_enc.copy_(torch.randn(64, d_sae, generator=g) / 4)
        d.W_dec.copy_(torch.randn(d_sae, 64, generator=g) / 8)
        d.b_enc.fill_(-0.02)
    return d


@pytest.fixture(scope="session")
def served_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny test GPT-2 with an untied unembedding at a trained model's scale (std 1).

    At GPT-2's init scale (std 0.02) every logit is within ~0.6 of every other, the next-token
    distribution is nearly uniform whatever the residual, and no intervention could move
    probability measurably; a trained model's unembedding makes steering observable.
    """
    from transformers import GPT2LMHeadModel

    path = make_tiny_lm_dir(tmp_path_factory.mktemp("served_lm"))
    hf = GPT2LMHeadModel.from_pretrained(path)
    hf.config.tie_word_embeddings = False
    hf.lm_head.weight = torch.nn.Parameter(hf.transformer.wte.weight.detach().clone() * 50)
    hf.save_pretrained(path)
    return path


HELD_OUT = {
    "eval_tokens": 5000.0,
    "explained_variance": 0.8125,
    "fvu": 0.1875,
    "l0": 12.5,
    "dead_fraction": 0.0078125,
    "dense_fraction": 0.0,
    "loss_recovered": 0.9375,
    "kl_div": 0.0625,
}
HELD_OUT_SOURCE = "the first 5,000 rows of the evaluation cache val (split validation of bundled)"


@pytest.fixture(scope="session")
def dict_dirs(served_lm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`mlp0`: analysed (feature store next to it); `bare`: no analysis."""
    from activations.model import load_model
    from activations.text import TextConfig
    from analysis.accumulator import AnalysisConfig
    from analysis.analyze import analyze
    from analysis.store import FeatureStore

    root = tmp_path_factory.mktemp("dicts")
    docs = root / "docs"
    docs.mkdir()
    for i, t in enumerate(TINY_TEXT * 3):
        (docs / f"doc{i}.py").write_text(t)
    out = {}
    for name, seed in (("mlp0", 0), ("bare", 1)):
        d = random_relu(served_lm_dir, seed)
        if name == "mlp0":  # held-out figures as `sae train` saves them
            d.cfg.provenance = {"eval": HELD_OUT, "eval_source": HELD_OUT_SOURCE}
        d.save(root / name)
        out[name] = root / name
    model = load_model(str(served_lm_dir))
    d = random_relu(served_lm_dir, 0)
    arrays = analyze(
        model,
        d,
        TextConfig(dataset=str(docs), context_size=32, batch_size=8),
        AnalysisConfig(n_tokens=1024, n_top=12, context_before=6, context_after=2),
        dictionary_name="mlp0",
        model_name=str(served_lm_dir),
        progress=False,
    )
    with FeatureStore.open(out["mlp0"]) as store:
        store.replace_statistics(arrays)
    return out


def make_settings(dict_dirs: dict[str, Path], **over: Any) -> Any:
    from server.settings import ServerSettings

    values: dict[str, Any] = dict(
        dictionaries=[str(dict_dirs["mlp0"]), str(dict_dirs["bare"])],
        api_key=API_KEY,
        max_prompt_tokens=48,
        max_new_tokens=16,
        max_batch=8,
        max_page=20,
        max_body_bytes=16384,
        worker_process=False,  # the model on a thread here; test_model_process.py runs both
    )
    values.update(over)
    return ServerSettings(**values)


@pytest.fixture(scope="session")
def state(dict_dirs: dict[str, Path]) -> Any:
    from server.deps import load_state

    return load_state(make_settings(dict_dirs))


@contextlib.contextmanager
def running_server(app: Any) -> Iterator[str]:
    """A real uvicorn server for `app` on a free 127.0.0.1 port, in a thread; yields its URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def serve_state(state: Any, **settings_over: Any) -> contextlib.AbstractContextManager[str]:
    """A server over the already loaded `state`, with some settings changed."""
    from server.app import create_app
    from server.deps import RateLimiter
    from server.worker import ModelQueue

    settings = dataclasses.replace(state.settings, **settings_over)
    queue = ModelQueue(settings.max_queue)
    limiter = RateLimiter(settings.rate_limit) if settings.rate_limit else None
    new_state = dataclasses.replace(state, settings=settings, queue=queue, limiter=limiter)
    return running_server(create_app(state=new_state))


@pytest.fixture(scope="session")
def base_url(state: Any) -> Iterator[str]:
    from server.app import create_app

    with running_server(create_app(state=state)) as url:
        yield url


@pytest.fixture()
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


@pytest.fixture()
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}
