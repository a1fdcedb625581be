"""The batch norms' running-statistics update (cnnboost._torch.update_running_stats_of):
in eager mode on CPU one call to the extension (_core.update_running_stats) writes
the buffers in place; traced or on a GPU, torch's ops. Both must give torch's values,
bit for bit, and a bad call must write nothing."""

import numpy as np
import pytest
import torch

import cnnboost
from cnnboost import _core, _torch

WIDTHS = (3, 5, 7)
real = _core.update_running_stats


def batch_norms(dtype, momentum, seed):
    g = torch.Generator().manual_seed(seed)
    bns = [torch.nn.BatchNorm2d(c, momentum=momentum).to(dtype) for c in WIDTHS]
    for i, bn in enumerate(bns):
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g, dtype=dtype))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g, dtype=dtype) + 0.5)
        bn.num_batches_tracked.fill_(i + 1)
    return bns


def state(bns):
    return [{k: v.clone() for k, v in bn.state_dict().items()} for bn in bns]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, 0.37, None])
def test_extension_update_equals_torch_ops_bit_for_bit(dtype, momentum, monkeypatch):
    fast, torch_route = batch_norms(dtype, momentum, 1), batch_norms(dtype, momentum, 1)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        means = [torch.randn(c, generator=g, dtype=dtype) for c in WIDTHS]
        variances = [torch.rand(c, generator=g, dtype=dtype) for c in WIDTHS]
        calls = []
        monkeypatch.setattr(_core, "update_running_stats", lambda *a: calls.append(1) or real(*a))
        versions = [bn.running_mean._version for bn in fast]
        _torch.update_running_stats_of(fast, means, variances)
        assert calls, "the eager CPU route goes through the extension"
        # Autograd sees the in-place change, as it sees torch's ops.
        assert all(bn.running_mean._version > v for bn, v in zip(fast, versions))
        with monkeypatch.context() as m:
            m.setattr(torch.compiler, "is_compiling", lambda: True)  # torch's ops, as when traced
            _torch.update_running_stats_of(torch_route, means, variances)
        for a, b in zip(state(fast), state(torch_route)):
            for k in a:
                assert torch.equal(a[k], b[k]), k
    assert all(int(bn.num_batches_tracked) == i + 4 for i, bn in enumerate(fast))



def test_autograd_refuses_a_running_mean_changed_after_it_was_saved():
    # A buffer an eval-mode batch norm saved for its backward, then updated in place:
    # autograd must refuse the stale value, as it does after torch's own update.
    bn = torch.nn.BatchNorm2d(3).double().eval()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    y = torch.nn.functional.batch_norm(x, bn.running_mean, bn.running_var, training=False)
    _torch.update_running_stats(bn, torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_extension_update_equals_torch_batch_norm():
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(4, momentum=0.2).double()
    ours = torch.nn.BatchNorm2d(4, momentum=0.2).double()
    bn(x)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True)
    _torch.update_running_stats(ours, mean, var)
    torch.testing.assert_close(ours.running_mean, bn.running_mean, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(ours.running_var, bn.running_var, rtol=1e-14, atol=1e-15)
    assert int(ours.num_batches_tracked) == int(bn.num_batches_tracked) == 1


def arrays(c=4, dtype=np.float32):
    return dict(
        running_means=[np.zeros(c, dtype)], running_vars=[np.ones(c, dtype)], counts=[np.zeros((), np.int64)],
        means=[np.full(c, 2, dtype)], variances=[np.full(c, 3, dtype)], momentum=0.5,
    )


@pytest.mark.parametrize(
    "arg, bad, error, words",
    [
        ("running_vars", [np.ones(5, np.float32)], ValueError, "running_vars[1]: expected shape (4,), got [5]"),
        ("means", [np.ones(4, np.float64)], TypeError, "means[1]: expected dtype float32"),
        ("counts", [np.zeros((), np.int32)], TypeError, "counts[1]: expected one int64"),
        ("variances", None, ValueError, "variances: expected 2 arrays (one per running mean), got 1"),
        ("momentum", float("nan"), ValueError, "momentum: expected a finite number or None, got NaN"),
        ("running_means", ["x"], TypeError, "running_means[1]: expected a NumPy array"),
    ],
)
def test_bad_arguments_raise_and_write_nothing(arg, bad, error, words):
    # Two batch norms, the second one bad: nothing of the first may be written either.
    a, second = arrays(), arrays()
    for k in ("running_means", "running_vars", "counts", "means", "variances"):
        a[k] = a[k] + second[k]
    if arg == "momentum":
        a[arg] = bad
    else:
        a[arg] = a[arg][:1] + (bad or [])
    before = [x.copy() for k in ("running_means", "running_vars", "counts") for x in a[k] if isinstance(x, np.ndarray)]
    with pytest.raises(error) as info:
        _core.update_running_stats(**a)
    assert words in str(info.value)
    after = [x for k in ("running_means", "running_vars", "counts") for x in a[k] if isinstance(x, np.ndarray)]
    for x, y in zip(before, after):
        np.testing.assert_array_equal(x, y)


def test_an_array_both_read_and_written_is_refused():
    a = arrays()
    a["means"] = a["running_means"]
    with pytest.raises(ValueError, match="means\\[0\\]"):
        _core.update_running_stats(**a)
    np.testing.assert_array_equal(a["running_means"][0], 0)


def test_a_read_only_buffer_is_refused():
    a = arrays()
    a["running_vars"][0].flags.writeable = False
    with pytest.raises(ValueError, match="running_vars\\[0\\]: expected a writeable array"):
        _core.update_running_stats(**a)
    np.testing.assert_array_equal(a["running_means"][0], 0)
    assert int(a["counts"][0]) == 0


@pytest.mark.parametrize("module", ["ab", "ssm"])
def test_modules_update_through_the_extension_in_eager_mode(module, monkeypatch):
    calls = []
    monkeypatch.setattr(_core, "update_running_stats", lambda *a: calls.append(len(a[0])) or real(*a))
    if module == "ab":
        m, x = cnnboost.AB(6), torch.randn(4, 6, 3, 3)
    else:
        m, x = cnnboost.SSM(6, 5, num_heads=3), torch.randn(4, 6)
    m(x)
    assert calls == [1 if module == "ab" else len(m.bns)]
