"""Registry, plugins and the public API around them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import vqcore
import vqcore.module
from vqcore import registry as registry_module
from vqcore.errors import (
    DuplicateNameError,
    MissingArgumentsError,
    PluginError,
    PluginLoadWarning,
    UnknownNameError,
)


def write_dist(tmp_path, dist_name, module_name, module_source, entry_name=None, version="1.2.3"):
    """A real installed distribution: a module plus <dist>-<version>.dist-info with entry_points.txt."""
    (tmp_path / f"{module_name}.py").write_text(textwrap.dedent(module_source))
    info = tmp_path / f"{dist_name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[vqcore]\n{entry_name or dist_name} = {module_name}\n")
    return info


TOY_PLUGIN = """
import torch
from torch import nn
import vqcore

class SignQuantizer(nn.Module):
    '''x (b, n, d) -> sign codes; codebook_size 2**d.'''
    def __init__(self, dim=4):
        super().__init__()
        self.dim, self.codebook_size, self.num_codebooks = dim, 2 ** dim, 1
        self.register_buffer("weights", 2 ** torch.arange(dim))
    def encode(self, x):
        return ((x > 0).long() * self.weights).sum(-1)
    def decode(self, indices):
        return ((indices.unsqueeze(-1) // self.weights) % 2).float() * 2 - 1
    def forward(self, x):
        indices = self.encode(x)
        q = self.decode(indices)
        return x + (q - x).detach(), indices

@vqcore.hookimpl
def register_quantizers(register):
    register("toy_sign", SignQuantizer, aliases=("sign",), summary="toy sign quantizer")
"""


@pytest.fixture
def on_sys_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_builtin_quantizers_are_listed_with_their_plugin(fresh_registry):
    assert "vq" in vqcore.list_quantizers()
    entry = vqcore.get_entry("vq")
    assert entry.factory is vqcore.VectorQuantize and entry.plugin == "vqcore.plugins.vq"
    assert vqcore.get_entry("VectorQuantize").name == "vq"  # alias
    assert vqcore.list_quantizers("vector*") == ["vq"]  # pattern matches aliases too
    assert vqcore.list_quantizers("nothing*") == []
    assert vqcore.get_entry("euclidean", kind="codebook").plugin == "vqcore.plugins.blocks"
    assert vqcore.get_entry("commitment", kind="loss").create().name == "commitment"


def test_entry_point_plugin_is_discovered_and_created(fresh_registry, on_sys_path):
    write_dist(on_sys_path, "vqcore_toy", "vqcore_toy_plugin", TOY_PLUGIN, entry_name="toy")
    assert "toy_sign" in vqcore.list_quantizers()
    entry = vqcore.get_entry("sign")
    assert entry.plugin == "toy" and entry.summary == "toy sign quantizer"
    q = vqcore.create("toy_sign", dim=3)
    x = torch.tensor([[[1.0, -2.0, 3.0]]])
    assert q.encode(x).tolist() == [[1 + 4]]
    assert vqcore.module.get_config(q) == {"name": "toy_sign", "version": 1, "kwargs": {"dim": 3}}
    info = {p.name: p for p in vqcore.plugins_info()}["toy"]
    assert (info.version, info.status, info.hooks) == ("1.2.3", "ok", ["register_quantizers"])
    assert info.registered == {"quantizer": ["toy_sign"]}


def test_plugins_load_lazily_on_first_use(fresh_registry, on_sys_path):
    write_dist(on_sys_path, "vqcore_lazy", "vqcore_lazy_plugin", TOY_PLUGIN, entry_name="lazy")
    assert "vqcore_lazy_plugin" not in sys.modules and not fresh_registry._loaded
    vqcore.list_quantizers()
    assert "vqcore_lazy_plugin" in sys.modules
    sys.modules.pop("vqcore_lazy_plugin")


def test_broken_plugin_warns_names_it_and_the_rest_keeps_working(fresh_registry, on_sys_path, monkeypatch):
    monkeypatch.delenv("VQCORE_STRICT_PLUGINS", raising=False)
    write_dist(
        on_sys_path,
        "vqcore_broken",
        "vqcore_broken_plugin",
        "import no_such_module_xyz\n",
        entry_name="broken",
    )
    with pytest.warns(
        PluginLoadWarning, match=r"plugin broken \(vqcore_broken_plugin\) failed to load.*no_such_module_xyz"
    ):
        names = vqcore.list_quantizers()
    assert "vq" in names
    info = {p.name: p for p in vqcore.plugins_info()}["broken"]
    assert info.status.startswith("failed: ModuleNotFoundError") and "no_such_module_xyz" in info.status


def test_broken_plugin_is_fatal_in_strict_mode(fresh_registry, on_sys_path, monkeypatch):
    monkeypatch.setenv("VQCORE_STRICT_PLUGINS", "1")
    write_dist(
        on_sys_path,
        "vqcore_broken",
        "vqcore_broken_plugin",
        "raise RuntimeError('boom')\n",
        entry_name="broken",
    )
    with pytest.raises(
        PluginError, match=r"broken \(vqcore_broken_plugin\) failed to load: RuntimeError: boom"
    ):
        vqcore.list_quantizers()


def test_duplicate_names_raise_naming_both_plugins(fresh_registry):
    class Clash:
        @vqcore.hookimpl
        def register_quantizers(self, register):
            register("vq", object)

    with pytest.raises(
        DuplicateNameError,
        match=r"'vq' registered by plugin 'clash' is already registered by plugin 'vqcore.plugins.vq'",
    ):
        vqcore.register_plugin(Clash(), name="clash")
    # the failed plugin left nothing behind
    assert vqcore.get_entry("vq").factory is vqcore.VectorQuantize
    assert "clash" not in {p.name for p in vqcore.plugins_info()}


def test_duplicate_alias_raises(fresh_registry):
    class Clash:
        @vqcore.hookimpl
        def register_quantizers(self, register):
            register("other", object, aliases=("vector_quantize",))

    with pytest.raises(DuplicateNameError, match="'vector_quantize'.*'vqcore.plugins.vq'"):
        vqcore.register_plugin(Clash(), name="clash")


def test_unknown_name_is_a_keyerror_with_suggestions(fresh_registry):
    with pytest.raises(UnknownNameError) as info:
        vqcore.create("vqq", dim=4, codebook_size=8)
    assert isinstance(info.value, KeyError)
    assert info.value.suggestions[0] == "vq"
    assert "unknown quantizer 'vqq'; did you mean 'vq'" in str(info.value)
    with pytest.raises(KeyError, match="unknown codebook 'cosin'; did you mean 'cosine'"):
        vqcore.get_entry("cosin", kind="codebook")


def test_register_plugin_at_run_time_and_create_checks_the_protocol(fresh_registry):
    class NotAQuantizer(torch.nn.Module):
        pass

    class RunTime:
        @vqcore.hookimpl
        def register_quantizers(self, register):
            register("not_a_quantizer", NotAQuantizer)

    vqcore.register_plugin(RunTime(), name="runtime")
    with pytest.raises(
        TypeError,
        match=(
            "does not follow vqcore.protocols.Quantizer: "
            "missing dim, codebook_size, num_codebooks, encode, decode"
        ),
    ):
        vqcore.create("not_a_quantizer")


def test_register_rejects_bad_entries(fresh_registry):
    class Bad:
        @vqcore.hookimpl
        def register_losses(self, register):
            register("", object)

    with pytest.raises(TypeError, match="non-empty str"):
        vqcore.register_plugin(Bad(), name="bad")


def test_create_records_config_and_bad_kwargs_fail_clearly(fresh_registry):
    q = vqcore.create("vq", dim=8, codebook_size=16, decay=0.9)
    assert q.config["name"] == "vq" and q.config["version"] == 1
    kwargs = q.config["kwargs"]
    assert (kwargs["dim"], kwargs["codebook_size"], kwargs["decay"]) == (8, 16, 0.9)
    assert kwargs["eps"] == 1e-5 and kwargs["heads"] == 1  # defaults recorded too
    with pytest.raises(TypeError, match="quantizer 'vq': got an unexpected keyword argument 'codebook_sise'"):
        vqcore.create("vq", dim=8, codebook_sise=16)


def test_create_names_every_missing_required_argument(fresh_registry):
    with pytest.raises(MissingArgumentsError) as info:
        vqcore.create("rpq", dim=8)
    assert isinstance(info.value, TypeError)
    assert info.value.quantizer == "rpq" and info.value.missing == ["codebook_size", "codebook_dim"]
    assert str(info.value) == "quantizer 'rpq' is missing required arguments: codebook_size, codebook_dim"


def test_direct_construction_records_config():
    q = vqcore.VectorQuantize(8, 16, heads=2)
    assert q.config["name"] is None and q.config["version"] == vqcore.VectorQuantize.config_version == 1
    assert (q.config["kwargs"]["dim"], q.config["kwargs"]["codebook_size"], q.config["kwargs"]["heads"]) == (
        8,
        16,
        2,
    )
    assert q.config["kwargs"]["codebook_dim"] is None


def test_import_vqcore_is_light():
    code = "import sys, vqcore; print('torch' in sys.modules, 'vqcore.plugins.vq' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "False"]


def test_registry_object_is_process_wide():
    assert registry_module.get_registry() is registry_module.get_registry()


def test_no_warning_from_a_clean_registry(fresh_registry):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vqcore.list_quantizers()
