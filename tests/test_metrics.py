"""vqcore.metrics.CodebookMonitor: exact counts against a brute-force bincount for every built-in and the
example plugin, the report's formulas against hand computations, the per-layer errors of a residual
stack built by hand, the hashed estimate above exact_limit, hooks (forward, encode, detach, copies,
export), torch.compile without new graph breaks, and the errors."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn

import vqcore
from vqcore.book_layout import BookAxis, BookLayout, book_layout_of
from vqcore.metrics import CodebookMonitor
from vqcore.module import QuantizerModule

# name -> (factory kwargs, input shape, books: indices -> {book name: flat indices}, forward kwargs)
_whole = lambda i: {"": i.reshape(-1)}
_last = lambda name, n: lambda i: {f"{name}{k}": i[..., k].reshape(-1) for k in range(n)}
_grouped = lambda g, n: (
    lambda i: {f"group{a}/layer{k}": i[a, ..., k].reshape(-1) for a in range(g) for k in range(n)}
)

CASES = {
    "vq": ("vq", dict(dim=8, codebook_size=16, kmeans_init=True), (4, 10, 8), _whole),
    "vq_heads": (
        "vq",
        dict(dim=8, codebook_size=16, heads=2, separate_codebook_per_head=True),
        (4, 10, 8),
        _last("head", 2),
    ),
    "vq_heads_shared": ("vq", dict(dim=8, codebook_size=16, heads=2), (4, 10, 8), _last("head", 2)),
    "vq_image": ("vq", dict(dim=8, codebook_size=16, accept_image_fmap=True), (2, 8, 3, 4), _whole),
    "rvq_dropout": (
        "rvq",
        dict(dim=8, codebook_size=16, num_quantizers=3, quantize_dropout=True),
        (4, 10, 8),
        _last("layer", 3),
    ),
    "grouped_rvq": (
        "grouped_rvq",
        dict(dim=8, codebook_size=16, num_quantizers=2, groups=2),
        (4, 10, 8),
        _grouped(2, 2),
    ),
    "rpq": (
        "rpq",
        dict(dim=8, codebook_size=16, codebook_dim=4, num_codebooks=2),
        (4, 10, 8),
        _last("codebook", 2),
    ),
    "fsq": ("fsq", dict(levels=[3, 5, 4]), (4, 10, 3), _whole),
    "fsq_codebooks": (
        "fsq",
        dict(levels=[3, 5, 4], dim=8, num_codebooks=2),
        (4, 10, 8),
        _last("codebook", 2),
    ),
    "residual_fsq": (
        "residual_fsq",
        dict(dim=8, levels=[3, 5], num_quantizers=2),
        (4, 10, 8),
        _last("layer", 2),
    ),
    "residual_fsq_channel_first": (
        "residual_fsq",
        dict(dim=8, levels=[3, 5], num_quantizers=2, is_channel_first=True),
        (4, 8, 10),
        lambda i: {f"layer{k}": i[:, k].reshape(-1) for k in range(2)},
    ),
    "grouped_residual_fsq_channel_first": (
        "grouped_residual_fsq",
        dict(dim=8, levels=[3, 5], num_quantizers=2, groups=2, is_channel_first=True),
        (4, 8, 10),
        lambda i: {f"group{a}/layer{k}": i[a, :, k].reshape(-1) for a in range(2) for k in range(2)},
    ),
    "grouped_residual_fsq": (
        "grouped_residual_fsq",
        dict(dim=8, levels=[3, 5], num_quantizers=2, groups=2),
        (4, 10, 8),
        _grouped(2, 2),
    ),
    "fsp": ("fsp", dict(levels=[3, 5, 4]), (4, 10, 3), _whole),
    "lfq": ("lfq", dict(dim=8, codebook_size=16, num_codebooks=2), (4, 10, 8), _last("codebook", 2)),
    "residual_lfq": (
        "residual_lfq",
        dict(dim=8, codebook_size=16, num_quantizers=2),
        (4, 10, 8),
        _last("layer", 2),
    ),
    "grouped_residual_lfq": (
        "grouped_residual_lfq",
        dict(dim=8, codebook_size=16, num_quantizers=2, groups=2),
        (4, 10, 8),
        _grouped(2, 2),
    ),
    "latent": ("latent", dict(levels=[3, 5, 4], dim=3), (4, 10, 3), _whole),
    "sim_vq": ("sim_vq", dict(dim=8, codebook_size=16), (4, 10, 8), _whole),
    "residual_sim_vq": (
        "residual_sim_vq",
        dict(dim=8, codebook_size=16, num_quantizers=3),
        (4, 10, 8),
        _last("layer", 3),
    ),
    "hierarchical_vq": (
        "hierarchical_vq",
        dict(dim=8, codebook_size=16, scales=(2, 4, 8), shared_codebook=False),
        (2, 8, 8),
        lambda i: {f"level{k}": level.reshape(-1) for k, level in enumerate(_levels(i, (2, 4, 8)))},
    ),
    "binary_mapper": ("binary_mapper", dict(bits=4), (4, 10, 4), _whole),
    "gain_shape_vq": ("gain_shape_vq", dict(dim=8, codebook_size=16), (4, 10, 8), _whole),
}


def _levels(indices, cells):
    return indices if isinstance(indices, tuple) else indices.split(list(cells), dim=1)


def _forward_indices(out):
    """The indices a forward returned: RandomProjectionQuantizer returns them bare; BinaryMapper none."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [out.indices] if "indices" in out._fields else []


