#!/usr/bin/env python3
"""How fast is lyap_spectrum, against the QR method's floor and the earlier way?

For the full spectrum of a GRU (H = 64 and 512), a batch of 15 sequences, 28 warm-up
plus 28 measured steps, in one process and one run, it times:

  floor     the same number of batched J @ Q products and torch.linalg.qr calls alone,
            on random matrices of the same shapes and dtype;
  analytic  lyap_spectrum with the closed-form Jacobian;
  autograd  lyap_spectrum with the torch.func Jacobian;
  float32   analytic with float32 products (log|R_ii| still summed in float64);
  earlier   one sequence at a time, per step torch.autograd.functional.jacobian with its
            default settings and a QR, float64 (two sequences timed, scaled to 15).

and prints times, ratios, and the peak memory of each case as the rise over the resident
size right after `import torch`. Run it with nothing else on the machine:

    python benchmarks/bench_lyap.py [--device cpu] [--repeats 3]
"""
import argparse
import math
import subprocess
import sys
import time
from pathlib import Path


def rss_mib(field):
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return math.nan


import torch  # noqa: E402  (measured: the resident size right after this import)

BASE_MIB = rss_mib("VmRSS")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import GRU_LE as G  # noqa: E402

BATCH, WARMUP, MEASURED = 15, 28, 28


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats):
    """Best wall time of `repeats` calls, after one warm-up call."""
    fn()  # library initialisation, allocator
    best = math.inf
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def peak_rise(case, hidden, device):
    """Peak resident size of one call of `case`, in a fresh process, minus that process's
    size right after `import torch` (MiB); on CUDA, the peak of allocated GPU memory."""
    proc = subprocess.run([sys.executable, __file__, "--memory-of", case, "--sizes",
                           str(hidden), "--device", str(device)],
                          capture_output=True, text=True, check=True)
    return float(proc.stdout.split()[-1])


def floor(hidden, dtype, device):
    jac = torch.randn(BATCH, hidden, hidden, dtype=dtype, device=device) / math.sqrt(hidden)
    frame = torch.linalg.qr(torch.randn(BATCH, hidden, hidden, dtype=dtype, device=device))[0]

    def run():
        q = frame
        for _ in range(WARMUP + MEASURED):
            q, r = torch.linalg.qr(jac @ q)
        return r

    return run


def make_case(hidden, device):
    torch.manual_seed(0)
    gru = torch.nn.GRU(28, hidden, batch_first=True)
    G.init_edge_of_chaos(gru, "edge", generator=torch.Generator().manual_seed(0))
    rows = torch.rand(BATCH, 28, 28, generator=torch.Generator().manual_seed(1))
    inputs = torch.cat([rows, rows], 1)  # (B, 56, 28), like the digits protocol
    frame = G.random_frame(BATCH, hidden, hidden, torch.Generator().manual_seed(2))
    return gru.to(device), inputs.to(device), frame.to(device)


def ours(gru, inputs, frame, jacobian, dtype, device):
    step = G.gru_map(gru, jacobian, dtype, device)
    h0 = torch.zeros(BATCH, gru.hidden_size, dtype=dtype, device=device)
    x, q = inputs.to(dtype), frame.to(dtype)
    return lambda: G.lyap_spectrum(step, h0, x, warmup=WARMUP, frame=q)


def earlier(gru, inputs, sequences=2):
    """Per sequence and step: autograd.functional.jacobian (defaults) of the module's
    step, QR, float64."""
    gru64 = torch.nn.GRU(gru.input_size, gru.hidden_size, batch_first=True).double()
    gru64.load_state_dict(gru.state_dict())
    hidden = gru.hidden_size

    def run():
        for b in range(sequences):
            h = torch.zeros(1, 1, hidden, dtype=torch.float64)
            q = torch.eye(hidden, dtype=torch.float64)
            total = torch.zeros(hidden, dtype=torch.float64)
            for t in range(WARMUP + MEASURED):
                x = inputs[b:b + 1, t:t + 1].double().cpu()

                def cell(state):
                    return gru64(x, state.view(1, 1, hidden))[1].view(hidden)

                jac = torch.autograd.functional.jacobian(cell, h.view(hidden))
                h = gru64(x, h)[1].detach()
                q, r = torch.linalg.qr(jac @ q)
                if t >= WARMUP:
                    total += r.diagonal().abs().log()
        return total

    return run


def cases(hidden, device):
    gru, inputs, frame = make_case(hidden, device)
    f64, f32 = torch.float64, torch.float32
    return {
        "floor": floor(hidden, f64, device),
        "analytic": ours(gru, inputs, frame, "analytic", f64, device),
        "autograd": ours(gru, inputs, frame, "autograd", f64, device),
        "float32": ours(gru, inputs, frame, "analytic", f32, device),
        "earlier": earlier(gru.cpu(), inputs.cpu()),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per case (default: 3)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 512], metavar="H",
                    help="hidden sizes (default: 64 512)")
    ap.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.memory_of:  # child process of peak_rise
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        cases(args.sizes[0], device)[args.memory_of]()
        if device.type == "cuda":
            print(torch.cuda.max_memory_allocated(device) / 2**20)
        else:
            print(rss_mib("VmHWM") - BASE_MIB)
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}; "
          f"batch {BATCH}, {WARMUP} + {MEASURED} steps, full spectrum, float64 unless said; "
          f"resident after import torch: {BASE_MIB:.0f} MiB")
    for hidden in args.sizes:
        fns = cases(hidden, device)
        times = {name: timed(fn, device if name != "earlier" else torch.device("cpu"),
                             args.repeats if name != "earlier" else 1)
                 for name, fn in fns.items()}
        times["earlier"] *= BATCH / 2  # two sequences timed
        s64, s32 = fns["analytic"](), fns["float32"]()
        print(f"\nH = {hidden}")
        for name, label in (("floor", "floor (J@Q + QR)"), ("analytic", "analytic"),
                            ("autograd", "autograd"), ("float32", "analytic float32"),
                            ("earlier", "earlier way (x15/2)")):
            rise = peak_rise(name, hidden, device)
            print(f"  {label:22s} {times[name]:9.3f} s   peak rise {rise:7.1f} MiB")
        print(f"  analytic / floor        {times['analytic'] / times['floor']:6.2f}x   "
              f"(target <= 1.3)")
        print(f"  autograd / analytic     {times['autograd'] / times['analytic']:6.2f}x   "
              f"(target <= 3)")
        print(f"  earlier / analytic      {times['earlier'] / times['analytic']:6.1f}x   "
              f"(target >= {25 if hidden <= 64 else 8})")
        print(f"  float32 vs float64      max |d lambda| = {(s32 - s64).abs().max():.2e}, "
              f"time {times['float32'] / times['analytic']:.2f}x")


if __name__ == "__main__":
    main()
