"""The GRU step and its Jacobian: against nn.GRU, finite differences and closed forms."""
import math

import numpy as np
import pytest
import torch

import GRU_LE as G

F64 = torch.float64


def random_gru(inputs, hidden, bias, seed=0):
    torch.manual_seed(seed)
    return torch.nn.GRU(inputs, hidden, batch_first=True, bias=bias).to(F64)


def finite_difference_jacobian(gru, h, x, eps=1e-6):
    params = G.gru_params(gru)
    cols = []
    for j in range(h.shape[1]):
        e = torch.zeros_like(h)
        e[:, j] = eps
        cols.append((G.gru_cell(params, h + e, x) - G.gru_cell(params, h - e, x)) / (2 * eps))
    return torch.stack(cols, dim=-1)  # (B, H, H), column j = d h' / d h_j


@pytest.mark.parametrize("bias", [True, False])
def test_hand_written_step_matches_nn_gru_over_28_steps(bias):
    gru = random_gru(28, 20, bias)
    x = torch.rand(5, 28, 28, dtype=F64)
    h0 = torch.randn(1, 5, 20, dtype=F64)
    out, _ = gru(x, h0)
    params, h = G.gru_params(gru), h0[0]
    for t in range(28):
        h = G.gru_cell(params, h, x[:, t])
        assert torch.allclose(h, out[:, t], atol=1e-13, rtol=0)
        h_analytic, _ = G.gru_step_analytic(params, out[:, t - 1] if t else h0[0], x[:, t])
        assert torch.allclose(h_analytic, out[:, t], atol=1e-13, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("hidden", [1, 7, 33])
def test_jacobians_agree_with_each_other_and_finite_differences(bias, hidden):
    gru = random_gru(5, hidden, bias, seed=hidden)
    h = torch.randn(4, hidden, dtype=F64) * 0.8
    x = torch.randn(4, 5, dtype=F64)
    analytic = G.gru_jacobian_analytic(gru, h, x)
    autograd = G.gru_jacobian_autograd(gru, h, x)
    numeric = finite_difference_jacobian(gru, h, x)
    assert analytic.shape == (4, hidden, hidden)
    assert (analytic - autograd).abs().max() < 1e-13
    assert (analytic - numeric).abs().max() < 1e-8
    # the same step through both back-ends
    params = G.gru_params(gru)
    h1, _ = G.gru_step_analytic(params, h, x)
    h2, _ = G.gru_step_autograd(params, h, x)
    assert torch.allclose(h1, h2, atol=1e-14, rtol=0)


def test_the_diag_h_dz_dh_term_is_present():
    """The update gate's own dependence on h, diag(h - n) dz/dh, is easy to drop: with only
    W_hz non-zero, that term is the whole off-diagonal part of J."""
    gru = random_gru(3, 6, True)
    with torch.no_grad():
        for w in gru.parameters():
            w.zero_()
        gru.weight_hh_l0[6:12] = torch.randn(6, 6, dtype=F64)
    h, x = torch.randn(2, 6, dtype=F64), torch.zeros(2, 3, dtype=F64)
    jac = G.gru_jacobian_analytic(gru, h, x)
    off = jac - torch.diag_embed(jac.diagonal(dim1=1, dim2=2))
    assert off.abs().max() > 0.05
    assert (jac - finite_difference_jacobian(gru, h, x)).abs().max() < 1e-8


# ---- hand-set GRUs whose Jacobian is known in closed form, written out with numpy


def hand_gru(hidden, blocks, bias_hh=None, bias_ih=None, inputs=2):
    """nn.GRU with recurrent blocks {'r'|'z'|'n': (H, H) array}, all else zero."""
    gru = torch.nn.GRU(inputs, hidden, batch_first=True, bias=True).to(F64)
    with torch.no_grad():
        for w in gru.parameters():
            w.zero_()
        for gate, w in blocks.items():
            k = "rzn".index(gate)
            gru.weight_hh_l0[k * hidden:(k + 1) * hidden] = torch.as_tensor(w, dtype=F64)
        if bias_hh is not None:
            gru.bias_hh_l0.copy_(torch.as_tensor(bias_hh, dtype=F64))
        if bias_ih is not None:
            gru.bias_ih_l0.copy_(torch.as_tensor(bias_ih, dtype=F64))
    return gru


def sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


@pytest.mark.parametrize("step", [G.gru_step_analytic, G.gru_step_autograd])
def test_constant_update_gate_gives_scaled_identity(step):
    b_z = 0.7
    gru = hand_gru(4, {}, bias_hh=np.r_[np.zeros(4), np.full(4, b_z), np.zeros(4)])
    h, x = torch.randn(3, 4, dtype=F64), torch.randn(3, 2, dtype=F64)
    _, jac = step(G.gru_params(gru), h, x)
    assert torch.allclose(jac, sigmoid(b_z) * torch.eye(4, dtype=F64).expand(3, 4, 4),
                          atol=1e-15, rtol=0)
    # and every exponent of the map is ln sigmoid(b_z)
    spectrum = G.lyap_spectrum(G.gru_map(gru), h, torch.randn(3, 30, 2, dtype=F64))
    assert np.allclose(spectrum.numpy(), math.log(sigmoid(b_z)), atol=1e-12)


@pytest.mark.parametrize("step", [G.gru_step_analytic, G.gru_step_autograd])
def test_reset_gate_acts_after_the_recurrent_product_and_its_bias(step):
    """PyTorch: n = tanh(W_in x + b_in + r * (W_hn h + b_hn)). Scalar GRU, all known."""
    w_hr, w_hz, w_hn = 0.9, -0.6, 1.3
    b_hr, b_hz, b_hn = 0.2, 0.1, -0.8
    gru = hand_gru(1, {"r": [[w_hr]], "z": [[w_hz]], "n": [[w_hn]]},
                   bias_hh=[b_hr, b_hz, b_hn])
    h = 0.4
    r, z = sigmoid(w_hr * h + b_hr), sigmoid(w_hz * h + b_hz)
    g = w_hn * h + b_hn
    n = math.tanh(r * g)
    expected = (z + (1 - z) * (1 - n * n) * (r * w_hn + g * r * (1 - r) * w_hr)
                + (h - n) * z * (1 - z) * w_hz)
    # the variant that resets h before the product, tanh(W_hn (r h) + b_hn), differs
    n_before = math.tanh(w_hn * r * h + b_hn)
    before = (z + (1 - z) * (1 - n_before ** 2) * w_hn * (r + h * r * (1 - r) * w_hr)
              + (h - n_before) * z * (1 - z) * w_hz)
    assert abs(expected - before) > 1e-2
    _, jac = step(G.gru_params(gru), torch.tensor([[h]], dtype=F64),
                  torch.zeros(1, 2, dtype=F64))
    assert abs(jac.item() - expected) < 1e-14


@pytest.mark.parametrize("step", [G.gru_step_analytic, G.gru_step_autograd])
@pytest.mark.parametrize("gate", ["r", "z", "n"])
def test_weights_in_one_gate_block_only(step, gate):
    """Non-zero weights in one block (and b_hn = 0.5 so that r matters): a wrong
    r, z, n order or a transposed J changes these closed forms entry by entry."""
    hidden = 5
    rng = np.random.default_rng(1)
    w = rng.normal(size=(hidden, hidden))  # non-symmetric
    b_hn = np.full(hidden, 0.5)
    gru = hand_gru(hidden, {gate: w}, bias_hh=np.r_[np.zeros(2 * hidden), b_hn])
    h = rng.normal(size=(2, hidden)) * 0.7
    wh = h @ w.T  # (B, H): w @ h per sample
    eye = np.eye(hidden)
    expected = []
    for b in range(2):
        if gate == "r":  # z = 1/2, r = s(W h), n = tanh(r b_hn)
            r = sigmoid(wh[b])
            n = np.tanh(r * b_hn)
            jac = 0.5 * eye + 0.5 * ((1 - n ** 2) * b_hn * r * (1 - r))[:, None] * w
        elif gate == "z":  # r = 1/2, n = tanh(b_hn / 2), z = s(W h)
            z = sigmoid(wh[b])
            n = np.tanh(0.5 * b_hn)
            jac = np.diag(z) + ((h[b] - n) * z * (1 - z))[:, None] * w
        else:  # r = z = 1/2, n = tanh((W h + b_hn) / 2)
            n = np.tanh(0.5 * (wh[b] + b_hn))
            jac = 0.5 * eye + 0.5 * ((1 - n ** 2) * 0.5)[:, None] * w
        expected.append(jac)
    expected = np.stack(expected)
    _, got = step(G.gru_params(gru), torch.as_tensor(h), torch.zeros(2, 2, dtype=F64))
    assert np.abs(got.numpy() - expected).max() < 1e-14
    assert np.abs(expected - expected.transpose(0, 2, 1)).max() > 1e-2  # J is not J^T


def test_gru_params_rejects_stacked_grus():
    with pytest.raises(ValueError, match="one-layer"):
        G.gru_params(torch.nn.GRU(3, 4, num_layers=2))


def test_edge_init_is_orthogonal_with_update_gate_bias():
    model = G.GRUSMNIST(16)
    G.init_edge_of_chaos(model, "edge", generator=torch.Generator().manual_seed(0))
    w_hr, w_hz, w_hn = model.gru.weight_hh_l0.detach().view(3, 16, 16)
    for w, gain in ((w_hr, 1.0), (w_hz, 1.0), (w_hn, 2.0)):
        assert torch.allclose(w @ w.T, gain ** 2 * torch.eye(16), atol=1e-5)
    assert torch.all(model.gru.bias_hh_l0[16:32] == 1.0)
    assert torch.all(model.gru.bias_hh_l0[:16] == 0) and torch.all(model.gru.bias_ih_l0 == 0)


def test_uniform_init_stays_in_range_and_keeps_the_readout():
    model = G.GRUSMNIST(16)
    readout = model.readout.weight.detach().clone()
    G.init_edge_of_chaos(model, "uniform", p=0.3, generator=torch.Generator().manual_seed(0))
    for w in model.gru.parameters():
        assert w.abs().max() <= 0.3 and w.abs().max() > 0.25
    assert torch.equal(model.readout.weight, readout)
    with pytest.raises(ValueError):
        G.init_edge_of_chaos(model, "uniform", p=None)
