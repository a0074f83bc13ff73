"""bench/harness.py: rows of a tiny case — timings, the error column against the reference
provider, unavailable providers, and GB/s against the measured copy bandwidth."""
import torch

import medattn_fast
from bench.harness import Case, copy_bandwidth, format_table, measured_copy_bandwidth, run_case

CPU = torch.device("cpu")


def _case(**kw):
    def setup(device, dtype):
        x = torch.randn(64, 1024, device=device, dtype=dtype, requires_grad=True)

        def unavailable(x):
            raise medattn_fast.BackendUnavailable("no such backend here")

        return (x,), {"reference": lambda x: x * 2, "fast": lambda x: x + x, "off_by_one": lambda x: x * 2 + 1,
                      "missing": unavailable}

    return Case(op="toy", shape="64x1024", setup=setup, **kw)


def test_rows_time_compare_and_report_unavailable():
    rows = run_case(_case(flops=64 * 1024), CPU, torch.float32, quick=True)
    by = {(r.provider, r.mode): r for r in rows}
    assert {m for _, m in by} == {"fwd", "fwd+bwd", "no-grad"}
    for mode in ("fwd", "fwd+bwd", "no-grad"):
        assert by["fast", mode].median_ms > 0 and by["fast", mode].max_err == 0.0
        assert abs(by["off_by_one", mode].max_err - 1.0) < 1e-5  # float32 x*2+1 vs x*2
        assert by["missing", mode].status.startswith("unavailable: ") and by["missing", mode].median_ms is None
        assert by["fast", mode].tflops > 0
    assert "GB/s" not in by["fast", "fwd"].extra  # no bytes_moved: no bandwidth column


def test_bytes_moved_gives_gbps_against_the_copy_bandwidth():
    moved = lambda dtype: 2 * 64 * 1024 * torch.empty((), dtype=dtype).element_size()  # noqa: E731
    rows = run_case(_case(bytes_moved=moved), CPU, torch.float32, quick=True)
    copy = copy_bandwidth(CPU)
    assert copy > 0 and measured_copy_bandwidth(CPU) == copy
    for r in rows:
        if r.provider != "fast":
            continue
        if r.mode == "fwd+bwd":
            assert "GB/s" not in r.extra
        else:
            expected = moved(torch.float32) / (r.median_ms * 1e-3) / 1e9
            assert abs(r.extra["GB/s"] - expected) <= 1e-9 * expected
            assert abs(r.extra["of_copy"] - expected / copy) <= 1e-9 * expected / copy
    assert "of copy" in format_table(rows)


def test_kernel_variant_providers_pass_a_config_not_the_environment(monkeypatch):
    """A variant provider runs under its KernelConfig; the default provider beside it, and the
    environment, are untouched."""
    from bench.harness import with_kernel_config

    for name in ("MEDATTN_FP32_PRECISION", "MEDATTN_POSITION_BWD", "MEDATTN_POSITION_P16"):
        monkeypatch.delenv(name, raising=False)
    seen = []

    def probe(x):
        seen.append(medattn_fast.kernel_config())
        return x * 2

    fused = with_kernel_config(probe, medattn_fast.KernelConfig(position_backward="fused", position_p16=True))
    x = torch.randn(3)
    torch.testing.assert_close(fused(x), x * 2)
    probe(x)
    assert seen[0] == medattn_fast.KernelConfig(position_backward="fused", position_p16=True)
    assert seen[1] == medattn_fast.KernelConfig()
    assert "MEDATTN_POSITION_BWD" not in __import__("os").environ
    try:
        with_kernel_config(probe, {"position_backward": "fused"})
    except TypeError as exc:
        assert "KernelConfig" in str(exc) and "dict" in str(exc)
    else:
        raise AssertionError("a dict was taken as a kernel config")


def test_gpu_check_rows_ceilings_errors_and_deadline(tmp_path):
    """run_gpu_check (the GPU check's timing stage): the ceiling rows, one ok row per provider and
    mode with FLOP/s against the matmul ceiling, an error row for a provider that raises, and a
    'skipped' row for a case that no longer fits before the deadline — all in the CSV, flushed."""
    import csv
    import time

    from bench.harness import GPU_CHECK_FIELDS, run_gpu_check

    def setup(device, dtype):
        x = torch.randn(32, 64, device=device, dtype=dtype, requires_grad=True)

        def broken(x):
            raise RuntimeError("no such kernel")

        return (x,), {"fast": lambda x: x.pow(2), "original": lambda x: x * x, "broken": broken}

    fits = Case(op="toy", shape="32x64", setup=setup, flops=32 * 64, dtypes=(torch.float32,),
                modes=("no-grad", "fwd+bwd"), estimate_s=0.0)
    too_long = Case(op="toy", shape="huge", setup=setup, dtypes=(torch.float32,), estimate_s=1e6)
    out = tmp_path / "rows.csv"
    run_gpu_check([fits, too_long], CPU, str(out), deadline=time.time() + 120, tiny=True)
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == GPU_CHECK_FIELDS
        rows = list(reader)
    assert {r["dtype"] for r in rows if r["section"] == "ceiling"} == {"float32", "bfloat16", "tf32"}
    ok = {(r["provider"], r["mode"]): r for r in rows if r["section"] == "toy" and r["status"] == "ok"}
    # tiny (the CPU dry run): toy ceilings, and each case's last mode only
    assert set(ok) == {("fast", "fwd+bwd"), ("original", "fwd+bwd")}
    for r in ok.values():
        assert float(r["ms"]) > 0 and float(r["tflops"]) > 0 and float(r["pct_ceiling"]) > 0
    errors = [r for r in rows if r["status"] == "error"]
    assert {r["provider"] for r in errors} == {"broken"} and "no such kernel" in errors[0]["note"]
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert [r["case"] for r in skipped] == ["huge"] and "did not fit" in skipped[0]["note"]


