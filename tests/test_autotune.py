"""``auto`` by measurement (medattn_fast/autotune.py): the choice, the cache, and no side effects.

Most tests drive a toy op whose backends advance an injected clock by a cost of their own, so the
choice is deterministic; the real gate checks that timing leaves the caller's outputs, gradients,
RNG state and BatchNorm statistics alone, and that a real measurement between cpp and torch lands in
the cache. conftest.py gives the session a cache directory of its own and switches the autotune
off; each test here switches it on (the ``tune`` fixture) with a fresh cache directory.
"""
import copy
import dataclasses
import json

import pytest
import torch

import medattn_fast
from medattn_fast import autotune as AT
from medattn_fast import backend as B
from medattn_fast.kernel_config import KernelConfig, kernel_config, use_kernel_config
from medattn_fast.nn import AttentionGate
from medattn_fast.ops._attention_gate_fused import GateParams
from medattn_fast.ops._batch_norm import BatchNormParams


class FakeClock:
    """Seconds that advance only when a toy backend runs (by that backend's cost)."""

    def __init__(self):
        self.now = 0.0
        self.reads = 0

    def __call__(self):
        self.reads += 1
        return self.now


@pytest.fixture
def tune(monkeypatch, tmp_path):
    """Autotune on, a fresh cache directory, an injected clock; everything restored afterwards."""
    monkeypatch.setenv("MEDATTN_AUTOTUNE", "1")
    monkeypatch.setenv("MEDATTN_CACHE_DIR", str(tmp_path))
    AT.clear_memory()
    clock = FakeClock()
    AT.set_clock(clock)
    yield clock
    AT.set_clock(None)
    AT.clear_memory()


def _toy_op(clock, costs, *, name="toy", tune_key=None, tune_variants=None):
    """An op whose cpp and torch backends both compute 2x and advance ``clock`` by ``costs[label]``
    per call (the label of a variant call includes its kernel config's ``position_backward``)."""
    op = B.Op(name, auto_cpu=("cpp", "torch"), tune_key=tune_key, tune_variants=tune_variants)
    op.calls = []

    def backend(label):
        def run(x, **_kw):
            variant = kernel_config().position_backward
            key = label if f"{label}[{variant}]" not in costs else f"{label}[{variant}]"
            clock.now += costs[key]
            op.calls.append(key)
            return x * 2
        return run

    op.register("cpp", reasons=B.always)(backend("cpp"))
    op.register("torch")(backend("torch"))
    op.register("reference")(lambda x, **_kw: x + x)
    return op


@pytest.mark.parametrize("costs, expected", [({"cpp": 5.0, "torch": 3.0}, "torch"),
                                             ({"cpp": 2.0, "torch": 3.0}, "cpp"),
                                             ({"cpp": 4.0, "torch": 4.0}, "cpp")],   # a tie: static order
                         ids=["torch-faster", "cpp-faster", "tie"])
def test_the_clock_fastest_candidate_wins(tune, costs, expected):
    op = _toy_op(tune, costs)
    x = torch.randn(5, requires_grad=True)
    assert op.choose(x) == expected
    assert op.calls == ["cpp", "torch"] * (AT.WARMUP + AT.REPEATS)   # both, taking turns; reference never
    entry, = AT.cache_entries("cpu").values()
    assert entry["times_ms"] == {"cpp": costs["cpp"] * 1e3, "torch": costs["torch"] * 1e3}
    torch.testing.assert_close(op(x), x * 2)


def test_cache_hit_does_not_time_again_in_memory_or_from_disk(tune):
    op = _toy_op(tune, {"cpp": 5.0, "torch": 3.0})
    x = torch.randn(6)
    assert op.choose(x) == "torch"
    reads, calls = tune.reads, len(op.calls)
    assert reads > 0
    assert op.choose(torch.randn(7)) == "torch"        # 6 and 7 share the bucket 8
    assert (tune.reads, len(op.calls)) == (reads, calls)
    data = json.loads(AT.cache_path("cpu").read_text())
    (key, entry), = data["entries"].items()
    assert key == "toy|cpu|nograd|-|(float32[8],)|{}" and entry["label"] == "torch"
    assert entry["versions"] == AT.versions()
    AT.clear_memory()                                  # a new process: read back from the file
    assert op.choose(x) == "torch" and tune.reads == reads


