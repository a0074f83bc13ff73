"""compat.mtunet: the originals' classes (faithful to the original references) and their fast twins load the same
state_dicts strictly and give the same outputs and parameter gradients, fp64, eval and train."""
from pathlib import Path

import pytest
import torch

from medattn_fast.compat import mtunet as C
from medattn_fast.reference import mtunet as R

F64 = torch.float64
TIGHT = dict(rtol=1e-9, atol=1e-10)
# a copy of ../shared/compat/mtunet_state_dict_keys.txt (the original MTUNet(9) checkpoint keys)
KEYS_FILE = Path(__file__).resolve().parent / "data" / "mtunet_state_dict_keys.txt"
CFG = {"win_size": 4, "head": 2}


def _param_grads(module):
    return {n: (torch.zeros_like(p) if p.grad is None else p.grad) for n, p in module.named_parameters()}


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _check_pair(ref, fast, inputs, *, train):
    """Same outputs and same gradients (inputs and every parameter) for ref and its compat twin."""
    ref.train(train)
    fast.train(train)
    ref_in = [t.detach().clone().requires_grad_(True) for t in inputs]
    fast_in = [t.detach().clone().requires_grad_(True) for t in inputs]
    ref_arg = tuple(ref_in) if len(inputs) > 1 else ref_in[0]
    fast_arg = tuple(fast_in) if len(inputs) > 1 else fast_in[0]
    ref_out, fast_out = _as_tuple(ref(ref_arg)), _as_tuple(fast(fast_arg))
    assert len(ref_out) == len(fast_out)
    loss_r = loss_f = 0
    for r, f in zip(ref_out, fast_out):
        assert f.shape == r.shape and f.dtype == r.dtype
        torch.testing.assert_close(f, r, **TIGHT)
        cot = torch.randn_like(r)
        loss_r, loss_f = loss_r + (r * cot).sum(), loss_f + (f * cot).sum()
    loss_r.backward()
    loss_f.backward()
    for a, b in zip(fast_in, ref_in):
        torch.testing.assert_close(a.grad, b.grad, **TIGHT)
    ref_grads, fast_grads = _param_grads(ref), _param_grads(fast)
    assert fast_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], **TIGHT, msg=name)


def _twins(ref):
    ref = ref.to(F64)
    fast = C.COMPAT_CLASSES[type(ref).__name__].from_original(ref)
    assert type(fast).__name__ == type(ref).__name__
    assert fast.state_dict().keys() == ref.state_dict().keys()
    return ref, fast


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("side", [8, 7, 5, 1])
def test_win_attention(side, train):
    ref, fast = _twins(R.WinAttention(CFG, 8))
    _check_pair(ref, fast, [torch.randn(2, side * side, 8, dtype=F64)], train=train)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("axial", [False, True])
def test_attention(axial, train):
    ref, fast = _twins(R.Attention(12, {"head": 3}, axial=axial))
    shape = (2, 3, 5, 12) if axial else (2, 2, 3, 16, 12)  # axial: H != W; window mode: (b, p, p, win, c)
    _check_pair(ref, fast, [torch.randn(*shape, dtype=F64)], train=train)


@pytest.mark.parametrize("train", [False, True])
def test_dlight_conv(train):
    ref, fast = _twins(R.DlightConv(6, CFG))
    _check_pair(ref, fast, [torch.randn(2, 3, 3, 16, 6, dtype=F64)], train=train)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("side", [5, 3])
def test_gaussian_trans(side, train):
    ref, fast = _twins(R.GaussianTrans())
    inputs = [torch.randn(2, side, side, 4, dtype=F64), torch.randn(2, side, side, side, dtype=F64),
              torch.randn(2, side, side, side, dtype=F64), torch.randn(2, side, side, 6, dtype=F64)]
    _check_pair(ref, fast, inputs, train=train)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("n", [49, 25])
def test_me_attention(n, train):
    ref, fast = _twins(R.MEAttention(16, CFG))
    _check_pair(ref, fast, [torch.randn(2, n, 16, dtype=F64)], train=train)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("side", [8, 7, 6, 1])
def test_cs_attention(side, train):
    ref, fast = _twins(R.CSAttention(8, CFG))
    _check_pair(ref, fast, [torch.randn(2, side * side, 8, dtype=F64)], train=train)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("side", [7, 4])
def test_ea_module(side, train):
    ref, fast = _twins(R.EAmodule(16, CFG))
    _check_pair(ref, fast, [torch.randn(1, side * side, 16, dtype=F64)], train=train)


def test_dead_parameters_get_zero_or_no_gradient():
    """The parameters the README lists as without effect: gradient 0 (or never used)."""
    ref, fast = _twins(R.EAmodule(16, CFG))
    x = torch.randn(2, 49, 16, dtype=F64)
    fast(x).square().sum().backward()
    for name in ("CSAttention.gaussiantrans.bias", "CSAttention.win_atten.attention.key_layer.bias",
                 "CSAttention.global_atten.key_layer.bias", "EAttention.query_liner.bias",
                 "EAttention.linear_0.bias", "ElayerNorm.bias"):
        grad = fast.get_parameter(name).grad
        assert grad.abs().max() < 1e-8, name
    for name in ("CSAttention.global_atten.out.weight", "CSAttention.global_atten.out.bias"):
        assert fast.get_parameter(name).grad is None, name


