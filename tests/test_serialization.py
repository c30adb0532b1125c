"""vqcore.save / vqcore.load: config + safetensors weights, rebuilt through the registry."""

from __future__ import annotations

import inspect
import json
import os
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_model

import vqcore
from vqcore.errors import ConfigVersionError
from vqcore.module import QuantizerModule


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
    assert meta["format"] == "vqcore.checkpoint/2" and meta["vqcore_version"] == vqcore.__version__
    config = json.loads(meta["config"])
    assert config["name"] == "vq" and config["version"] == 1
    # every constructor argument, defaults included: a later release changing a default cannot
    # change what this checkpoint rebuilds
    parameters = inspect.signature(vqcore.VectorQuantize).parameters
    assert list(config["kwargs"]) == list(parameters)
    passed = {"dim": 16, "codebook_size": 32, "kmeans_init": True, "threshold_ema_dead_code": 1}
    defaults = {name: p.default for name, p in parameters.items() if name not in passed}
    assert config["kwargs"] == {**passed, **defaults}
    assert config["kwargs"]["decay"] == 0.8 and config["kwargs"]["heads"] == 1
    assert {"_codebook.embed", "_codebook.cluster_size", "_codebook.embed_avg", "_codebook.initted"} <= keys


def test_forwarded_kwargs_are_recorded_as_passed():
    """ResidualVQ passes **vq_kwargs on to its layers: those are recorded as given, its own arguments
    with their defaults."""
    q = vqcore.create("rvq", dim=8, codebook_size=16, num_quantizers=2, decay=0.9)
    kwargs = q.config["kwargs"]
    assert kwargs["decay"] == 0.9 and kwargs["shared_codebook"] is False and kwargs["codebook_dim"] is None
    assert "eps" not in kwargs and "vq_kwargs" not in kwargs  # a layer default not passed: not recorded


def test_load_returns_eval_mode(tmp_path):
    q = trained_vq()
    q.train()
    vqcore.save(q, tmp_path / "vq.safetensors")
    loaded = vqcore.load(tmp_path / "vq.safetensors")
    assert not any(m.training for m in loaded.modules())


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_save_writes_the_usual_file_mode(tmp_path, umask):
    previous = os.umask(umask)
    try:
        vqcore.save(vqcore.create("vq", dim=4, codebook_size=8), tmp_path / "q.safetensors")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "q.safetensors").st_mode) == 0o666 & ~umask


def write_v1_checkpoint(quantizer, path, name, kwargs):
    """A checkpoint as vqcore.save wrote it before config versions: kwargs as passed, no version."""
    metadata = {
        "format": "vqcore.checkpoint/1",
        "vqcore_version": "0.1.0",
        "config": json.dumps({"name": name, "kwargs": kwargs}),
    }
    save_model(quantizer, str(path), metadata=metadata)


def test_version_1_checkpoint_still_loads(tmp_path):
    q = trained_vq()
    write_v1_checkpoint(
        q, tmp_path / "old.safetensors", "vq", {"dim": 16, "codebook_size": 32, "kmeans_init": True}
    )
    loaded = vqcore.load(tmp_path / "old.safetensors")
    assert loaded.config["version"] == 1 and loaded.config["kwargs"]["kmeans_init"] is True
    assert loaded.config["kwargs"]["decay"] == 0.8  # rebuilt with today's defaults, then recorded
    x = torch.randn(2, 7, 16)
    assert torch.equal(loaded(x).quantized, q(x).quantized)