def _expected(books_of, observed, sizes):
    """Brute force: per book, torch.bincount over every observed call's non-negative indices."""
    total = {}
    for indices in observed:
        for name, flat in books_of(indices).items():
            flat = flat[flat >= 0]
            counts = torch.bincount(flat, minlength=sizes[name])
            total[name] = total.get(name, 0) + counts
    return total


@pytest.mark.parametrize("case", list(CASES))
def test_counts_equal_a_bincount_of_every_forward_and_encode(case):
    name, kwargs, shape, books_of = CASES[case]
    torch.manual_seed(0)
    q = vqcore.create(name, **kwargs)
    monitor = CodebookMonitor(q)
    observed = []
    x = torch.randn(*shape)
    for _ in range(3):  # training forwards (quantize dropout varies the layers kept)
        observed += _forward_indices(q(x))
    q.eval()
    with torch.no_grad():
        observed += _forward_indices(q(x))
        observed.append(q.encode(x[:3]))
    sizes = dict(zip(monitor.layout.names, monitor.layout.sizes))
    want = _expected(books_of, observed, sizes)
    got = monitor.counts()
    assert got.keys() == want.keys()
    for book in want:
        assert torch.equal(got[book], want[book]), book
    report = monitor.report()
    for book, counts in want.items():
        key = f"{monitor.name}/{book}/tokens" if book else f"{monitor.name}/tokens"
        assert report[key] == counts.sum().item()
    if case == "rvq_dropout":  # dropped layers (-1) were really there and not counted
        assert any((i < 0).any() for i in observed)


def test_masked_positions_are_not_counted_and_the_error_skips_masked_calls():
    torch.manual_seed(0)
    vq = vqcore.VectorQuantize(dim=4, codebook_size=8)
    monitor = CodebookMonitor(vq)
    x = torch.randn(2, 6, 4)
    mask = torch.tensor([[True] * 6, [True, True, False, False, False, False]])
    out = vq(x, mask=mask)
    assert (out.indices[~mask] == -1).all()
    assert monitor.report()[f"{monitor.name}/tokens"] == 8
    assert f"{monitor.name}/mse" not in monitor.report()  # a masked forward adds no error
    vq(x)
    assert monitor.report()[f"{monitor.name}/tokens"] == 8 + 12


