"""vqcore.save / vqcore.load: config + safetensors weights, rebuilt through the registry."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import vqcore


def trained_vq(**kwargs):
    q = vqcore.create("vq", dim=16, codebook_size=32, kmeans_init=True, threshold_ema_dead_code=1, **kwargs)
    q.train()
    for _ in range(3):
        q(torch.randn(4, 20, 16))
    return q.eval()


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"heads": 2, "separate_codebook_per_head": True, "codebook_dim": 4}, {"orthogonal_reg_weight": 1.0}],
)
def test_save_load_round_trip(tmp_path, kwargs):
    q = trained_vq(**kwargs)
    path = tmp_path / "vq.safetensors"
    vqcore.save(q, path)
    loaded = vqcore.load(path)
    assert type(loaded) is type(q)
    assert loaded.config == q.config
    for key, value in q.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(2, 7, 16)
    loaded.eval()
    assert torch.equal(loaded(x).quantized, q(x).quantized)
    assert bool(loaded._codebook.initted)


def test_checkpoint_holds_config_in_metadata(tmp_path):
    q = trained_vq()
    path = tmp_path / "vq.safetensors"
    vqcore.save(q, path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "vqcore.checkpoint/1" and meta["vqcore_version"] == vqcore.__version__
    assert json.loads(meta["config"]) == {
        "name": "vq",
        "kwargs": {"dim": 16, "codebook_size": 32, "kmeans_init": True, "threshold_ema_dead_code": 1},
    }
    assert {"_codebook.embed", "_codebook.cluster_size", "_codebook.embed_avg", "_codebook.initted"} <= keys


def test_directly_built_quantizer_saves_under_its_registry_name(tmp_path):
    q = vqcore.VectorQuantize(dim=8, codebook_size=4)
    vqcore.save(q, tmp_path / "q.safetensors")
    assert vqcore.load(tmp_path / "q.safetensors").config["name"] == "vq"


def test_unserialisable_config_is_a_clear_error(tmp_path):
    q = vqcore.VectorQuantize(dim=8, codebook_size=4, decay=torch.tensor(0.5).item())
    q.__dict__["_vqcore_config"]["kwargs"]["decay"] = torch.tensor(0.5)
    with pytest.raises(TypeError, match="must be JSON-serialisable"):
        vqcore.save(q, tmp_path / "q.safetensors")


def test_module_without_config_cannot_be_saved(tmp_path):
    with pytest.raises(ValueError, match="does not record how it was built"):
        vqcore.save(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")


def test_loading_a_foreign_file_fails_clearly(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="is not a vqcore checkpoint"):
        vqcore.load(tmp_path / "other.safetensors")