class Scaled(QuantizerModule):
    """Sign codes times ``scale``; ``config_version`` 1 here, changed per test through monkeypatch."""

    def __init__(self, dim: int = 4, scale: float = 1.0):
        super().__init__()
        self.dim, self.codebook_size, self.num_codebooks, self.scale = dim, 2**dim, 1, scale
        self.register_buffer("weights", 2 ** torch.arange(dim))

    def encode(self, x):
        return ((x > 0).long() * self.weights).sum(-1)

    def decode(self, indices):
        return (((indices.unsqueeze(-1) // self.weights) % 2).float() * 2 - 1) * self.scale

    def forward(self, x):
        indices = self.encode(x)
        return self.decode(indices), indices


def make_scaled(dim: int = 4, gain: float = 2.0):
    """A plain factory (not a class)."""
    return Scaled(dim=dim, scale=gain)


make_scaled.config_version = 3


class ScaledPlugin:
    @vqcore.hookimpl
    def register_quantizers(self, register):
        register("scaled", Scaled)
        register("scaled_plain", make_scaled)


@pytest.fixture
def scaled_registry(fresh_registry):
    fresh_registry.register_plugin(ScaledPlugin(), name="scaled-plugin")
    return fresh_registry


def test_plain_factory_config_binds_its_signature_and_version(scaled_registry, tmp_path):
    q = vqcore.create("scaled_plain", dim=3)
    assert q.config == {"name": "scaled_plain", "version": 3, "kwargs": {"dim": 3, "gain": 2.0}}
    vqcore.save(q, tmp_path / "p.safetensors")
    loaded = vqcore.load(tmp_path / "p.safetensors")
    assert loaded.config == q.config and loaded.scale == 2.0


def test_newer_checkpoint_than_the_installed_plugin_is_refused(scaled_registry, tmp_path, monkeypatch):
    monkeypatch.setattr(Scaled, "config_version", 2)
    vqcore.save(vqcore.create("scaled", dim=3), tmp_path / "new.safetensors")
    monkeypatch.setattr(Scaled, "config_version", 1)  # the installed plugin is older
    with pytest.raises(ConfigVersionError) as info:
        vqcore.load(tmp_path / "new.safetensors")
    assert (info.value.method, info.value.saved, info.value.installed) == ("scaled", 2, 1)
    assert str(info.value).startswith(
        "checkpoint of quantizer 'scaled' has config version 2, the installed plugin builds version 1: "
        "the checkpoint is newer"
    )


def test_older_checkpoint_without_an_upgrade_is_refused(scaled_registry, tmp_path, monkeypatch):
    vqcore.save(vqcore.create("scaled", dim=3), tmp_path / "old.safetensors")
    monkeypatch.setattr(Scaled, "config_version", 2)
    with pytest.raises(
        ConfigVersionError, match="version 1, the installed plugin builds version 2: .*no upgrade"
    ):
        vqcore.load(tmp_path / "old.safetensors")


def test_older_checkpoint_loads_through_upgrade_config(scaled_registry, tmp_path, monkeypatch):
    q = vqcore.create("scaled", dim=3, scale=0.5)
    vqcore.save(q, tmp_path / "v2.safetensors")
    write_v1_checkpoint(q, tmp_path / "v1.safetensors", "scaled", {"dim": 3, "scale": 0.5})
    calls = []

    def upgrade_config(cls, kwargs, version):  # version 2 stores the scale as its inverse
        calls.append((version, dict(kwargs)))
        return {**kwargs, "scale": 1 / kwargs["scale"]} if version == 1 else None

    monkeypatch.setattr(Scaled, "config_version", 2)
    monkeypatch.setattr(Scaled, "upgrade_config", classmethod(upgrade_config))
    for path in ("v1.safetensors", "v2.safetensors"):  # a vqcore.checkpoint/1 file counts as version 1
        loaded = vqcore.load(tmp_path / path)
        assert loaded.scale == 2.0 and loaded.config["version"] == 2
    assert calls == [(1, {"dim": 3, "scale": 0.5}), (1, {"dim": 3, "scale": 0.5})]


def test_config_version_must_be_a_positive_int():
    with pytest.raises(TypeError, match=r"config_version must be a positive int, got 0"):

        class Bad(QuantizerModule):
            config_version = 0


def test_values_through_star_args_cannot_be_saved(tmp_path):
    class Star(Scaled):
        def __init__(self, *sizes, dim: int = 4):
            super().__init__(dim=dim)

    q = Star(1, 2)
    assert q.config["kwargs"] is None
    with pytest.raises(ValueError, match=r"built with values through \*args"):
        vqcore.save(q, tmp_path / "s.safetensors")


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
    with pytest.raises(ValueError, match="is not a vqcore checkpoint .*expected one of vqcore.checkpoint/2"):
        vqcore.load(tmp_path / "other.safetensors")


# -- untrusted files: nothing allocated before the file is checked, one error type naming the file ----------


def tampered(tmp_path, edit_config=None, edit_tensors=None, name="tampered.safetensors"):
    """A checkpoint of VectorQuantize(8, 16) rewritten with its config and / or tensors edited."""
    from safetensors.torch import load_file, save_file

    source = tmp_path / "source.safetensors"
    vqcore.save(vqcore.VectorQuantize(dim=8, codebook_size=16), source)
    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
    tensors = load_file(str(source))
    if edit_config is not None:
        config = json.loads(metadata["config"])
        edit_config(config)
        metadata["config"] = json.dumps(config)
    if edit_tensors is not None:
        edit_tensors(tensors)
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_a_config_asking_for_2_to_the_40_codes_fails_fast_without_allocating(tmp_path):
    import resource
    import time

    def huge(config):
        config["kwargs"]["codebook_size"] = 2**40

    path = tampered(tmp_path, edit_config=huge)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(vqcore.errors.CheckpointError) as caught:
        vqcore.load(path)
    elapsed = time.perf_counter() - start
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    message = str(caught.value)
    assert message.startswith(f"{path}: its tensors are not those its config builds ('vq'): ")
    assert (
        "_codebook.embed: the config builds [1, 1099511627776, 8] F32, the file holds [1, 16, 8] F32"
        in message
    )
    assert elapsed < 1.0 and grown_mib < 100


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: t.pop("_codebook.embed_avg"), "missing _codebook.embed_avg"),
        (lambda t: t.update(extra=torch.zeros(2)), "unexpected extra"),
        (
            lambda t: t.update({"_codebook.embed": t["_codebook.embed"].double()}),
            "[1, 16, 8] F32, the file holds [1, 16, 8] F64",
        ),
    ],
    ids=["missing", "unexpected", "dtype"],
)
def test_tensors_that_the_config_does_not_build_are_named(tmp_path, edit, expected):
    path = tampered(tmp_path, edit_tensors=edit)
    with pytest.raises(
        vqcore.errors.CheckpointError, match="its tensors are not those its config builds"
    ) as caught:
        vqcore.load(path)
    assert expected in str(caught.value) and str(path) in str(caught.value)


