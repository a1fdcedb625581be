"""What a native extension must never do to a notebook: crash, leak, race, or give
different answers run to run."""

import multiprocessing
import os
import threading

import numpy as np
import pytest
import torch

import cnnboost
from cnnboost import _core, reference
from harness import twins


def test_a_panic_becomes_a_python_exception():
    with pytest.raises(RuntimeError, match="internal error.*boom"):
        _core._panic_in_kernel("boom")
    # and the pool still works afterwards
    out, _ = _core.FFC(1).forward(np.ones((2, 3)), np.ones((1, 3)), np.zeros((1, 3)), np.ones((2, 3)), np.zeros(2))
    assert out.shape == (2, 2)


def test_the_pool_follows_torch_unless_set():
    import cnnboost.ffc  # noqa: F401  (a torch module of cnnboost is imported)

    if not cnnboost._threads_chosen:
        assert cnnboost.get_num_threads() == torch.get_num_threads()


def test_the_pool_follows_torch_set_num_threads_at_the_next_call(monkeypatch):
    monkeypatch.setattr(cnnboost, "_threads_chosen", False)
    before = torch.get_num_threads()
    m = cnnboost.AB(8)
    x = torch.randn(4, 8, 3, 3)
    try:
        for n in (1, 3, before):
            torch.set_num_threads(n)
            expected = m(x)
            assert cnnboost.get_num_threads() == n
            torch.testing.assert_close(m(x), expected)
        monkeypatch.setattr(cnnboost, "_threads_chosen", True)  # cnnboost.set_num_threads was called
        torch.set_num_threads(2 if before != 2 else 1)
        m(x)
        assert cnnboost.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
        cnnboost._core.set_num_threads(before)


def test_set_num_threads():
    before = cnnboost.get_num_threads()
    try:
        cnnboost.set_num_threads(1)
        assert cnnboost.get_num_threads() == 1
        with pytest.raises(ValueError, match="num_threads"):
            cnnboost.set_num_threads(0)
    finally:
        cnnboost.set_num_threads(before)


# Each module with an input maker: (module factory, input for seed i, how to call).
MODULES = {
    "ffc": (lambda: cnnboost.FFC(64, 10), lambda g: torch.randn(16, 64, 2, 2, generator=g), lambda m, x: m(x)),
    "ssm": (lambda: cnnboost.SSM(64, 10), lambda g: torch.randn(16, 64, generator=g), lambda m, x: m(x)),
    "ab": (lambda: cnnboost.AB(16, groups=4), lambda g: torch.randn(8, 16, 5, 5, generator=g), lambda m, x: m(x)),
    "afi": (lambda: cnnboost.AFI(16), lambda g: torch.randn(3, 8, 16, 4, 4, generator=g), lambda m, x: m(list(x))),
}


# Where the kernels run: the calling thread's own pool, with the calling thread as
# its worker 0 (large calls, by default); the shared pool (where a thread's own pool
# cannot serve: after a thread-count change, in a forked child); the calling thread
# alone (small calls). (serial work, own pools) for `_set_serial_work`, `_set_own_pools`.
ROUTES = {"own-pool": (0, True), "shared-pool": (0, False), "calling-thread": (1 << 62, True)}


def _take(route):
    work, own_pools = ROUTES[route]
    cnnboost._core._set_serial_work(work)
    cnnboost._core._set_own_pools(own_pools)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", MODULES)
def test_many_python_threads_share_one_module(name, route):
    _take(route)
    make, data, call = MODULES[name]
    m = make().eval()  # eval: no running-stat updates racing between threads
    xs = [data(torch.Generator().manual_seed(i)) for i in range(8)]
    expected = [call(m, x).detach() for x in xs]
    results = [None] * len(xs)
    errors = []

    def work(i):
        try:
            for _ in range(20):
                results[i] = call(m, xs[i]).detach()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for r, e in zip(results, expected):
        assert torch.equal(r, e)


def _training_step(m, call, x):
    m.zero_grad()
    x = x.detach().requires_grad_()
    y = call(m, x)
    y.square().sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in m.parameters()] + list(m.buffers())


def _step_in_child(conn, make_state, call, x, threads):
    m = make_state()
    if threads:
        cnnboost.set_num_threads(threads)
    conn.send((cnnboost.get_num_threads(), [t.numpy() for t in _training_step(m, call, x)]))
    conn.close()


@pytest.mark.parametrize("name", MODULES)
def test_every_route_gives_the_same_training_step(name):
    """Small calls run on the calling thread, large ones in its own pool or the shared
    one: the kernels give the same values on any number of threads, so the step is the
    same bit for bit."""
    make, data, call = MODULES[name]
    x = data(torch.Generator().manual_seed(3))
    steps = {}
    for route in ROUTES:
        _take(route)
        torch.manual_seed(0)
        steps[route] = _training_step(make(), call, x)
    want = steps.pop("own-pool")
    for route, got in steps.items():
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert torch.equal(a, b), route


