"""Our file format: exact round trips, atomic writes, dtype handling, path vs hub id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae import Dictionary, DictionaryFormatError, UserError
from sae.io import FORMAT_VERSION, load_dictionary, resolve_path, save_dictionary
from tests.sae.util import ARCHS, random_dictionary


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_is_exact(arch: str, tmp_path: Path) -> None:
    d = random_dictionary(arch, hook_name="blocks.0.mlp.hook_post", model_name="tiny")
    d.cfg.provenance = {"tokens_seen": 1234}
    d.save(tmp_path / "dict")
    e = Dictionary.load(tmp_path / "dict")
    ref = d.to_inference() if arch == "batchtopk" else d  # type: ignore[operator]
    assert type(e) is type(ref) and e.cfg == ref.cfg
    for name, t in ref.state_dict().items():
        assert torch.equal(e.state_dict()[name], t), name
    x = torch.randn(4, 6)
    assert torch.equal(e(x).x_hat, ref(x).x_hat)
    cfg = json.loads((tmp_path / "dict" / "cfg.json").read_text())
    assert cfg["format_version"] == FORMAT_VERSION
    assert cfg["hook_name"] == "blocks.0.mlp.hook_post" and cfg["provenance"]["tokens_seen"] == 1234


def test_batchtopk_saved_as_jumprelu_unless_asked(tmp_path: Path) -> None:
    d = random_dictionary("batchtopk")
    save_dictionary(d, tmp_path / "inf")
    assert json.loads((tmp_path / "inf" / "cfg.json").read_text())["architecture"] == "jumprelu"
    thr = load_file(tmp_path / "inf" / "sae.safetensors")["threshold"]
    assert thr.shape == (10,) and torch.all(thr == d.threshold)
    save_dictionary(d, tmp_path / "train", for_inference=False)
    e = load_dictionary(tmp_path / "train")
    assert e.architecture == "batchtopk" and torch.equal(e.threshold, d.threshold)


def test_dtype_is_written_and_cast_on_load(tmp_path: Path) -> None:
    d = random_dictionary("topk").to(torch.bfloat16)
    d.save(tmp_path / "bf")
    assert json.loads((tmp_path / "bf" / "cfg.json").read_text())["dtype"] == "bfloat16"
    e = load_dictionary(tmp_path / "bf")
    assert e.dtype == torch.bfloat16 and torch.equal(e.W_enc, d.W_enc)
    f32 = load_dictionary(tmp_path / "bf", dtype="float32")
    assert f32.dtype == torch.float32 and f32.cfg.dtype == "float32"
    with pytest.raises(UserError, match="unsupported dtype"):
        load_dictionary(tmp_path / "bf", dtype="int8")


def test_save_replaces_whole_directory_and_leaves_no_temp(tmp_path: Path) -> None:
    random_dictionary("relu").save(tmp_path / "d")
    (tmp_path / "d" / "stale.txt").write_text("old")
    random_dictionary("relu", seed=1).save(tmp_path / "d")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["cfg.json", "sae.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_save_refuses_nan(tmp_path: Path) -> None:
    d = random_dictionary("relu")
    with torch.no_grad():
        d.b_enc[0] = float("nan")
    with pytest.raises(UserError, match="b_enc"):
        d.save(tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_existing_path_wins_over_repo_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    random_dictionary("relu").save(tmp_path / "org" / "name")
    assert resolve_path("org/name") == Path("org/name")
    assert load_dictionary("org/name").d_sae == 10


def test_offline_hub_miss_is_a_clear_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(UserError, match="hub is unreachable") as e:
        load_dictionary("someorg/some-saes", subfolder="layer_3")
    assert "someorg/some-saes" in str(e.value) and "layer_3" in str(e.value)


def test_missing_local_path_that_is_not_a_repo_id(tmp_path: Path) -> None:
    with pytest.raises(DictionaryFormatError, match="no such file"):
        load_dictionary(tmp_path / "nope")


def test_hub_repo_id_resolves_through_the_local_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Hugging Face cache laid out by hand, as huggingface_hub leaves it after a download:
    # the real snapshot_download code path finds it offline.
    cache = tmp_path / "hub-cache"
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someorg--some-saes"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    d = random_dictionary("jumprelu")
    d.save(repo / "snapshots" / sha / "layer_3")
    import huggingface_hub.constants as c

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    for e in (
        load_dictionary("someorg/some-saes", subfolder="layer_3"),
        load_dictionary("someorg/some-saes/layer_3"),
        Dictionary.load("someorg/some-saes", subfolder="layer_3"),
    ):
        assert torch.equal(e.get_parameter("threshold"), d.get_parameter("threshold"))
    with pytest.raises(DictionaryFormatError, match="no such subfolder"):
        load_dictionary("someorg/some-saes", subfolder="layer_4")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_to_cuda_in_bfloat16_matches_cpu(tmp_path: Path) -> None:
    d = random_dictionary("topk", d_in=64, d_sae=256, k=8)
    d.save(tmp_path / "d")
    g = load_dictionary(tmp_path / "d", device="cuda", dtype=torch.bfloat16)
    assert g.device.type == "cuda" and g.dtype == torch.bfloat16
    x = torch.randn(32, 64)
    out = g(x.to("cuda", torch.bfloat16))
    ref = d(x).x_hat
    # bf16 rounding may swap near-tied topk features, so compare the whole reconstruction.
    assert float((out.x_hat.float().cpu() - ref).norm() / ref.norm()) < 0.05