def test_report_formulas_by_hand():
    vq = vqcore.VectorQuantize(dim=2, codebook_size=8)
    monitor = CodebookMonitor(vq, hooks=False, name="tok", rare_threshold=0.5)
    monitor.update(torch.tensor([[0, 0, 1, 2], [0, 0, -1, 7]]))  # -1: not counted
    r = monitor.report()
    # counts: code0 4, code1 1, code2 1, code7 1 -> 7 tokens
    p = torch.tensor([4, 1, 1, 1], dtype=torch.float64) / 7
    entropy = float(-(p * p.log()).sum())
    assert r["tok/tokens"] == 7
    assert r["tok/used_codes"] == 4 and r["tok/usage"] == 0.5 and r["tok/dead_codes"] == 4
    assert r["tok/perplexity"] == pytest.approx(math.exp(entropy), rel=1e-12)
    assert r["tok/bits"] == pytest.approx(entropy / math.log(2), rel=1e-12)
    assert r["tok/nominal_bits"] == 3
    # rare: below 0.5 * 7 / 8 = 0.4375 uses -> the 4 dead codes only; below 2.0 * 7 / 8: also codes 1, 2, 7
    assert r["tok/rare_codes"] == 4
    monitor.rare_threshold = 2.0
    assert monitor.report()["tok/rare_codes"] == 7
    assert set(r) == {
        f"tok/{k}"
        for k in (
            "tokens",
            "used_codes",
            "usage",
            "dead_codes",
            "rare_codes",
            "perplexity",
            "bits",
            "nominal_bits",
        )
    }
    monitor.reset()
    assert monitor.report()["tok/tokens"] == 0 and monitor.report()["tok/dead_codes"] == 8


def test_aggregate_keys_over_books():
    vq = vqcore.VectorQuantize(dim=4, codebook_size=4, heads=2, separate_codebook_per_head=True)
    monitor = CodebookMonitor(vq, hooks=False, name="h")
    monitor.update(torch.tensor([[[0, 0], [1, 0], [2, 0], [3, 0]]]))  # head0 uniform over 4, head1 one code
    r = monitor.report()
    assert r["h/head0/perplexity"] == pytest.approx(4) and r["h/head1/perplexity"] == pytest.approx(1)
    assert r["h/perplexity"] == pytest.approx(2.5) and r["h/usage"] == pytest.approx((1 + 0.25) / 2)
    assert r["h/bits"] == pytest.approx(2) and r["h/nominal_bits"] == 4 and r["h/dead_codes"] == 3


def test_quantization_error_of_the_forwards():
    torch.manual_seed(0)
    vq = vqcore.VectorQuantize(dim=4, codebook_size=8).eval()
    monitor = CodebookMonitor(vq)
    xs = [torch.randn(2, 5, 4), torch.randn(3, 7, 4)]
    squared = energy = elements = 0.0
    for x in xs:
        q = vq(x).quantized
        squared += float((x - q).double().pow(2).sum())
        energy += float(x.double().pow(2).sum())
        elements += x.numel()
        vq.encode(x)  # encode calls count codes, not errors
    r = monitor.report()
    assert r[f"{monitor.name}/mse"] == pytest.approx(squared / elements, rel=1e-6)
    assert r[f"{monitor.name}/relative_error"] == pytest.approx(squared / energy, rel=1e-6)
    assert r[f"{monitor.name}/tokens"] == 2 * (10 + 21)


def _hand_rvq():
    """dim 2, two layers of 2 codes, no projection: layer 0 codes (±2, 0), layer 1 codes (0, ±1)."""
    rvq = vqcore.ResidualVQ(dim=2, codebook_size=2, num_quantizers=2).eval()
    state = rvq.state_dict()
    state["layers.0._codebook.embed"] = torch.tensor([[[2.0, 0.0], [-2.0, 0.0]]])
    state["layers.1._codebook.embed"] = torch.tensor([[[0.0, 1.0], [0.0, -1.0]]])
    state["layers.0._codebook.initted"] = torch.tensor([True])
    state["layers.1._codebook.initted"] = torch.tensor([True])
    rvq.load_state_dict(state)
    return rvq


def test_per_layer_error_and_energy_share_of_a_residual_stack_by_hand():
    rvq = _hand_rvq()
    x = torch.tensor([[[2.0, 1.5], [-2.5, -1.0]]])
    monitor = CodebookMonitor(rvq, hooks=False, name="rvq")
    indices = rvq.encode(x)
    assert indices.tolist() == [[[0, 0], [1, 1]]]
    monitor.update(indices, x=x)
    e_none = 2.0**2 + 1.5**2 + 2.5**2 + 1.0**2  # ||x||^2 = 13.5
    e_first = 0.0 + 1.5**2 + 0.5**2 + 1.0**2  # after layer 0: (0, 1.5), (-0.5, -1)
    e_both = 0.0 + 0.5**2 + 0.5**2 + 0.0  # after layer 1: (0, 0.5), (-0.5, 0)
    r = monitor.report()
    assert r["rvq/layer0/error"] == pytest.approx(e_first / e_none)
    assert r["rvq/layer1/error"] == pytest.approx(e_both / e_none)
    assert r["rvq/layer0/energy_share"] == pytest.approx((e_none - e_first) / e_none)
    assert r["rvq/layer1/energy_share"] == pytest.approx((e_first - e_both) / e_none)
    assert r["rvq/relative_error"] == pytest.approx(e_both / e_none)
    assert r["rvq/mse"] == pytest.approx(e_both / 4)