def test_truncated_garbage_and_configless_files_raise_one_error_type_naming_the_file(tmp_path):
    good = tmp_path / "good.safetensors"
    vqcore.save(vqcore.VectorQuantize(dim=8, codebook_size=16), good)
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])  # the header intact, the last tensor cut short
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a checkpoint at all" * 10)
    header_only = tmp_path / "header.safetensors"
    header_only.write_bytes(data[:20])
    for path, message in [
        (cut, "not a complete safetensors file|its tensors cannot be read"),
        (garbage, "is not a vqcore checkpoint \\(not a complete safetensors file"),
        (header_only, "is not a vqcore checkpoint \\(not a complete safetensors file"),
        (tampered(tmp_path, edit_config=lambda c: c.pop("kwargs")), "holds no readable vqcore config"),
        (
            tampered(tmp_path, edit_config=lambda c: c["kwargs"].update(decay=2.0), name="decay.safetensors"),
            r"its config does not build 'vq': ValueError: decay must be in \[0, 1\], got 2.0",
        ),
    ]:
        with pytest.raises(vqcore.errors.CheckpointError, match=message) as caught:
            vqcore.load(path)
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    assert issubclass(ConfigVersionError, vqcore.errors.CheckpointError)
    assert issubclass(vqcore.errors.CheckpointError, ValueError)


def test_vqcore_export_of_a_tampered_checkpoint_exits_2_and_writes_nothing(tmp_path, capsys):
    from vqcore.cli import main

    path = tampered(tmp_path, edit_config=lambda c: c["kwargs"].update(codebook_size=2**40))
    out = tmp_path / "out"
    assert main(["export", str(path), "--out", str(out)]) == 2
    assert "its tensors are not those its config builds" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
