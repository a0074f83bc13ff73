"""``medattn-fast verify``: every available fast path vs the reference on fresh random inputs.

For each op, backend and dtype: forward and backward (a random cotangent) on small odd shapes,
compared with the ``reference`` backend run in float64. The table shows the max abs difference
divided by max(the reference's max abs value, 1); pass or fail is the library's one tolerance rule
(:mod:`medattn_fast.testing.tolerance`, the rule of the test suite too): float64 within a few
roundoffs, other dtypes within twice PyTorch's own error (the ``reference`` backend run in that
dtype) plus a little slack. A backend that cannot run is listed with its reasons, not failed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import backend as B
from . import functional as MF
from .testing.tolerance import check, max_errors, rounded, worse


@dataclass
class Sample:
    op: str                               # dispatcher name in medattn_fast.backend
    label: str
    make: Callable[[torch.device, torch.dtype], Tuple[tuple, dict]]
    call: Callable[..., torch.Tensor]     # call(*args, backend=..., **kwargs)


@dataclass
class Result:
    op: str
    label: str
    backend: str
    dtype: str
    fwd_err: Optional[float] = None
    bwd_err: Optional[float] = None
    status: str = "ok"


def _r(*shape, device=None, dtype=None, scale=1.0):
    return torch.randn(*shape, dtype=torch.float64) * scale


def _cast(obj, dtype: torch.dtype, device: torch.device):
    """Tensors inside ``obj`` (tuples, named tuples, dicts) moved to ``device`` and ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device=device, dtype=dtype if obj.is_floating_point() else obj.dtype)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_cast(o, dtype, device) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(o, dtype, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype, device) for k, v in obj.items()}
    return obj