def test_a_new_key_is_measured(tune):
    op = _toy_op(tune, {"cpp": 5.0, "torch": 3.0},
                 tune_key=lambda x, *, train=False: "train" if train else "eval")
    base = torch.randn(6)
    op.choose(base)
    seen = tune.reads
    for x, kw in ((torch.randn(9), {}),                            # another shape bucket (16)
                  (torch.randn(6, dtype=torch.float64), {}),       # another dtype
                  (torch.randn(6, requires_grad=True), {}),        # grad
                  (base, {"train": True})):                        # the family's part: train
        op.choose(x, **kw)
        assert tune.reads > seen, (x.shape, x.dtype, x.requires_grad, kw)
        seen = tune.reads
    with torch.no_grad():                                          # grad mode off: the nograd key again
        op.choose(torch.randn(6, requires_grad=True))
    assert tune.reads == seen
    assert len(AT.cache_entries("cpu")) == 5


def test_a_cached_pick_that_cannot_run_this_call_takes_the_static_order(tune):
    op = _toy_op(tune, {"cpp": 5.0, "torch": 3.0})
    op.impls["torch"].reasons = lambda x: [f"toy limit: numel <= 6, got {x.numel()}"] if x.numel() > 6 else []
    assert op.choose(torch.randn(5)) == "torch"
    reads = tune.reads
    assert op.choose(torch.randn(7)) == "cpp"          # same bucket (8), but torch cannot run it
    assert tune.reads == reads and AT.cache_entries("cpu")[next(iter(AT.cache_entries("cpu")))]["label"] == "torch"


def test_a_candidate_that_fails_while_timed_is_left_out(tune, caplog):
    op = _toy_op(tune, {"cpp": 1.0, "torch": 3.0})

    def broken(x):
        raise RuntimeError("toy kernel failure")

    op.impls["cpp"].fn = broken
    import logging

    with caplog.at_level(logging.WARNING, logger="medattn_fast"):
        assert op.choose(torch.randn(5)) == "torch"
    assert "autotune could not time cpp (RuntimeError: toy kernel failure)" in caplog.text
    entry, = AT.cache_entries("cpu").values()
    assert entry["times_ms"] == {"torch": 3000.0}


def test_one_candidate_is_not_timed(tune):
    op = _toy_op(tune, {"cpp": 5.0, "torch": 3.0})
    op.impls["cpp"].reasons = lambda x: ["cpp is switched off for this test"]
    assert op.choose(torch.randn(5, requires_grad=True)) == "torch"
    assert tune.reads == 0 and op.calls == [] and AT.cache_entries("cpu") == {}


def test_bucket_rounds_up_to_a_power_of_two():
    assert [AT.bucket(n) for n in (0, 1, 2, 3, 48, 64, 65)] == [0, 1, 2, 4, 64, 64, 128]


def test_a_version_change_re_measures(tune, monkeypatch):
    op = _toy_op(tune, {"cpp": 5.0, "torch": 3.0})
    x = torch.randn(4)
    op.choose(x)
    reads = tune.reads
    old = AT.versions()
    monkeypatch.setattr(AT, "versions", lambda: {**old, "torch": old["torch"] + "-other"})
    assert op.choose(x) == "torch"
    assert tune.reads > reads
    entry, = AT.cache_entries("cpu").values()
    assert entry["versions"]["torch"].endswith("-other")


def test_a_corrupt_cache_file_is_warned_about_once_and_replaced(tune):
    path = AT.cache_path("cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{ not json")
    op = _toy_op(tune, {"cpp": 5.0, "torch": 3.0})
    with pytest.warns(RuntimeWarning, match="ignoring the cache file .*autotune-cpu.json"):
        assert op.choose(torch.randn(4)) == "torch"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # not a second time
        assert op.choose(torch.randn(40)) == "torch"
    assert len(json.loads(path.read_text())["entries"]) == 2
    assert not list(path.parent.glob("*.tmp"))         # the atomic write left no temporary file


def test_autotune_off_takes_the_static_order(tune, monkeypatch):
    monkeypatch.setenv("MEDATTN_AUTOTUNE", "0")
    op = _toy_op(tune, {"cpp": 5.0, "torch": 3.0})
    assert op.choose(torch.randn(4, requires_grad=True)) == "cpp"
    assert tune.reads == 0 and op.calls == [] and not AT.cache_path("cpu").exists()
    assert B.registered_ops()["attention_gate"].describe()["auto"] == "static order (MEDATTN_AUTOTUNE=0)"