def test_layer_errors_in_hooked_forwards_only_when_asked():
    rvq = _hand_rvq()
    x = torch.tensor([[[2.0, 1.5], [-2.5, -1.0]]])
    plain, layered = CodebookMonitor(rvq, name="a"), CodebookMonitor(rvq, name="b", layer_errors=True)
    rvq(x)
    assert "a/layer0/error" not in plain.report() and "a/relative_error" in plain.report()
    assert layered.report()["b/layer1/error"] == pytest.approx(0.5 / 13.5)


def test_hashed_buckets_above_exact_limit_estimate_usage_within_the_stated_error():
    torch.manual_seed(0)
    lfq = vqcore.LFQ(dim=16, codebook_size=2**16)
    exact = CodebookMonitor(lfq, hooks=False, name="exact")
    sketch = CodebookMonitor(lfq, hooks=False, name="sketch", exact_limit=2**10, sketch_buckets=2**14)
    indices = torch.randint(0, 2**16, (4, 3000)) % 5000  # 5000 codes used at most
    exact.update(indices)
    sketch.update(indices)
    e, s = exact.report(), sketch.report()
    assert not sketch.books[0].exact and exact.books[0].exact
    assert s["sketch/tokens"] == e["exact/tokens"] == 12000
    assert sketch.counts()[""].numel() == 2**14
    rel = s["sketch/usage_rel_error"]
    assert 0 < rel < 0.05
    assert abs(s["sketch/used_codes"] / e["exact/used_codes"] - 1) < 4 * rel
    # merged buckets only lower the entropy: a lower bound, low by about 2^(used / buckets)
    load = e["exact/used_codes"] / 2**14
    assert s["sketch/perplexity"] <= e["exact/perplexity"]
    assert s["sketch/perplexity"] > e["exact/perplexity"] / 2 ** (2 * load)
    assert math.isnan(s["sketch/rare_codes"])


def test_encode_inside_forward_counts_once():
    torch.manual_seed(0)
    rpq = vqcore.RandomProjectionQuantizer(dim=8, codebook_size=16, codebook_dim=4)  # forward calls encode
    monitor = CodebookMonitor(rpq)
    rpq(torch.randn(2, 5, 8))
    rpq.encode(torch.randn(2, 3, 8))
    assert monitor.report()[f"{monitor.name}/tokens"] == 10 + 6


def test_detach_copies_and_pickling():
    torch.manual_seed(0)
    vq = vqcore.VectorQuantize(dim=4, codebook_size=8).eval()
    x = torch.randn(2, 5, 4)
    first, second = CodebookMonitor(vq, name="one"), CodebookMonitor(vq, name="two")
    clone = copy.deepcopy(vq)
    assert torch.equal(clone.encode(x), vq.encode(x))  # the copy encodes with its own state, unobserved
    restored = pickle.loads(pickle.dumps(vq))
    assert torch.equal(restored.encode(x), vq.encode(x))
    assert first.report()["one/tokens"] == second.report()["two/tokens"] == 20
    first.detach()
    vq.encode(x)
    assert first.report()["one/tokens"] == 20 and second.report()["two/tokens"] == 30
    with second:
        pass
    assert "encode" not in vq.__dict__ and not vq._forward_hooks and not vq._forward_pre_hooks
    vq(x)
    vq.encode(x)
    assert second.report()["two/tokens"] == 30


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_export_of_a_monitored_quantizer_counts_nothing(tmp_path):
    torch.manual_seed(0)
    vq = vqcore.VectorQuantize(dim=4, codebook_size=8).eval()
    monitor = CodebookMonitor(vq)
    x = torch.randn(2, 5, 4)

    class Encode(nn.Module):
        def __init__(self, q):
            super().__init__()
            self.q = q

        def forward(self, x):
            return self.q.encode(x)

    program = torch.export.export(Encode(vq), (x,), strict=False)
    traced = torch.jit.trace(Encode(vq), (x,), check_trace=False)  # a trace check reruns the eager module
    ids = program.module()(x), traced(x)
    assert monitor.report()[f"{monitor.name}/tokens"] == 0
    assert torch.equal(ids[0], vq.encode(x)) and torch.equal(ids[1], ids[0])
    assert monitor.report()[f"{monitor.name}/tokens"] == 10  # the eager encode only


