"""lyap_spectrum on maps with known exponents, identities, and the engine's plumbing."""
import math

import numpy as np
import pytest
import torch

import GRU_LE as G

F64 = torch.float64


def constant_map(matrix):
    """step for h -> A h with a fixed (n, n) matrix A."""
    a = torch.as_tensor(matrix, dtype=F64)

    def step(h, x):
        return h @ a.T, a.expand(len(h), *a.shape)

    return step


def no_input(batch, steps):
    return torch.zeros(batch, steps, 0, dtype=F64)


def test_diagonal_map_with_negative_entries():
    d = [-2.0, 0.5, -0.25, 1.5]
    spectrum = G.lyap_spectrum(constant_map(np.diag(d)), torch.ones(3, 4, dtype=F64),
                               no_input(3, 50))
    assert not torch.isnan(spectrum).any()
    expected = np.sort(np.log(np.abs(d)))[::-1]
    assert np.allclose(spectrum.numpy(), expected, atol=1e-12)


def test_identity_frame_starting_in_the_contracting_direction_is_still_sorted():
    spectrum = G.lyap_spectrum(constant_map(np.diag([0.5, 3.0])), torch.ones(2, 2, dtype=F64),
                               no_input(2, 40))
    assert np.allclose(spectrum.numpy(), [math.log(3.0), math.log(0.5)], atol=1e-12)


def test_uniform_contraction():
    spectrum = G.lyap_spectrum(constant_map(0.9 * np.eye(5)), torch.ones(1, 5, dtype=F64),
                               no_input(1, 20))
    assert np.allclose(spectrum.numpy(), math.log(0.9), atol=1e-13)


def test_non_normal_upper_triangular_map():
    a = np.array([[2.0, 5.0], [0.0, 0.5]])
    exact = [math.log(2.0), math.log(0.5)]
    identity = G.lyap_spectrum(constant_map(a), torch.ones(1, 2, dtype=F64), no_input(1, 30))
    assert np.allclose(identity.numpy(), exact, atol=1e-12)
    # from random frames the transient decays; warm-up removes it
    frame = G.random_frame(4, 2, 2, torch.Generator().manual_seed(0))
    rand = G.lyap_spectrum(constant_map(a), torch.ones(4, 2, dtype=F64), no_input(4, 300),
                           warmup=50, frame=frame)
    assert np.allclose(rand.numpy(), exact, atol=1e-10)


def henon_step(a=1.4, b=0.3):
    def step(h, x):
        u, v = h[:, 0], h[:, 1]
        jac = torch.zeros(len(h), 2, 2, dtype=h.dtype)
        jac[:, 0, 0] = -2 * a * u
        jac[:, 0, 1] = 1.0
        jac[:, 1, 0] = b
        return torch.stack([1 - a * u * u + v, b * u], dim=1), jac

    return step


