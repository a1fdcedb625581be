"""The gradient of a pooled 4-d input (FFC and SSM average-pool [N, C, H, W]): a
broadcast view where it flows on, written out by the kernels where torch stores it
(a leaf), the reference's numbers either way."""

import numpy as np
import pytest
import torch

import cnnboost
from cnnboost import _core, reference
from cnnboost._torch import expand_planes
from harness import assert_close, twins

HEADS = {
    "ffc": lambda dtype: twins(cnnboost.FFC, reference.FFC, 12, 5, dtype=dtype, seed=3),
    "ssm": lambda dtype: twins(cnnboost.SSM, reference.SSM, 12, 5, 3, dtype=dtype, seed=3),
}


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_leaf_input_gets_a_full_gradient_in_its_layout(head, dtype, layout):
    fast, ref = HEADS[head](dtype)
    x = torch.randn(6, 12, 3, 4, dtype=dtype).contiguous(memory_format=layout).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    weight = torch.randn(6, 5, dtype=dtype)
    (fast(x) * weight).sum().backward()
    (ref(x_ref) * weight).sum().backward()
    assert x.grad.is_contiguous(memory_format=layout) and x.grad.shape == x.shape
    assert_close(x.grad, x_ref.grad, dtype, "grad of x")


@pytest.mark.parametrize("head", sorted(HEADS))
def test_gradient_flowing_on_is_a_broadcast_view(head):
    fast, ref = HEADS[head](torch.float64)
    leaf = torch.randn(6, 12, 3, 4, dtype=torch.float64, requires_grad=True)
    x = leaf * 2  # not a leaf: its gradient goes on to the multiplication's backward
    g = torch.autograd.grad(fast(x).sum(), x)[0]
    assert g.stride()[2:] == (0, 0), "no [N, C, H, W] buffer for a gradient that flows on"
    g_ref = torch.autograd.grad(ref(x).sum(), x)[0]
    assert_close(g, g_ref, torch.float64, "grad of x")


def test_accumulates_into_an_existing_grad():
    fast, ref = HEADS["ffc"](torch.float64)
    x = torch.randn(6, 12, 3, 4, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    for _ in range(2):
        fast(x).sum().backward()
        ref(x_ref).sum().backward()
    assert_close(x.grad, x_ref.grad, torch.float64, "grad of x after two steps")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_core_expand_planes(dtype):
    values = np.arange(12, dtype=dtype).reshape(3, 4)
    out = _core.expand_planes(values, 5)
    assert out.dtype == dtype and out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, np.repeat(values[:, :, None], 5, axis=2))
    assert _core.expand_planes(values, 0).shape == (3, 4, 0)
    rows = _core.expand_planes(values, 5, channels_last=True)
    assert rows.dtype == dtype and rows.shape == (3, 5, 4)
    np.testing.assert_array_equal(rows, np.repeat(values[:, None, :], 5, axis=1))


def test_core_expand_planes_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="hw: expected an integer >= 0, got -1"):
        _core.expand_planes(np.zeros((2, 2)), -1)
    with pytest.raises(TypeError, match="values"):
        _core.expand_planes(np.zeros((2, 2), dtype=np.int32), 3)
    with pytest.raises(ValueError, match=r"values: expected .*\[N, C\]"):
        _core.expand_planes(np.zeros((2, 2, 2)), 3, channels_last=True)


@pytest.mark.parametrize("channels_last", [False, True])
def test_expand_planes_op_passes_opcheck(channels_last):
    torch.library.opcheck(expand_planes.custom, (torch.randn(3, 4), 6, channels_last))