def test_a_forced_backend_never_tunes(tune):
    op = _toy_op(tune, {"cpp": 5.0, "torch": 3.0})
    x = torch.randn(4, requires_grad=True)
    with medattn_fast.use_backend("cpp"):
        assert op.choose(x) == "cpp"
    assert op(x, backend="cpp") is not None
    assert tune.reads == 0 and op.calls == ["cpp"]


def test_meta_tensors_are_never_timed(tune):
    op = _toy_op(tune, {"cpp": 5.0, "torch": 3.0})
    op.choose(torch.randn(5))                          # a cpu entry for the same signature
    reads = tune.reads
    assert op.choose(torch.empty(5, device="meta")) == "cpp"
    assert tune.reads == reads and AT.cache_entries("meta") == {}


def test_a_family_may_refuse_timing_for_a_call(tune):
    op = _toy_op(tune, {"cpp": 5.0, "torch": 3.0}, tune_key=lambda x: None)
    assert op.choose(torch.randn(4)) == "cpp" and tune.reads == 0


def _variants(backend, x):
    from medattn_fast.kernel_config import explicitly_set

    if backend != "torch" or explicitly_set("position_backward"):
        return ()
    return ((("position_backward", "separate"),), (("position_backward", "fused"),))


def test_kernel_variants_are_candidates_and_an_explicit_config_wins(tune):
    costs = {"cpp": 5.0, "torch[separate]": 4.0, "torch[fused]": 1.0, "torch": 9.0}
    op = _toy_op(tune, costs, tune_variants=_variants)
    x = torch.randn(4)
    choice = op.select(x)
    assert choice == AT.Choice("torch", (("position_backward", "fused"),))
    assert choice.label == "torch[position_backward=fused]"
    op.calls.clear()
    op(x)
    assert op.calls == ["torch[fused]"]                # the call runs under the picked variant
    assert kernel_config().position_backward == "separate"   # and leaves the config in force alone
    op.calls.clear()
    with use_kernel_config(KernelConfig(position_backward="separate")):   # set after the pick was cached
        op(x)
    assert op.calls == ["torch[separate]"]             # the user's config wins over the cached variant
    with use_kernel_config(KernelConfig(position_backward="separate")):   # the user's choice
        assert op.select(torch.randn(20)) == AT.Choice("torch")   # torch under "separate" (4) beats cpp (5)
    entry = [e for k, e in AT.cache_entries("cpu").items() if "float32[32]" in k][0]
    assert entry["times_ms"] == {"cpp": 5000.0, "torch": 4000.0}   # no other variant was timed


def test_position_backward_variants(monkeypatch):
    from medattn_fast.ops._families import _position_backward_variants as variants

    q = torch.randn(1, 4, 2, requires_grad=True)
    kw = dict(gamma=None, residual=None, multiply=None)
    both = ((("position_backward", "separate"),), (("position_backward", "fused"),))
    assert variants("triton", q, q, q, **kw) == both
    assert variants("cpp", q, q, q, **kw) == ()
    with torch.no_grad():
        assert variants("triton", q, q, q, **kw) == ()
    with use_kernel_config(KernelConfig()):
        assert variants("triton", q, q, q, **kw) == ()
    monkeypatch.setenv("MEDATTN_POSITION_BWD", "fused")
    assert variants("triton", q, q, q, **kw) == ()
    monkeypatch.delenv("MEDATTN_POSITION_BWD")
    torch.use_deterministic_algorithms(True)
    try:
        assert variants("triton", q, q, q, **kw) == ()   # the fused backward adds dq with atomics
    finally:
        torch.use_deterministic_algorithms(False)


def test_the_gate_key_says_train_or_eval_and_refuses_a_sync_group():
    from medattn_fast.ops._families import _gate_tune_key

    x, g = torch.randn(1, 4, 6, 6), torch.randn(1, 3, 3, 3)
    bn = BatchNormParams(torch.ones(2), torch.zeros(2), torch.zeros(2), torch.ones(2), training=True)
    params = GateParams(torch.randn(2, 4), None, torch.randn(2, 3), None, torch.randn(1, 2), None, bn_x=bn)
    assert _gate_tune_key(x, g, params) == "train"
    assert _gate_tune_key(x, g, params._replace(bn_x=params.bn_x._replace(training=False))) == "eval"
    assert _gate_tune_key(x, g, params._replace(bn_x=params.bn_x._replace(process_group=object()))) is None