def _checkpoint_keys(prefix):
    keys = {}
    for line in KEYS_FILE.read_text().splitlines():
        name, shape = line.split("\t")
        if name.startswith(prefix):
            keys[name[len(prefix):]] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return keys


def test_ea_module_keys_match_the_mtunet_checkpoint():
    expected = _checkpoint_keys("encoder.0.block.0.")
    assert len(expected) == 34
    block = C.EAmodule(256)  # the original's signature: configs from the module-level dict
    got = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    assert got == expected
    cs = {k: tuple(v.shape) for k, v in C.CSAttention(256, C.MTUNET_CONFIGS).state_dict().items()}
    assert cs == {k[len("CSAttention."):]: v for k, v in expected.items() if k.startswith("CSAttention.")}
    ref = R.EAmodule(256)
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == expected
    block.load_state_dict(ref.state_dict(), strict=True)


def test_from_original_keeps_dtype_device_mode_and_round_trips():
    ref = R.EAmodule(16, CFG).to(F64).eval()
    fast = C.EAmodule.from_original(ref)
    assert not fast.training and not fast.CSAttention.training
    p = next(fast.parameters())
    assert p.dtype == F64 and p.device == next(ref.parameters()).device
    for name, t in ref.state_dict().items():
        torch.testing.assert_close(fast.state_dict()[name], t, rtol=0, atol=0)
    back = R.EAmodule(16, CFG).to(F64)
    back.load_state_dict(fast.state_dict(), strict=True)
    x = torch.randn(1, 36, 16, dtype=F64)
    torch.testing.assert_close(back(x), ref(x), rtol=0, atol=0)
    torch.testing.assert_close(fast(x), ref(x), **TIGHT)
    assert C.EAmodule.from_original(ref.train()).training


def test_compat_classes_cover_the_originals():
    assert set(C.COMPAT_CLASSES) == {"GaussianTrans", "Attention", "WinAttention", "DlightConv", "CSAttention",
                                     "MEAttention", "EAmodule", "encoder_block", "decoder_block", "MTUNet"}
    for name, cls in C.COMPAT_CLASSES.items():
        assert cls.__name__ == name and hasattr(cls, "from_original")


def test_from_original_of_a_foreign_module_raises():
    with pytest.raises(TypeError, match=r"MEAttention.from_original: Linear does not have the structure of the original MEAttention"):
        C.MEAttention.from_original(torch.nn.Linear(4, 4))


def test_win_attention_non_square_token_count_raises():
    with pytest.raises(ValueError, match=r"WinAttention: the token count must be a square h·h .* got n = 12"):
        C.WinAttention(CFG, 8)(torch.randn(1, 12, 8))


def test_win_attention_wrong_channels_raises():
    with pytest.raises(ValueError, match=r"WinAttention: argument 'x' must have shape \(B, N, C\) = \(\*, \*, 8\), got \(1, 16, 6\)"):
        C.WinAttention(CFG, 8)(torch.randn(1, 16, 6))


def test_cs_attention_window_size_other_than_four_raises():
    with pytest.raises(ValueError, match=r"CSAttention: configs\['win_size'\] must be 4 .* got 2"):
        C.CSAttention(8, {"win_size": 2, "head": 2})(torch.randn(1, 16, 8))


def test_dlight_conv_wrong_window_raises():
    with pytest.raises(ValueError, match=r"DlightConv: input must have shape \(\.\.\., win, c\) = \(\.\.\., 16, 6\), got \(1, 2, 2, 9, 6\)"):
        C.DlightConv(6, CFG)(torch.randn(1, 2, 2, 9, 6))


def test_gaussian_trans_wrong_input_raises():
    with pytest.raises(TypeError, match=r"GaussianTrans: input must be the tuple \(x, atten_x, atten_y, value\), got tuple of length 3"):
        C.GaussianTrans()((torch.randn(1, 2, 2, 3),) * 3)


def test_gaussian_trans_grid_mismatch_raises():
    x = torch.randn(1, 3, 3, 4)
    with pytest.raises(ValueError, match=r"GaussianTrans: x and value must share the grid"):
        C.GaussianTrans()((x, torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 4)))


def test_attention_axial_wrong_rank_raises():
    with pytest.raises(ValueError, match=r"Attention: input must have shape \(b, h, w, 12\), got \(2, 5, 12\)"):
        C.Attention(12, {"head": 3}, axial=True)(torch.randn(2, 5, 12))


def test_me_attention_wrong_input_raises():
    with pytest.raises(ValueError, match=r"MEAttention: argument 'x' must have shape \(B, N, C\) = \(\*, \*, 16\), got \(2, 4, 4, 16\)"):
        C.MEAttention(16, CFG)(torch.randn(2, 4, 4, 16))