def _samples() -> List[Sample]:
    s: List[Sample] = []

    def gauss_qkv(device, dtype):
        q, k, v = (_r(2, 5, 7, 6, device=device, dtype=dtype) for _ in range(3))
        return (q, k, v, torch.tensor(0.3, dtype=dtype, device=device)), {}

    def gauss_scores(device, dtype):
        ax = _r(2, 5, 7, 7, device=device, dtype=dtype)
        ay = _r(2, 7, 5, 5, device=device, dtype=dtype)
        v = _r(2, 5, 7, 6, device=device, dtype=dtype)
        return (ax, ay, v, torch.tensor([0.3], dtype=dtype, device=device)), {}

    s.append(Sample("gaussian_axial", "qkv B=2 5x7 D=6", gauss_qkv, MF.gaussian_axial_attention))
    s.append(Sample("gaussian_axial_from_scores", "scores B=2 5x7 D=6", gauss_scores, MF.gaussian_axial_from_scores))

    def pam(device, dtype):
        return (_r(2, 37, 4, device=device, dtype=dtype), _r(2, 41, 4, device=device, dtype=dtype),
                _r(2, 41, 12, device=device, dtype=dtype)), {}

    def pam_t(device, dtype):
        return (_r(2, 37, 4, device=device, dtype=dtype), _r(2, 37, 4, device=device, dtype=dtype),
                _r(2, 37, 12, device=device, dtype=dtype)), {"transpose": True}

    s.append(Sample("position_attention", "Nq=37 Nk=41 dk=4 dv=12", pam, MF.position_attention))
    s.append(Sample("position_attention", "transpose N=37", pam_t, MF.position_attention))

    def cam(device, dtype):
        return (_r(2, 24, 5, 7, device=device, dtype=dtype),), {}

    def cam_pos(device, dtype):
        return (_r(2, 24, 5, 7, device=device, dtype=dtype),), {"negate": False}

    s.append(Sample("channel_attention", "C=24 5x7 negate", cam, MF.channel_attention))
    s.append(Sample("channel_attention", "C=24 5x7 softmax(E)", cam_pos, MF.channel_attention))

    def window(device, dtype):
        C, heads = 12, 3
        w = [_r(C, C) * 0.3 for _ in range(4)]
        b = [_r(C) * 0.1 for _ in range(4)]
        x = _r(2, 7, 6, C)
        return (x, w[0], b[0], w[1], b[1], w[2], b[2], w[3], b[3]), {"window_size": 4, "num_heads": heads}

    def window_mask(device, dtype):
        args, kw = window(device, dtype)
        return args, dict(kw, pad_mode="mask")

    s.append(Sample("window_attention", "7x6 ws=4 mtunet pad", window, MF.window_attention))
    s.append(Sample("window_attention", "7x6 ws=4 masked pad", window_mask, MF.window_attention))

    def external(device, dtype):
        C, heads, d, S = 8, 4, 8, 16
        return (_r(2, 29, C), _r(heads * d, C) * 0.3, _r(heads * d) * 0.1, _r(S, d) * 0.3, _r(S) * 0.1,
                _r(d, S) * 0.3, _r(d) * 0.1, _r(C, heads * d) * 0.3, _r(C) * 0.1), {"num_heads": heads}

    s.append(Sample("external_attention", "N=29 C=8 heads=4", external, MF.external_attention))

    def gate(training):
        def make(device, dtype):
            from .ops.attention_gate import BatchNormParams

            def bn(c):
                return BatchNormParams(weight=1 + 0.1 * _r(c), bias=0.1 * _r(c), running_mean=0.1 * _r(c),
                                       running_var=1 + 0.1 * _r(c).abs(), num_batches_tracked=None,
                                       momentum=0.1, eps=1e-5)

            Cx, Cg, Ci = 6, 10, 4
            args = (_r(2, Cx, 7, 9), _r(2, Cg, 3, 4), _r(Ci, Cx, 1, 1), _r(Ci), _r(Ci, Cg, 1, 1), _r(Ci),
                    _r(1, Ci, 1, 1), _r(1))
            return args, {"bn_x": bn(Ci), "bn_g": bn(Ci), "bn_psi": bn(1), "training": training}
        return make

    s.append(Sample("attention_gate", "2D x 7x9 g 3x4 eval", gate(False), MF.attention_gate))
    s.append(Sample("attention_gate", "2D x 7x9 g 3x4 train", gate(True), MF.attention_gate))
    return s


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs error scaled by max(|reference|, 1): relative for large values, absolute for small
    ones — a gradient that is exactly 0 in theory (a bias that cancels in a softmax or a batch
    norm) is ~1e-17 in the reference and must not turn into a huge relative error."""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def _fwd_bwd(sample: Sample, args, kwargs, backend: str, cot: torch.Tensor):
    leaves = [a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args]
    out = sample.call(*leaves, backend=backend, **kwargs)
    out.backward(cot.to(out.dtype))
    return out.detach(), [a.grad if a.grad is not None else torch.zeros_like(a)
                          for a in leaves if isinstance(a, torch.Tensor)]


def run_verify(device: Optional[str] = None, backends: Optional[Sequence[str]] = None,
               dtypes: Optional[Sequence[str]] = None) -> List[Result]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtypes:
        dts = [getattr(torch, d) for d in dtypes]
    else:
        dts = [torch.float32, torch.bfloat16, torch.float16] if dev.type == "cuda" else [torch.float64, torch.float32]
    results: List[Result] = []
    ops = B.registered_ops()
    for sample in _samples():
        op = ops.get(sample.op)
        if op is None:
            continue
        names = [b for b in B.BACKENDS[1:] if b != "reference" and b in op.impls]
        if backends:
            names = [b for b in names if b in backends]
        for dtype in dts:
            args64, kwargs64 = sample.make(dev, dtype)
            ref_args, ref_kwargs = _cast(args64, torch.float64, torch.device("cpu")), _cast(kwargs64, torch.float64, torch.device("cpu"))
            with torch.no_grad():
                cot = torch.randn_like(sample.call(*ref_args, backend="reference", **ref_kwargs))
            ref_out, ref_grads = _fwd_bwd(sample, ref_args, ref_kwargs, "reference", cot)
            exact = [ref_out] + list(ref_grads)
            args, kwargs = _cast(args64, dtype, dev), _cast(kwargs64, dtype, dev)
            yardstick = None
            if dtype != torch.float64:   # PyTorch's own error in this dtype: the reference run in it
                own_out, own_grads = _fwd_bwd(sample, args, _cast(kwargs64, dtype, dev), "reference", cot.to(dev))
                # ... or an ideal implementation's: exact on the rounded inputs, rounded once (where larger)
                low = _cast(_cast(args64, dtype, dev), torch.float64, torch.device("cpu"))
                q_out, q_grads = _fwd_bwd(sample, low, _cast(kwargs, torch.float64, torch.device("cpu")), "reference",
                                          rounded(cot, dtype))
                yardstick = worse(max_errors([own_out] + list(own_grads), exact),
                                  max_errors([rounded(r, dtype) for r in [q_out] + list(q_grads)], exact))
            for name in names:
                res = Result(sample.op, sample.label, name, str(dtype).replace("torch.", ""))
                try:
                    out, grads = _fwd_bwd(sample, args, kwargs, name, cot.to(dev))
                    res.fwd_err = _rel(out, ref_out)
                    res.bwd_err = max((_rel(g, rg) for g, rg in zip(grads, ref_grads)
                                       if g is not None and rg is not None), default=0.0)
                    if any(err > bound for err, bound in check([out] + list(grads), exact, dtype, yardstick)):
                        res.status = "FAIL"
                except B.BackendUnavailable as exc:  # the backend says why it cannot run this call
                    res.status = "n/a: " + str(exc).split("cannot run this call: ", 1)[-1]
                except Exception as exc:
                    res.status = "FAIL"
                    res.fwd_err = float("nan")
                    print(f"{sample.op} [{name}, {dtype}] raised {type(exc).__name__}: {exc}")
                results.append(res)
    return results


def format_results(results: List[Result]) -> str:
    head = f"{'op':<28}{'case':<26}{'backend':<9}{'dtype':<10}{'fwd rel err':>12}{'bwd rel err':>12}  status"
    lines = [head, "-" * len(head)]
    for r in results:
        f = "-" if r.fwd_err is None else f"{r.fwd_err:.1e}"
        b = "-" if r.bwd_err is None else f"{r.bwd_err:.1e}"
        lines.append(f"{r.op:<28}{r.label:<26}{r.backend:<9}{r.dtype:<10}{f:>12}{b:>12}  {r.status}")
    ok = sum(r.status == "ok" for r in results)
    fail = sum(r.status == "FAIL" for r in results)
    lines.append(f"verify: {ok} ok, {fail} FAIL, {len(results) - ok - fail} not available here")
    return "\n".join(lines)
