"""`sae demo`: the main job end to end, reduced, on the bundled model and corpus.

`sae demo` runs as a user runs it (a separate process): cache -> train (relu + resampling and
topk side by side) -> analyze both -> compare -> report -> serve; then one HTTP request reads a
feature page from the live server. Marked slow; CI runs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.live_server import free_port, wait_until_ready


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "demo"
    cmd = [
        sys.executable, "-m", "sae.cli", "demo", "--out", str(out),
        "--tokens", "24000", "--relu-tokens", "24000", "--topk-tokens", "30000",
        "--kl-finetune-tokens", "4000", "--d-sae", "1024",
        "--batch-size", "1024", "--analysis-tokens", "4000", "--eval-tokens", "2400",
        "--port", str(port),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    env = {k: v for k, v in env.items() if not k.startswith("SAE_SERVE_")}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        while "#key=" not in (line := proc.stdout.readline()):
            assert line, "demo exited before serving:\n" + "".join(lines[-60:])
            lines.append(line)
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(proc, url, timeout=120, interval=0.5, output=lambda: "".join(lines[-40:]))
        names = [d["name"] for d in httpx.get(f"{url}/api/dictionaries").json()["dictionaries"]]
        assert len(names) == 2
        page = httpx.get(f"{url}/api/features/{names[0]}", params={"limit": 5}).json()
        fid = page["items"][0]["feature_id"]
        feature = httpx.get(f"{url}/api/features/{names[0]}/{fid}", params={"limit": 3})
        assert feature.status_code == 200, feature.text
        body = feature.json()
        assert body["top_examples"], body  # analysis reached the served store
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    text = "".join(lines) + rest
    assert "demo report" in text
    report = json.loads((out / "report.json").read_text())
    for member in ("relu_l1", "topk_auxk"):
        d = report["dictionaries"][member]
        assert d["eval"]["l0"] > 0 and d["eval"]["eval_tokens"] >= 2400
        assert {"explained_variance", "dead_fraction", "loss_recovered"} <= set(d["eval"])
        assert "split validation" in d["eval_source"]  # files the training split does not hold
        assert d["features"], member  # plain-text feature cards made it into the report
    assert report["dictionaries"]["topk_auxk"]["eval"]["l0"] == pytest.approx(32, abs=1e-6)
    # Every step left its artefact: a second run resumes with nothing to do.
    assert (out / "cache" / "blocks.0.mlp.hook_post" / "manifest.json").is_file()
    for member in ("relu_l1", "topk_auxk"):
        reported = report["dictionaries"][member]["eval"]
        again = recompute(out / "validation" / HOOK, Path(report["dictionaries"][member]["path"]),
                          int(reported["eval_tokens"]))  # fmt: skip
        assert again["dead_fraction"] == pytest.approx(reported["dead_fraction"], abs=1e-9)
        assert again["l0"] == pytest.approx(reported["l0"], rel=1e-4)
        assert again["loss_recovered"] == pytest.approx(reported["loss_recovered"], abs=2e-3)


HOOK = "blocks.0.mlp.hook_post"


def recompute(hook_dir: Path, dictionary: Path, n_rows: int) -> dict[str, float]:
    """The report's held-out figures from the saved files alone: the validation cache's first
    `n_rows` rows (read with safetensors, not our reader), the dictionary through `Dictionary.load`,
    the model through `load_model` and TransformerLens's own hooks (not ours)."""
    import torch
    from safetensors.torch import load_file

    from activations.model import load_model
    from sae import Dictionary

    manifest = json.loads((hook_dir / "manifest.json").read_text())
    shards = [load_file(hook_dir / s["file"]) for s in manifest["shards"]]
    cols = {k: torch.cat([s[k] for s in shards])[:n_rows]
            for k in ("activations", "token_ids", "sequence", "position")}  # fmt: skip
    d = Dictionary.load(dictionary)
    model = load_model("stdlib-1l-512")
    with torch.no_grad():
        codes = d.encode(cols["activations"].float())
    dead = float(((codes > 0).sum(0) == 0).float().mean())
    l0 = float((codes > 0).sum(-1).float().mean())

    # Whole contexts: BOS (the row the cache drops) at position 0, then the cached tokens.
    seqs, ctx = torch.unique_consecutive(cols["sequence"], return_inverse=True)
    tokens = torch.full((len(seqs), int(manifest["context_size"])), model.tokenizer.bos_token_id)
    tokens[ctx, cols["position"].long()] = cols["token_ids"].long()
    keep = torch.zeros(tokens.shape, dtype=torch.bool)
    keep[ctx, cols["position"].long()] = True

    def loss(edit):
        def hook(act, hook):
            return torch.where(keep[..., None], edit(act), act)

        with torch.no_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, hook)] if edit else [])
        logp = logits[:, :-1].log_softmax(-1)
        return float(-logp.gather(-1, tokens[:, 1:, None]).mean())

    with torch.no_grad():
        clean = loss(None)
        zero = loss(torch.zeros_like)
        spliced = loss(lambda a: d(a.reshape(-1, a.shape[-1])).x_hat.reshape(a.shape))
    return {"dead_fraction": dead, "l0": l0, "loss_recovered": (zero - spliced) / (zero - clean)}