def test_henon_map_long_run():
    """Hénon map a = 1.4, b = 0.3: 0.4192 and -1.6232; their sum is ln 0.3 exactly."""
    batch, steps = 32, 40_000
    h0 = 0.1 * torch.rand(batch, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    spectrum = G.lyap_spectrum(henon_step(), h0, no_input(batch, steps), warmup=1000)
    mean = spectrum.mean(0).numpy()
    assert abs(mean[0] - 0.4192) < 2e-3
    assert abs(mean[1] - (-1.6232)) < 2e-3
    assert np.allclose(spectrum.sum(1).numpy(), math.log(0.3), atol=1e-10, rtol=0)


def test_logistic_map_at_r4_has_exponent_ln2():
    def step(h, x):
        return 4 * h * (1 - h), (4 - 8 * h).unsqueeze(-1)

    h0 = torch.rand(16, 1, generator=torch.Generator().manual_seed(1), dtype=F64) * 0.8 + 0.1
    spectrum = G.lyap_spectrum(step, h0, no_input(16, 100_000), warmup=100)
    assert abs(spectrum.mean().item() - math.log(2)) < 5e-3


def gru_and_drive(hidden, bias, seed=0, steps=60):
    torch.manual_seed(seed)
    gru = torch.nn.GRU(28, hidden, batch_first=True, bias=bias)
    G.init_edge_of_chaos(gru, "uniform", p=1.5 / math.sqrt(hidden),
                         generator=torch.Generator().manual_seed(seed))
    inputs = torch.rand(3, steps, 28, generator=torch.Generator().manual_seed(seed),
                        dtype=F64)
    return gru, inputs


@pytest.mark.parametrize("bias", [True, False])
def test_sum_of_exponents_is_mean_log_det(bias):
    hidden, warmup = 24, 20
    gru, inputs = gru_and_drive(hidden, bias)
    h0 = torch.zeros(3, hidden, dtype=F64)
    spectrum = G.lyap_spectrum(G.gru_map(gru), h0, inputs, warmup=warmup)

    step, h, logdet = G.gru_map(gru), h0, torch.zeros(3, dtype=F64)
    for t in range(inputs.shape[1]):
        h, jac = step(h, inputs[:, t])
        if t >= warmup:
            logdet += torch.linalg.slogdet(jac).logabsdet
    expected = logdet / (inputs.shape[1] - warmup)
    assert torch.allclose(spectrum.sum(1), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_back_ends_give_the_same_spectrum_in_float64(bias):
    gru, inputs = gru_and_drive(32, bias, seed=3)
    h0 = torch.zeros(3, 32, dtype=F64)
    frame = G.random_frame(3, 32, 32, torch.Generator().manual_seed(0))
    a = G.lyap_spectrum(G.gru_map(gru, "analytic"), h0, inputs, warmup=28, frame=frame)
    b = G.lyap_spectrum(G.gru_map(gru, "autograd"), h0, inputs, warmup=28, frame=frame)
    assert (a - b).abs().max() < 1e-10
    assert torch.all(a[:, :-1] >= a[:, 1:])  # rows sorted, descending


def test_float32_products_stay_close_to_float64():
    """README: float32 Jacobians and QR with float64 sums agree with float64 to 1e-4."""
    gru, inputs = gru_and_drive(64, True, seed=5)
    out = {}
    for dtype in (torch.float32, torch.float64):
        h0 = torch.zeros(3, 64, dtype=dtype)
        frame = G.random_frame(3, 64, 64, torch.Generator().manual_seed(0), dtype)
        out[dtype] = G.lyap_spectrum(G.gru_map(gru, dtype=dtype), h0, inputs.to(dtype),
                                     warmup=28, frame=frame)
    assert out[torch.float32].dtype == F64
    assert (out[torch.float32] - out[torch.float64]).abs().max() < 1e-4


def test_fewer_exponents_are_the_top_of_the_full_spectrum():
    gru, inputs = gru_and_drive(16, True, seed=2, steps=400)
    h0 = torch.zeros(3, 16, dtype=F64)
    full = G.lyap_spectrum(G.gru_map(gru), h0, inputs, warmup=100)
    top = G.lyap_spectrum(G.gru_map(gru), h0, inputs, k=3, warmup=100)
    assert top.shape == (3, 3)
    assert (top - full[:, :3]).abs().max() < 1e-12  # QR keeps leading columns


def test_zero_jacobian_gives_minus_infinity_with_a_warning_not_nan():
    def step(h, x):  # kills the second direction at step 5, then identity
        jac = torch.eye(2, dtype=F64).repeat(len(h), 1, 1)
        if x[0, 0] == 5:
            jac[:, 1, 1] = 0.0
        return h, jac

    inputs = torch.arange(10, dtype=F64).view(1, 10, 1).repeat(2, 1, 1)
    with pytest.warns(RuntimeWarning, match="-inf"):
        spectrum = G.lyap_spectrum(step, torch.ones(2, 2, dtype=F64), inputs)
    assert not torch.isnan(spectrum).any()
    assert torch.all(spectrum[:, 0] == 0.0) and torch.all(torch.isneginf(spectrum[:, 1]))

    with pytest.warns(RuntimeWarning):
        dead = G.lyap_spectrum(lambda h, x: (h, torch.zeros(len(h), 3, 3, dtype=F64)),
                               torch.ones(1, 3, dtype=F64), no_input(1, 4))
    assert torch.all(torch.isneginf(dead))


def test_bad_arguments_are_refused():
    step = constant_map(np.eye(2))
    with pytest.raises(ValueError, match="warmup"):
        G.lyap_spectrum(step, torch.ones(1, 2, dtype=F64), no_input(1, 5), warmup=5)
    with pytest.raises(ValueError, match="k must be"):
        G.lyap_spectrum(step, torch.ones(1, 2, dtype=F64), no_input(1, 5), k=3)


def test_kaplan_yorke_dimension():
    assert G.kaplan_yorke([0.5, -1.0, -2.0]) == pytest.approx(1.5)
    assert G.kaplan_yorke([0.4192, -1.6232]) == pytest.approx(1 + 0.4192 / 1.6232)
    assert G.kaplan_yorke([-0.1, -0.2]) == 0.0
    assert G.kaplan_yorke([0.3, 0.1]) == 2.0
    assert G.kaplan_yorke([1.0, 0.0, -0.5, -2.0]) == pytest.approx(3.25)


def test_qr_device_choice_uses_the_timing():
    def timer(fast):
        return lambda device, shape, dtype, source: 1.0 if device.type == fast else 2.0

    shape = (15, 512, 512)
    assert G.pick_qr_device("cpu", shape, F64, timer=timer("cuda")).type == "cpu"
    assert G.pick_qr_device("cuda", shape, F64, timer=timer("cpu")).type == "cpu"
    assert G.pick_qr_device("cuda", shape, F64, timer=timer("cuda")).type == "cuda"


def test_out_of_memory_is_retried_in_smaller_chunks():
    calls = []

    def work(rows):
        size = min(rows.stop, 10) - rows.start
        calls.append(size)
        if size > 3:
            raise torch.OutOfMemoryError("injected")
        return torch.arange(rows.start, rows.start + size)

    out = G.in_chunks(work, 10)
    assert torch.equal(out, torch.arange(10))
    assert calls == [10, 5, 3, 3, 3, 1]

    def never(rows):
        raise torch.OutOfMemoryError("injected")

    with pytest.raises(torch.OutOfMemoryError):  # one row at a time still fails: give up
        G.in_chunks(never, 4)