@pytest.mark.parametrize("name", ["fsq", "lfq", "vq"])
def test_compiled_training_forward_has_no_new_graph_breaks(name):
    """Compiled as part of a model (the hooks inline into its graph): no break with or without a monitor.
    Compiled alone (``torch.compile(quantizer)``: the hooks run as a frame of their own): no recompile
    over calls, and the counts are those of the returned indices."""
    build = {
        "fsq": lambda: vqcore.FSQ(levels=[5, 3], dim=8),
        "lfq": lambda: vqcore.LFQ(dim=8, codebook_size=16),
        "vq": lambda: vqcore.VectorQuantize(dim=8, codebook_size=16),
    }[name]

    class Model(nn.Module):
        def __init__(self, quantizer):
            super().__init__()
            self.proj, self.quantizer = nn.Linear(8, 8), quantizer

        def forward(self, x):
            return self.quantizer(self.proj(x))

    x = torch.randn(2, 5, 8)

    def explain(module):
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(module)(x)
        return explanation.graph_break_count, explanation.graph_count

    torch.manual_seed(0)
    assert explain(Model(build().train())) == (0, 1)
    torch.manual_seed(0)
    module = build().train()
    monitor = CodebookMonitor(module)
    assert explain(Model(module)) == (0, 1)

    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monitor.reset()
    compiled = torch.compile(module, backend=backend)
    want = torch.zeros(module.codebook_size, dtype=torch.long)
    for _ in range(3):
        out = compiled(torch.randn(2, 5, 8))
        want += torch.bincount(out.indices.reshape(-1), minlength=module.codebook_size)
    assert len(graphs) == 2  # the forward's and the hook's, compiled once
    assert torch.equal(monitor.counts()[""], want)


def test_not_a_quantizer_is_refused_naming_what_is_missing():
    with pytest.raises(
        TypeError, match="Linear is not a vqcore quantizer.*lacks dim, codebook_size, num_codebooks"
    ):
        CodebookMonitor(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="not an nn.Module"):
        CodebookMonitor(object())


class _TwoBooks(QuantizerModule):
    """A plugin-style quantizer whose indices do not follow what it declares."""

    def __init__(self, num_codebooks: int = 2, codebook_size: int = 4, offset: int = 0):
        super().__init__()
        self.dim, self.codebook_size, self.num_codebooks, self.offset = (
            2,
            codebook_size,
            num_codebooks,
            offset,
        )

    def encode(self, x):
        return (x[..., 0] > 0).long() + self.offset  # (b, n): one book, whatever num_codebooks says

    def decode(self, indices):
        return indices.unsqueeze(-1).float().expand(*indices.shape, 2)

    def forward(self, x):
        indices = self.encode(x)
        return self.decode(indices), indices


def test_a_plugin_whose_indices_do_not_match_its_declared_books_is_named():
    q = _TwoBooks()
    monitor = CodebookMonitor(q)
    with pytest.raises(ValueError, match=r"axis -1 should enumerate 2 codebooks \(got 3\)"):
        q(torch.randn(2, 3, 2))
    assert monitor.report()["_twobooks/codebook0/tokens"] == 0  # nothing counted by the refused call
    with pytest.raises(ValueError, match="does not match|do not match"):
        monitor.update(torch.zeros(4, dtype=torch.long))


def test_indices_above_the_declared_codebook_size_are_reported_at_read_time():
    q = _TwoBooks(num_codebooks=1, codebook_size=4, offset=3)  # emits 3 and 4 for a 4-code book
    monitor = CodebookMonitor(q)
    q(torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]]))
    with pytest.raises(ValueError, match=r"the codebook \(1 of them, size 4\).*book_layout\(\)"):
        monitor.report()


