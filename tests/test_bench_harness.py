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