@pytest.mark.parametrize("name", MODULES)
def test_a_thread_count_change_after_the_first_call_gives_the_same_step(name):
    """A thread's own pool keeps the size it was built with (rayon cannot rebuild it),
    so after `set_num_threads` to another count the thread's calls go to the shared
    pool of the new size: same values, and the count the user set."""
    make, data, call = MODULES[name]
    x = data(torch.Generator().manual_seed(5))
    before = cnnboost.get_num_threads()
    torch.manual_seed(0)
    want = _training_step(make(), call, x)  # this thread's own pool exists now
    try:
        cnnboost.set_num_threads(before + 1)
        torch.manual_seed(0)
        got = _training_step(make(), call, x)
        assert cnnboost.get_num_threads() == before + 1
    finally:
        cnnboost.set_num_threads(before)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
@pytest.mark.parametrize(
    "threads, route", [(None, "own-pool"), (1, "own-pool"), (None, "shared-pool"), (None, "calling-thread")]
)
@pytest.mark.parametrize("name", MODULES)
def test_a_forked_child_computes_like_its_parent(name, threads, route):
    """multiprocessing's default start on Linux forks; the child has none of the
    parent's threads, so it must not wait on the parent's pools (it used to hang)."""
    _take(route)
    make, data, call = MODULES[name]
    torch.manual_seed(0)
    m = make()
    x = data(torch.Generator().manual_seed(1))
    _training_step(m, call, x)  # the parent's pool is running
    state = {k: v.clone() for k, v in m.state_dict().items()}

    def make_state():
        return m  # the child's copy of the module, as forked

    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_step_in_child, args=(child_end, make_state, call, x, threads))
    child.start()
    if not parent_end.poll(60):
        child.kill()
        child.join()
        pytest.fail("the forked child did not finish a training step in 60 s")
    child_threads, got = parent_end.recv()
    child.join()
    assert child.exitcode == 0
    assert child_threads == (threads or cnnboost.get_num_threads())
    m.load_state_dict(state)
    expected = _training_step(m, call, x)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b.numpy())


@pytest.mark.parametrize("name", MODULES)
def test_results_are_deterministic_run_to_run(name):
    make, data, call = MODULES[name]
    m = make()
    x = data(torch.Generator().manual_seed(0)).requires_grad_()
    runs = []
    for _ in range(3):
        m.zero_grad()
        x.grad = None
        y = call(m, x)
        y.square().sum().backward()
        runs.append([y.detach().clone(), x.grad.clone()] + [p.grad.clone() for p in m.parameters()])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_nan_and_inf_propagate_like_the_reference():
    fast, ref = twins(cnnboost.FFC, reference.FFC, 8, 3, dtype=torch.float64)
    x = torch.randn(4, 8, dtype=torch.float64)
    x[1, 2] = float("nan")
    x[2, 5] = float("inf")
    y, yr = fast(x), ref(x)
    assert torch.equal(torch.isnan(y), torch.isnan(yr))
    torch.testing.assert_close(y, yr, equal_nan=True)


def test_float32_tracks_float64_at_large_channel_counts():
    fast = cnnboost.FFC(8192, 16)
    x = torch.randn(8, 8192) * 3 + 10  # a large mean stresses the LayerNorm statistics
    y32 = fast(x).double()
    y64 = fast.double()(x.double())
    torch.testing.assert_close(y32, y64, rtol=1e-5, atol=1e-5 * y64.abs().max().item())


@pytest.mark.parametrize("name", MODULES)
def test_resident_memory_stays_flat_over_many_calls(name):
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    make, data, call = MODULES[name]
    m = make()
    x = data(torch.Generator().manual_seed(0)).requires_grad_()

    def step():
        y = call(m, x)
        y.sum().backward()

    for _ in range(500):
        step()
    # Two windows of 5,000 steps: a leak grows both (by 4 MiB each at ~840 bytes a
    # step), while an allocator or a thread growing its caches once, somewhere in the
    # run, grows one (a CI run once saw 9.6 MiB in one window of 10,000 steps; 50,000
    # steps of AFI grew 0.1 MiB in all on a rerun).
    rss = [proc.memory_info().rss]
    for _ in range(2):
        for _ in range(5_000):
            step()
        rss.append(proc.memory_info().rss)
    grown = [(b - a) / 2**20 for a, b in zip(rss, rss[1:])]
    assert min(grown) < 4, f"RSS grew in both windows of 5,000 steps: {grown[0]:.1f} and {grown[1]:.1f} MiB"


EMPTY_BATCHES = {
    "ffc-vote": (lambda: cnnboost.FFC(8, 3), lambda: torch.randn(0, 8), (0, 3)),
    "ffc-mean": (lambda: cnnboost.FFC(8, 3, eval_ensemble="mean"), lambda: torch.randn(0, 8, 2, 2), (0, 3)),
    "ssm": (lambda: cnnboost.SSM(8, 3), lambda: torch.randn(0, 8), (0, 3)),
    "ab": (lambda: cnnboost.AB(4, groups=2), lambda: torch.randn(0, 4, 3, 3), (0, 4, 3, 3)),
    "afi": (lambda: cnnboost.AFI(4), lambda: [torch.randn(0, 4, 3, 3) for _ in range(2)], (0, 4, 3, 3)),
}


@pytest.mark.usefixtures("each_backend")
@pytest.mark.parametrize("name", EMPTY_BATCHES)
def test_an_empty_eval_batch_gives_an_empty_result(name):
    make, data, shape = EMPTY_BATCHES[name]
    assert tuple(make().eval()(data()).shape) == shape