def test_bad_options_and_update_input():
    vq = vqcore.VectorQuantize(dim=2, codebook_size=4)
    for kwargs, match in [
        (dict(rare_threshold=float("nan")), "rare_threshold"),
        (dict(rare_threshold=-1), "rare_threshold"),
        (dict(exact_limit=0), "exact_limit"),
        (dict(sketch_buckets=1000), "power of two"),
    ]:
        with pytest.raises(ValueError, match=match):
            CodebookMonitor(vq, **kwargs)
    assert not vq._forward_hooks and "encode" not in vq.__dict__  # a refused monitor attached nothing
    monitor = CodebookMonitor(vq, hooks=False)
    with pytest.raises(TypeError, match="integer tensor"):
        monitor.update(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"x of shape \(1, 3, 2\).*\(1, 2, 2\)"):
        monitor.update(torch.zeros(1, 2, dtype=torch.long), x=torch.zeros(1, 3, 2))
    assert monitor.report()[f"{monitor.name}/tokens"] == 0  # a refused update counts nothing


def test_book_layout_of_plugins_and_builtins():
    assert book_layout_of(_TwoBooks(num_codebooks=1)).names == ("",)
    layout = book_layout_of(vqcore.GroupedResidualVQ(dim=4, codebook_size=8, num_quantizers=3, groups=2))
    assert layout.names == tuple(f"group{g}/layer{k}" for g in range(2) for k in range(3))
    assert layout.residual == "layer" and layout.sizes == (8,) * 6
    indices = torch.arange(2 * 5 * 7 * 3).reshape(2, 5, 7, 3)
    books = layout.books_first(indices)
    assert books.shape == (6, 35) and torch.equal(books[4], indices[1, ..., 1].reshape(-1))
    assert torch.equal(layout.truncate(indices, 1)[..., 1:], torch.full((2, 5, 7, 2), -1))
    with pytest.raises(ValueError, match="one codebook size per book"):
        BookLayout((BookAxis("head", -1, 3),), (4, 4))
    with pytest.raises(ValueError, match="residual axis 'layer' is not one of its axes"):
        BookLayout((BookAxis("head", -1, 3),), (4,), "layer")


def test_plot_and_table(tmp_path):
    torch.manual_seed(0)
    rvq = vqcore.ResidualVQ(dim=4, codebook_size=8, num_quantizers=2).eval()
    monitor = CodebookMonitor(rvq, layer_errors=True, name="rvq")
    rvq(torch.randn(4, 16, 4))
    table = monitor.table().splitlines()
    r = monitor.report()
    assert table[0].split() == [
        "book",
        "codes",
        "tokens",
        "used",
        "usage",
        "perplexity",
        "bits",
        "/",
        "nominal",
        "dead",
        "rare",
    ]
    assert table[2].split()[:4] == ["layer0", "8", "64", f"{r['rvq/layer0/used_codes']:.0f}"]
    assert f"{r['rvq/layer1/perplexity']:.1f}" in table[3]
    assert any(
        line.startswith("layer1") and f"{100 * r['rvq/layer1/energy_share']:.1f}%" in line for line in table
    )
    path = monitor.plot(tmp_path / "usage.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_book_layout_counts_indices_from_elsewhere():
    monitor = CodebookMonitor(BookLayout.trailing("codebook", 2, 4))
    assert monitor.name == "codes" and not monitor.attached
    monitor.update(torch.tensor([[0, 3], [1, 3], [-1, 3]]))
    counts = monitor.counts()
    assert counts["codebook0"].tolist() == [1, 1, 0, 0] and counts["codebook1"].tolist() == [0, 0, 0, 3]
    with pytest.raises(ValueError, match="no decode: pass quantized"):
        monitor.update(torch.zeros(1, 2, dtype=torch.long), x=torch.zeros(1, 2, 1))
    assert monitor.report()["codes/codebook0/tokens"] == 2  # the refused update counted nothing
    x, q = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 1.0]])
    monitor.update(torch.zeros(1, 2, dtype=torch.long), x=x, quantized=q)
    assert monitor.report()["codes/relative_error"] == pytest.approx(1 / 5)