def test_gate_kernel_variants(monkeypatch):
    """The Triton gate's dot and loop kernels are candidates where the dot kernels would run by
    default (C_int >= 16, Cx <= 64), never where the user chose one or for another backend."""
    from medattn_fast.ops._families import _gate_kernel_variants as variants

    def params(ci, cx):
        return GateParams(torch.randn(ci, cx), None, torch.randn(ci, 3), None, torch.randn(1, ci), None)

    x, g = torch.randn(1, 32, 6, 6), torch.randn(1, 3, 3, 3)
    both = ((("gate_kernel", "dot"),), (("gate_kernel", "loop"),))
    assert variants("triton", x, g, params(16, 32), mode="additive") == both
    assert variants("cuda", x, g, params(16, 32), mode="additive") == ()
    assert variants("triton", x, g, params(8, 32), mode="additive") == ()          # C_int < 16: loop only
    wide = torch.randn(1, 128, 6, 6)
    assert variants("triton", wide, g, params(16, 128), mode="additive") == ()     # Cx > 64: loop only
    with use_kernel_config(KernelConfig(gate_kernel="loop")):
        assert variants("triton", x, g, params(16, 32), mode="additive") == ()
    monkeypatch.setenv("MEDATTN_GATE_KERNEL", "dot")
    assert variants("triton", x, g, params(16, 32), mode="additive") == ()


def test_channel_gemm_variants(monkeypatch):
    """Channel attention's torch backend on 16-bit CUDA inputs: float32 GEMMs and the cuBLAS path
    (16-bit GEMMs with float32 output) are candidates of their own, unless the user chose one."""
    from medattn_fast.ops import _families
    from medattn_fast.ops._families import _channel_gemm_variants as variants

    x = torch.randn(1, 4, 3, 3, dtype=torch.bfloat16)
    assert variants("torch", x, negate=True) == ()                      # a CPU tensor: no cuBLAS path
    monkeypatch.setattr(_families, "_on_cuda", lambda t: True)          # as if x were on a GPU
    both = ((("channel_gemm", "float32"),), (("channel_gemm", "16bit"),))
    assert variants("torch", x, negate=True) == both
    assert variants("triton", x, negate=True) == ()
    assert variants("torch", x.float(), negate=True) == ()               # float32 runs the default
    with use_kernel_config(KernelConfig(channel_gemm="16bit")):
        assert variants("torch", x, negate=True) == ()
    monkeypatch.setenv("MEDATTN_CHANNEL_GEMM", "float32")
    assert variants("torch", x, negate=True) == ()


@dataclasses.dataclass(frozen=True)
class _Box:
    t: torch.Tensor
    name: str


def test_deep_clone_copies_every_tensor_keeping_layout_and_sharing():
    base = torch.randn(4, 6)
    view, expanded = base[:, 1:4], torch.randn(1, 3).expand(5, 3)
    w = torch.randn(3, requires_grad=True)
    bn = BatchNormParams(w, None, torch.zeros(3), torch.ones(3), torch.tensor(0), training=True)
    box = _Box(torch.randn(2), "label")
    copied = AT.deep_clone((view, base.t(), expanded, {"bn": bn}, [w], 1.5, box))
    cview, cbase_t, cexp, cdict, (cw,), scalar, cbox = copied
    assert isinstance(cbox, _Box) and cbox.name == "label" and torch.equal(cbox.t, box.t)
    assert cbox.t.data_ptr() != box.t.data_ptr()
    for a, b in ((cview, view), (cbase_t, base.t()), (cexp, expanded), (cw, w)):
        assert torch.equal(a, b) and a.stride() == b.stride() and a.data_ptr() != b.data_ptr()
    assert cview.untyped_storage().data_ptr() == cbase_t.untyped_storage().data_ptr()   # still one buffer
    assert cw.requires_grad and cw.is_leaf and scalar == 1.5
    cbn = cdict["bn"]
    assert isinstance(cbn, BatchNormParams) and cbn.training is True
    cbn.running_mean.add_(1)
    cbn.num_batches_tracked.add_(1)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and int(bn.num_batches_tracked) == 0