def test_one_case_list_selected_by_file_or_op_column():
    """bench.run's case list (also the pytest-benchmark suite's): --op names a case file or a
    case's op column; an unknown name is refused with the known ones."""
    from bench.run import select_cases

    by_file = select_cases(CPU, ["networks"])
    by_column = select_cases(CPU, ["mtunet_model"])
    assert {c.op for c in by_column} == {"mtunet_model"}
    assert {c.shape for c in by_column} <= {c.shape for c in by_file if c.op == "mtunet_model"}
    assert all(CPU.type in c.devices for c in select_cases(CPU))
    position = select_cases(CPU, ["position"], shape="PAM B=2")
    assert position and all(c.op == "position_attention" and "PAM B=2" in c.shape for c in position)
    try:
        select_cases(CPU, ["no_such_family"])
    except ValueError as exc:
        assert "no_such_family" in str(exc) and "'position'" in str(exc)
    else:
        raise AssertionError("an unknown --op was accepted")


def test_sdpa_peer_excludes_math_on_cuda_and_copies_strided_inputs():
    """The SDPA peer rows (bench/cases_position.py) run a fused SDPA kernel on CUDA, never MATH, so
    a refusal raises (an error row) instead of timing the N×N math path; the channel-first views
    (last-dim stride N) are made contiguous; on CPU (the dry run) the result equals SDPA's."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bench.cases_position import sdpa_backends, sdpa_without_math

    on_cuda = sdpa_backends(torch.device("cuda"))
    assert SDPBackend.MATH not in on_cuda and SDPBackend.EFFICIENT_ATTENTION in on_cuda
    assert SDPBackend.MATH in sdpa_backends(CPU)
    # a fused-only call that no fused kernel takes is refused, not run on MATH (CPU flash: dk != dv)
    q, k, v = torch.randn(2, 1, 37, 3), torch.randn(2, 1, 37, 3), torch.randn(2, 1, 37, 12)
    with sdpa_kernel(on_cuda):
        try:
            F.scaled_dot_product_attention(q, k, v)
            raise AssertionError("SDPA ran dk != dv on CPU without MATH")
        except RuntimeError as exc:
            assert "No available kernel" in str(exc)
    strided = [torch.randn(2, d, 37).transpose(1, 2).unsqueeze(1) for d in (3, 3, 12)]   # (B, 1, N, d)
    out = sdpa_without_math(*strided, scale=0.7)
    q64, k64, v64 = (t.double() for t in strided)
    expected = torch.softmax(0.7 * q64 @ k64.transpose(-1, -2), -1) @ v64
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_head_split_peers_compute_pam_and_auto_rows_name_their_pick():
    """The head-split peers (v's 512 columns as 8 × 64 or 4 × 128 heads, q and k repeated and
    zero-padded) compute PAM's one-head softmax(q kᵀ) v exactly, with and without padding, on
    fresh inputs against float64; a bad split is refused naming the sizes; the ``auto`` provider's
    row note names the backend auto ran for each op of the call."""
    import pytest

    from bench.cases_position import _merge_heads, head_split, sdpa_without_math
    from bench.harness import auto_provider
    from medattn_fast.compat.danet import PAM_Module

    q, k = torch.randn(2, 1, 37, 8, dtype=torch.float64), torch.randn(2, 1, 37, 8, dtype=torch.float64)
    v = torch.randn(2, 1, 37, 64, dtype=torch.float64)
    expected = torch.softmax(0.3 * q @ k.transpose(-1, -2), -1) @ v
    for heads in (8, 4, 2):   # width 8 = dk (no padding), 16 and 32 (q, k padded)
        split = head_split(q, k, v, heads)
        assert all(t.shape == (2, heads, 37, 64 // heads) and t.is_contiguous() for t in split)
        torch.testing.assert_close(_merge_heads(sdpa_without_math(*split, scale=0.3)), expected)
    with pytest.raises(ValueError, match="dv = 64 must split into 16 heads at least dk = 8 wide"):
        head_split(q, k, v, 16)
    module = PAM_Module(16)
    run = auto_provider(module)
    with medattn_fast.use_backend("torch"):   # the provider runs auto whatever is in force
        out = run(torch.randn(1, 16, 5, 5))
    assert out.shape == (1, 16, 5, 5) and run.__self__ is module
    picked = run.picks["position_attention"]
    assert picked in ("cpp", "torch") and run.row_note() == f"auto ran position_attention: {picked}"


def test_ratio_lines_compare_each_provider_with_every_peer_and_the_best():
    """bench/gpu_report.py's ratio lines: head-split SDPA/Flex rows count as baselines, and each of
    our providers gets its speed-up over the fastest baseline."""
    from bench.gpu_report import ratios

    def row(provider, ms):
        return {"status": "ok", "section": "position", "case": "PAM", "dtype": "bfloat16", "mode": "fwd+bwd",
                "provider": provider, "ms": str(ms)}

    (line,) = ratios([row("triton", 2.0), row("auto", 4.0), row("original", 8.0), row("sdpa 8 heads", 3.0)])
    assert "triton 1.50x vs the best baseline (sdpa 8 heads)" in line
    assert "auto 0.75x vs the best baseline (sdpa 8 heads)" in line
    assert "triton 4.00x vs original" in line and "sdpa 8 heads 1.00x" not in line
