"""The command line on real MNIST: outputs, resume, failed trials, bad input, determinism."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import GRU_LE as G

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "GRU_LE.py"
TINY = ["--hidden", "12", "--epochs", "1", "--train-limit", "1500", "--batch-size", "100",
        "--le-batch", "3", "--le-warmup", "20", "--le-steps", "10", "--min-accuracy", "0",
        "--threads", "1"]


def run(tmp, mnist_dir, *extra, out="out"):
    """GRU_LE.main in this process, tiny settings; returns (exit code, out dir)."""
    out_dir = Path(tmp) / out
    argv = TINY + ["--data-dir", str(mnist_dir), "--out-dir", str(out_dir), *extra]
    return G.main(argv), out_dir


def cli(*args, **kw):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, cwd=kw.pop("cwd", ROOT), **kw)


def load(out_dir, name):
    return np.load(Path(out_dir) / name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_dir):
    """An uninterrupted three-trial run, the baseline for resume and determinism."""
    code, out_dir = run(tmp_path_factory.mktemp("ref"), mnist_dir, "--trials", "3")
    assert code == 0
    return out_dir


def test_smnist_rows_are_time_steps(mnist_dir):
    x_train, y_train, x_test, y_test = G.load_smnist(mnist_dir)
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    raw = np.fromfile(mnist_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte", np.uint8)
    images = raw[16:].reshape(10000, 28, 28)  # IDX: row-major, 28 rows of 28 pixels
    labels = np.fromfile(mnist_dir / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", np.uint8)
    for i in (0, 1234, 9999):
        for t in (0, 13, 27):  # step t of the sequence is pixel row t
            assert np.allclose(x_test[i, t].numpy(), images[i, t] / 255.0, atol=1e-7)
    assert np.array_equal(y_test.numpy(), labels[8:])
    assert 0.0 <= x_train.min() and x_train.max() == 1.0


def test_batches_cover_each_image_once_per_pass():
    x, y = torch.arange(10.0).view(10, 1, 1), torch.arange(10)
    batches = G.Batches(x, y, 4, torch.Generator().manual_seed(0))
    assert len(batches) == 3
    first = torch.cat([b for _, b in batches])
    second = torch.cat([b for _, b in batches])
    assert sorted(first.tolist()) == list(range(10)) and not torch.equal(first, second)


def test_smoke_run_writes_every_output(tmp_path, mnist_dir):
    """The real script in a subprocess, on a few thousand real images."""
    out_dir = tmp_path / "smoke"
    proc = cli("--hidden", "16", "--epochs", "1", "--train-limit", "3000", "--trials", "2",
               "--le-batch", "4", "--min-accuracy", "0", "--init", "uniform",
               "--data-dir", str(mnist_dir), "--out-dir", str(out_dir))
    assert proc.returncode == 0, proc.stderr
    for name in ("lyap_spectrum_T1.npy", "lyap_spectrum_T2.npy", "lyap_spectrum_mean.npy",
                 "lyap_spectrum_mean.png", "accuracy_vs_lyapunov.png", "run.json"):
        assert (out_dir / name).stat().st_size > 0, name
    trials = np.stack([load(out_dir, f"lyap_spectrum_T{i}.npy") for i in (1, 2)])
    assert trials.shape == (2, 16) and np.all(np.diff(trials, axis=1) <= 0)
    assert np.allclose(load(out_dir, "lyap_spectrum_mean.npy"), trials.mean(0))
    assert (out_dir / "lyap_spectrum_mean.png").read_bytes()[:4] == b"\x89PNG"

    info = json.loads((out_dir / "run.json").read_text())
    assert info["settings"]["hidden"] == 16 and info["units"] == "nats per step"
    assert [r["trial"] for r in info["trials"]] == [1, 2]
    for r in info["trials"]:
        assert 0.1 <= r["p"] <= 3.0 and 0 < r["test_accuracy"] <= 1 and r["time_s"] > 0
        assert set(r["lyap_max_noise"]) == {"100", "200"}
    mean = info["mean"]
    assert mean["spread_across"] == "trials" and len(mean["stderr"]) == 16
    assert mean["lyap_max"] == pytest.approx(trials.mean(0)[0])
    assert mean["kaplan_yorke_dimension"] == pytest.approx(G.kaplan_yorke(trials.mean(0)))
    assert {"torch", "numpy", "device"} <= set(info["environment"])
    assert "NaN" not in (out_dir / "run.json").read_text()


def test_same_seed_gives_bit_identical_spectra(tmp_path, mnist_dir, reference):
    code, out_dir = run(tmp_path, mnist_dir, "--trials", "3")
    assert code == 0
    for name in ("lyap_spectrum_T1.npy", "lyap_spectrum_T3.npy", "lyap_spectrum_mean.npy"):
        assert np.array_equal(load(out_dir, name), load(reference, name))


def test_changing_trials_does_not_change_trial_one(tmp_path, mnist_dir, reference):
    code, out_dir = run(tmp_path, mnist_dir, "--trials", "1")
    assert code == 0
    assert np.array_equal(load(out_dir, "lyap_spectrum_T1.npy"),
                          load(reference, "lyap_spectrum_T1.npy"))
    info = json.loads((out_dir / "run.json").read_text())
    assert info["mean"]["spread_across"] == "LE batch"


def test_other_seed_gives_other_numbers(tmp_path, mnist_dir, reference):
    code, out_dir = run(tmp_path, mnist_dir, "--trials", "1", "--seed", "7")
    assert code == 0
    assert not np.array_equal(load(out_dir, "lyap_spectrum_T1.npy"),
                              load(reference, "lyap_spectrum_T1.npy"))


def test_killed_run_resumes_to_the_same_mean(tmp_path, mnist_dir, reference):
    out_dir = tmp_path / "killed"
    args = [sys.executable, str(SCRIPT), *TINY, "--trials", "3",
            "--data-dir", str(mnist_dir), "--out-dir", str(out_dir)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if len(json.loads((out_dir / "run.json").read_text())["trials"]) >= 1:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = json.loads((out_dir / "run.json").read_text())["trials"]
    assert 1 <= len(finished) < 3, "the kill came too late to test a resume"

    resumed = cli(*args[2:])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout + resumed.stderr
    assert np.array_equal(load(out_dir, "lyap_spectrum_mean.npy"),
                          load(reference, "lyap_spectrum_mean.npy"))


def test_more_trials_extend_a_finished_run(tmp_path, mnist_dir, reference):
    assert run(tmp_path, mnist_dir, "--trials", "2")[0] == 0
    before = (tmp_path / "out" / "lyap_spectrum_T1.npy").stat().st_mtime_ns
    code, out_dir = run(tmp_path, mnist_dir, "--trials", "3")
    assert code == 0
    assert (out_dir / "lyap_spectrum_T1.npy").stat().st_mtime_ns == before  # not redone
    assert np.array_equal(load(out_dir, "lyap_spectrum_mean.npy"),
                          load(reference, "lyap_spectrum_mean.npy"))


def test_torn_trial_file_is_redone(tmp_path, mnist_dir, reference, capsys):
    assert run(tmp_path, mnist_dir, "--trials", "2")[0] == 0
    torn = tmp_path / "out" / "lyap_spectrum_T2.npy"
    torn.write_bytes(torn.read_bytes()[:40])
    code, out_dir = run(tmp_path, mnist_dir, "--trials", "2")
    assert code == 0
    assert "trial 2: result file unreadable, redoing it" in capsys.readouterr().err
    assert np.array_equal(load(out_dir, "lyap_spectrum_T2.npy"),
                          load(reference, "lyap_spectrum_T2.npy"))


def test_changed_settings_are_refused_unless_overwrite(tmp_path, mnist_dir, capsys):
    assert run(tmp_path, mnist_dir)[0] == 0
    capsys.readouterr()
    assert run(tmp_path, mnist_dir, "--lr", "0.01")[0] == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lr 0.001 -> 0.01" in err and "--overwrite" in err
    code, out_dir = run(tmp_path, mnist_dir, "--lr", "0.01", "--overwrite")
    assert code == 0
    assert json.loads((out_dir / "run.json").read_text())["settings"]["lr"] == 0.01


def test_overwrite_deletes_only_our_files_and_only_after_every_check(tmp_path, mnist_dir):
    assert run(tmp_path, mnist_dir, "--trials", "2")[0] == 0
    out_dir = tmp_path / "out"
    (out_dir / "notes.png").write_text("a figure of the user's")
    (out_dir / "lyap_spectrum_other.npy").write_text("not ours")
    before = sorted(p.name for p in out_dir.iterdir())

    broken = tmp_path / "broken" / "MNIST" / "raw"
    shutil.copytree(mnist_dir / "MNIST" / "raw", broken)
    (broken / "train-labels-idx1-ubyte").write_bytes(b"truncated")
    code = G.main(TINY + ["--lr", "0.01", "--overwrite", "--data-dir",
                          str(tmp_path / "broken"), "--out-dir", str(out_dir)])
    assert code == 2 and sorted(p.name for p in out_dir.iterdir()) == before

    real = G.run_trial

    def interrupted(*args):
        raise KeyboardInterrupt

    G.run_trial = interrupted  # stopped before the new run has a result: nothing goes
    try:
        assert run(tmp_path, mnist_dir, "--lr", "0.01", "--overwrite")[0] == 130
    finally:
        G.run_trial = real
    assert sorted(p.name for p in out_dir.iterdir()) == before

    (out_dir / "lyap_spectrum_T01.npy").write_text("not ours either")
    assert run(tmp_path, mnist_dir, "--lr", "0.01", "--overwrite")[0] == 0
    left = {p.name for p in out_dir.iterdir()}
    assert {"notes.png", "lyap_spectrum_other.npy", "lyap_spectrum_T01.npy",
            "lyap_spectrum_T1.npy"} <= left
    assert "lyap_spectrum_T2.npy" not in left  # the old run's second trial is gone


def test_nan_in_result_files_is_never_trusted(tmp_path, mnist_dir, reference, capsys):
    assert run(tmp_path, mnist_dir, "--trials", "2")[0] == 0
    out_dir = tmp_path / "out"
    spectrum = load(out_dir, "lyap_spectrum_T2.npy")
    spectrum[0] = np.nan
    np.save(out_dir / "lyap_spectrum_T2.npy", spectrum)
    capsys.readouterr()
    assert run(tmp_path, mnist_dir, "--trials", "2")[0] == 0
    assert "trial 2: result file unreadable, redoing it" in capsys.readouterr().err
    assert np.array_equal(load(out_dir, "lyap_spectrum_T2.npy"),
                          load(reference, "lyap_spectrum_T2.npy"))

    run_json = out_dir / "run.json"
    run_json.write_text(run_json.read_text().replace('"test_loss": ', '"test_loss": NaN, "x": '))
    assert run(tmp_path, mnist_dir, "--trials", "2")[0] == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run.json" in err


def test_a_run_with_no_finished_trial_does_not_block_other_settings(tmp_path, mnist_dir,
                                                                   monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(G, "run_trial", interrupted)
    assert run(tmp_path, mnist_dir)[0] == 130
    assert (tmp_path / "out" / "run.json").exists()
    monkeypatch.undo()
    assert run(tmp_path, mnist_dir, "--lr", "0.01")[0] == 0


def test_fewer_trials_than_a_finished_run_are_refused(tmp_path, mnist_dir, capsys):
    assert run(tmp_path, mnist_dir, "--trials", "2")[0] == 0
    capsys.readouterr()
    assert run(tmp_path, mnist_dir, "--trials", "1")[0] == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--trials 2 or more" in err


def test_one_sequence_one_trial_has_no_spread(tmp_path, mnist_dir):
    code, out_dir = run(tmp_path, mnist_dir, "--le-batch", "1")
    assert code == 0
    mean = json.loads((out_dir / "run.json").read_text())["mean"]
    assert mean["lyap_max_stderr"] is None and set(mean["stderr"]) == {None}


def test_nan_trial_is_recorded_and_left_out(tmp_path, mnist_dir, reference, monkeypatch):
    real = G.run_epoch

    def run_epoch(model, batches, optimizer=None, clip=5.0, desc=None):
        if optimizer is not None and desc.startswith("trial 2 "):
            return math.nan, 0.0
        return real(model, batches, optimizer, clip, desc)

    monkeypatch.setattr(G, "run_epoch", run_epoch)
    code, out_dir = run(tmp_path, mnist_dir, "--trials", "3")
    assert code == 0
    info = json.loads((out_dir / "run.json").read_text())
    status = {r["trial"]: r["status"] for r in info["trials"]}
    assert status == {1: "ok", 2: "diverged", 3: "ok"}
    assert "nan" in info["trials"][1]["reason"]
    assert info["mean"]["trials_in_mean"] == [1, 3]
    assert not (out_dir / "lyap_spectrum_T2.npy").exists()
    expected = (load(reference, "lyap_spectrum_T1.npy")
                + load(reference, "lyap_spectrum_T3.npy")) / 2
    assert np.allclose(load(out_dir, "lyap_spectrum_mean.npy"), expected, rtol=0, atol=1e-15)


def test_low_accuracy_trial_keeps_its_file_but_not_its_place_in_the_mean(tmp_path, mnist_dir):
    code, out_dir = run(tmp_path, mnist_dir, "--trials", "2", "--epochs", "0",
                        "--min-accuracy", "0.5")
    assert code == 1  # no trial reached 0.5: every trial failed
    info = json.loads((out_dir / "run.json").read_text())
    assert [r["status"] for r in info["trials"]] == ["low_accuracy", "low_accuracy"]
    assert (out_dir / "lyap_spectrum_T1.npy").exists()
    assert (out_dir / "accuracy_vs_lyapunov.png").exists()
    assert not (out_dir / "lyap_spectrum_mean.npy").exists()


def test_every_trial_failing_exits_nonzero_with_a_summary(tmp_path, mnist_dir, monkeypatch,
                                                         capsys):
    monkeypatch.setattr(G, "run_epoch", lambda *a, **k: (math.inf, 0.0))
    code, _ = run(tmp_path, mnist_dir, "--trials", "2")
    assert code == 1
    err = capsys.readouterr().err
    assert "every trial failed" in err and "trial 2: training loss became inf" in err


def test_interrupt_saves_finished_trials(tmp_path, mnist_dir, reference, monkeypatch):
    real = G.run_trial

    def run_trial(args, data, trial, *rest):
        if trial == 2:
            raise KeyboardInterrupt
        return real(args, data, trial, *rest)

    monkeypatch.setattr(G, "run_trial", run_trial)
    code, out_dir = run(tmp_path, mnist_dir, "--trials", "3")
    assert code == 130
    info = json.loads((out_dir / "run.json").read_text())
    assert [r["trial"] for r in info["trials"]] == [1]
    assert np.array_equal(load(out_dir, "lyap_spectrum_mean.npy"),
                          load(reference, "lyap_spectrum_T1.npy"))


def test_saved_model_reloads_to_the_same_spectrum(tmp_path, mnist_dir):
    code, out_dir = run(tmp_path, mnist_dir, "--save-models")
    assert code == 0
    code, again = run(tmp_path, mnist_dir, "--load-model", str(out_dir / "model_T1.pt"),
                      out="again")
    assert code == 0
    assert np.array_equal(load(again, "lyap_spectrum_T1.npy"),
                          load(out_dir, "lyap_spectrum_T1.npy"))


def test_load_model_refuses_a_foreign_or_mismatched_file(tmp_path, mnist_dir, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    saved = tmp_path / "h8.pt"
    torch.save(G.GRUSMNIST(8).state_dict(), saved)
    for flags, says in (([str(garbage)], "--save-models"), ([str(saved)], "--hidden 8"),
                        ([str(saved), "--hidden", "8", "--no-bias"], "--bias")):
        code, _ = run(tmp_path, mnist_dir, "--load-model", *flags)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "out").exists()


def test_spectrum_stage_survives_out_of_memory(tmp_path, mnist_dir, reference, monkeypatch):
    real = G.lyap_spectrum

    def lyap_spectrum(step, h0, inputs, **kw):
        if len(h0) > 1:
            raise torch.OutOfMemoryError("injected")
        return real(step, h0, inputs, **kw)

    monkeypatch.setattr(G, "lyap_spectrum", lyap_spectrum)
    code, out_dir = run(tmp_path, mnist_dir)
    assert code == 0
    assert np.allclose(load(out_dir, "lyap_spectrum_T1.npy"),
                       load(reference, "lyap_spectrum_T1.npy"), rtol=0, atol=1e-12)


def test_bits_per_step(tmp_path, mnist_dir, reference):
    code, out_dir = run(tmp_path, mnist_dir, "--log-base", "2")
    assert code == 0
    assert np.allclose(load(out_dir, "lyap_spectrum_T1.npy") * math.log(2),
                       load(reference, "lyap_spectrum_T1.npy"), rtol=1e-13, atol=1e-15)
    assert json.loads((out_dir / "run.json").read_text())["units"] == "bits per step"


@pytest.mark.parametrize("flags, says", [
    (["--hidden", "0"], "--hidden"),
    (["--trials", "0"], "--trials"),
    (["--init", "uniform", "--p", "0"], "--p must be positive"),
    (["--init", "uniform", "--p", "-1"], "--p must be positive"),
    (["--init", "uniform", "--p-range", "2", "1"], "--p-range"),
    (["--p", "1"], "--init uniform"),
    (["--le-steps", "0"], "--le-steps"),
    (["--le-batch", "0"], "--le-batch"),
    (["--epochs", "-1"], "--epochs"),
    (["--dropout", "1"], "--dropout"),
    (["--device", "tpu9"], "--device"),
    (["--device", "cuda:7"], "cuda"),
    (["--hidden", "ten"], "--hidden"),
    (["--jacobian", "numeric"], "--jacobian"),
    (["--load-model", "/nonexistent/model.pt"], "--load-model"),
    (["--seed", "-1"], "--seed"),
    (["--init", "uniform", "--p", "inf"], "--p must be positive and finite"),
    (["--init", "uniform", "--p-range", "0.1", "inf"], "--p-range"),
    (["--lr", "inf"], "--lr"),
    (["--train-limit", "60001"], "--train-limit"),
    (["--data-dir", ""], "--data-dir"),
    (["--init", "uniform", "--p", "1e300"], "float32"),
    (["--hidden", "10000000"], "GiB"),
    (["--le-steps", "100000000000"], "GiB"),
])
def test_bad_values_end_in_one_line_and_exit_2(tmp_path, mnist_dir, flags, says, capsys):
    try:
        code, _ = run(tmp_path, mnist_dir, *flags)
    except SystemExit as e:  # argparse's own checks
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "out").exists()  # refused before anything was made


def test_cuda_without_a_gpu_is_refused(tmp_path, mnist_dir, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert run(tmp_path, mnist_dir, "--device", "cuda")[0] == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device cpu" in err


def test_out_dir_that_cannot_be_created(tmp_path, mnist_dir, capsys):
    (tmp_path / "file").write_text("not a folder")
    code = G.main(TINY + ["--data-dir", str(mnist_dir), "--out-dir",
                          str(tmp_path / "file" / "sub")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out-dir" in err


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "folder", "remove"])
def test_damaged_mnist_is_refused_in_one_line(tmp_path, mnist_dir, damage, monkeypatch,
                                             capsys):
    raw = tmp_path / "data" / "MNIST" / "raw"
    shutil.copytree(mnist_dir / "MNIST" / "raw", raw)
    victim = raw / "t10k-labels-idx1-ubyte"
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:5000])
    elif damage == "corrupt":
        data = bytearray(victim.read_bytes())
        data[100] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "folder":
        victim.unlink()
        victim.mkdir()
    else:  # and no source can bring it back
        victim.unlink()
        monkeypatch.setenv("PATH", str(tmp_path / "no-npm-here"))
        monkeypatch.setattr(G, "_fetch_with_torchvision", lambda data_dir: None)
    code = G.main(TINY + ["--data-dir", str(tmp_path / "data"),
                          "--out-dir", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "t10k-labels-idx1-ubyte" in err


def test_one_error_line_from_the_real_process(tmp_path):
    for flags in (["--hidden", "-3"], ["--lr", "fast"]):
        proc = cli(*flags, "--out-dir", str(tmp_path / "x"))
        assert proc.returncode == 2
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("GRU_LE.py: error:")


def test_help_shows_defaults():
    proc = cli("--help")
    assert proc.returncode == 0
    assert "--le-warmup" in proc.stdout and "(default: 500)" in proc.stdout


def test_environment_yml_mirrors_requirements():
    reqs = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    env = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(env) if line.strip() == "- pip:")
    pip = [line.strip()[2:] for line in env[start + 1:] if line.strip().startswith("- ")]
    assert pip == reqs
    assert "MIT License" in (ROOT / "LICENSE").read_text()