def _gate_step(gate, x, g):
    x = x.detach().clone().requires_grad_()
    g = g.detach().clone().requires_grad_()
    out, alpha = gate(x, g, return_alpha=True)
    assert x.grad is None
    cot = torch.randn_like(out)
    (out * cot).sum().backward()
    return out.detach(), alpha.detach(), x.grad, g.grad, [p.grad.clone() for p in gate.parameters()]


def test_no_side_effects_on_a_training_gate(tune, monkeypatch):
    """A training step through the gate with the autotune timing it: outputs, gradients and
    BatchNorm statistics equal those of the same step without the autotune on the backend it
    picked, and the RNG state is the one it would be."""
    torch.manual_seed(3)
    gate = AttentionGate(6, 5, 4).train()
    twin = copy.deepcopy(gate)
    x, g = torch.randn(2, 6, 10, 10), torch.randn(2, 5, 5, 5)
    ticks = iter(range(10 ** 6))
    AT.set_clock(lambda: float(next(ticks)))          # every region costs the same: a tie, static order
    torch.manual_seed(11)
    tuned = _gate_step(gate, x, g)
    after_tuned = torch.get_rng_state()
    entry, = AT.cache_entries("cpu").values()
    assert set(entry["times_ms"]) == {"cpp", "torch"}
    picked = entry["label"]
    monkeypatch.setenv("MEDATTN_AUTOTUNE", "0")
    torch.manual_seed(11)
    with medattn_fast.use_backend(picked):
        plain = _gate_step(twin, x, g)
    assert torch.equal(after_tuned, torch.get_rng_state())
    for a, b in zip(tuned[:4], plain[:4]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(tuned[4], plain[4]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name, buffer in gate.named_buffers():
        torch.testing.assert_close(buffer, dict(twin.named_buffers())[name], rtol=0, atol=0, msg=name)
    assert all(int(b) == 1 for n, b in gate.named_buffers() if n.endswith("num_batches_tracked"))


def test_no_timing_under_torch_compile(tune):
    gate = AttentionGate(4, 3, 2).eval()
    x, g = torch.randn(1, 4, 6, 6), torch.randn(1, 3, 3, 3)
    compiled = torch.compile(gate, backend="eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(x, g)
        with medattn_fast.use_backend("cpp"):
            torch.testing.assert_close(out, gate(x, g))
    assert tune.reads == 0 and AT.cache_entries("cpu") == {}


def test_real_measurement_between_cpp_and_torch(tune):
    """The real clock: a small training gate call picks cpp or torch, and the cache file has it."""
    AT.set_clock(None)
    gate = AttentionGate(8, 6, 4).train()
    x, g = torch.randn(2, 8, 12, 12, requires_grad=True), torch.randn(2, 6, 6, 6)
    with AT.record() as picks:
        gate(x, g).sum().backward()
    (device, key, choice, measured), = picks
    assert device == "cpu" and measured and choice.backend in ("cpp", "torch")
    data = json.loads(AT.cache_path("cpu").read_text())
    entry = data["entries"][key]
    assert key.startswith("attention_gate|cpu|grad|train|")
    assert entry["label"] == choice.label and set(entry["times_ms"]) == {"cpp", "torch"}
    assert all(t > 0 for t in entry["times_ms"].values())
    with AT.record() as again:                        # the next step uses the cached pick
        gate(x, g).sum().backward()
    assert again == [(device, key, choice, False)]


def test_cli_tune_fills_the_cache_and_info_prints_it(tune, capsys):
    from medattn_fast import cli

    AT.set_clock(None)
    assert cli.main(["tune", "--model", "attention_unet", "--shape", "1,1,32,32", "--train"]) == 0
    out = capsys.readouterr().out
    assert "attention_unet train (1, 1, 32, 32)" in out and "tuned call(s)" in out
    entries = AT.cache_entries("cpu")
    assert entries and all(k.startswith("attention_gate|cpu|grad|train|") for k in entries)
    assert all(f"-> {e['label']} (measured" in out for e in entries.values())
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"autotune: on; cache {AT.cache_dir()}" in out and f"({len(entries)} entries)" in out
    for key, entry in entries.items():
        assert key in out and f"-> {entry['label']}" in out
    with pytest.raises(SystemExit, match="--shape must be B,C,H,W"):
        cli.main(["tune", "--model", "attention_unet", "--shape", "1,32"])
