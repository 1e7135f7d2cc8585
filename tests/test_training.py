"""The `train` command end to end: planted-dictionary recovery, AuxK, folding, resume, DDP."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from precompute.__main__ import main as precompute_main
from sae_core.checkpoint import load_sae
from sae_core.errors import UserError
from sae_core.sae import SAEConfig, SparseAutoencoder
from sae_core.synthetic import planted_dictionary, recovered_fraction

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second thread costs more in synchronisation than it computes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    # Coefficients in [2, 3]: with 4x more atoms than dimensions, smaller ones drown in the atoms'
    # mutual interference under BatchTopK's single cut, and the run would need several times more steps.
    data = planted_dictionary(40_000, d=64, n_atoms=256, active=4, coef_range=(2.0, 3.0), seed=0)
    path = tmp_path_factory.mktemp("planted") / "x.npy"
    np.save(path, data.x)
    return path, data


def train_args(npy, out, arch, steps, extra=()):
    k = [] if arch == "relu" else ["--k", "4"]  # relu has no k: the command refuses one
    return ["train", "--activations", str(npy), "--arch", arch, "--width", "512", *k,
            "--steps", str(steps), "--batch-size", "512", "--lr", "3e-3", "--out", str(out), *extra]


@pytest.mark.slow
@pytest.mark.parametrize("arch,steps,extra", [
    ("relu", 600, ["--l1-coeff", "0.2"]),
    ("topk", 600, []),
    ("batchtopk", 800, []),
    # The first prefix is as large as the planted dictionary: flat data has no hierarchy to nest.
    ("matryoshka", 1000, ["--groups", "256,256"]),
])
def test_planted_dictionary_is_recovered(planted, tmp_path, arch, steps, extra):
    npy, data = planted
    assert precompute_main(train_args(npy, tmp_path, arch, steps, extra)) == 0
    sae = load_sae(tmp_path, d_in=64)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert recovered_fraction(data.atoms, sae.W_dec.detach().numpy()) >= 0.9
    assert metrics["fvu"] < 0.15
    if arch == "matryoshka":  # the held-out reconstruction improves with the larger prefix
        assert metrics["prefix_sizes"] == [256, 512]
        assert metrics["prefix_fvu"][0] > metrics["prefix_fvu"][1] == pytest.approx(metrics["fvu"])
    if arch != "relu":  # inference (thresholds for the BatchTopK family) keeps training's sparsity
        assert abs(metrics["l0"] - 4) < 0.5
    with open(tmp_path / "train_log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)][-1] == steps


def test_auxk_revives_killed_latents():
    """Half the latents get shrunk encoder rows so they never win the top-k, while the live half is too
    small for the 96 atoms: AuxK brings the killed ones back, the plain loss does not."""
    data = planted_dictionary(8192, d=32, n_atoms=96, active=4, offset=0.0, seed=1)
    x = torch.from_numpy(data.x)
    killed = torch.arange(0, 128, 2)

    def revived(aux_coeff):
        cfg = SAEConfig(arch="topk", d_in=32, d_sae=128, k=4, aux_coeff=aux_coeff)
        sae = SparseAutoencoder(cfg, seed=0)
        with torch.no_grad():
            sae.W_enc[:, killed] *= 0.01
        opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(100):
            batch = x[torch.randint(0, len(x), (256,), generator=g)]
            fired_before = (sae.encode(batch) > 0).any(0)
            out = sae.training_forward(batch, dead_mask=~fired_before)
            opt.zero_grad()
            out.loss.backward()
            sae.remove_parallel_decoder_grad()
            opt.step()
            sae.normalize_decoder()
        return ((sae.encode(x) > 0).any(0)[killed]).float().mean().item()

    without, with_aux = revived(0.0), revived(1 / 32)
    assert without < 0.05
    assert with_aux > 0.9


def test_saved_sae_works_on_raw_inputs_whatever_their_scale(planted, tmp_path):
    """Training on 100*x gives the same latents (divided by 100) once the scale is folded into the weights."""
    npy, data = planted
    big = tmp_path / "big.npy"
    np.save(big, data.x * 100)
    for name, path in (("small", npy), ("big", big)):
        assert precompute_main(train_args(path, tmp_path / name, "batchtopk", 40)) == 0
    small, large = load_sae(tmp_path / "small"), load_sae(tmp_path / "big")
    x = torch.from_numpy(data.x[-500:])
    # Float rounding differs between the two runs, so a few activations right at a threshold may flip.
    same = torch.isclose(large.encode(100 * x), 100 * small.encode(x), rtol=1e-3, atol=1e-2)
    assert same.float().mean() > 0.999
    rel = (large(100 * x) - 100 * small(x)).norm(dim=1) / (100 * x).norm(dim=1)
    assert rel.median() < 1e-4
    m_small = json.loads((tmp_path / "small" / "metrics.json").read_text())
    m_big = json.loads((tmp_path / "big" / "metrics.json").read_text())
    assert m_big["fvu"] == pytest.approx(m_small["fvu"], rel=1e-3)


def _run_cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "precompute", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, **kw)


def test_inspect_reads_a_run_before_its_first_checkpoint(planted, tmp_path, capsys):
    """A run under way before its first checkpoint (every 5 minutes by default) holds only its log: `inspect`
    said the folder held "none of what inspect reads", naming "a training run under way" among them."""
    npy, _ = planted
    out = tmp_path / "early"
    proc = subprocess.Popen([sys.executable, "-m", "precompute", *train_args(npy, out, "topk", 10 ** 6, ["--device", "cpu"])],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (out / "train_log.csv").is_file() and len((out / "train_log.csv").read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None and not (out / "checkpoint").exists()
        assert precompute_main(["inspect", str(out), "--json"]) == 0
        seen = json.loads(capsys.readouterr().out)
        with open(out / "train_log.csv") as f:
            logged = [int(r["step"]) for r in csv.DictReader(f)]
        assert (seen["kind"], seen["step"]) == ("training", None) and seen["last_logged"]["step"] >= logged[1] > 0
        assert precompute_main(["inspect", str(out)]) == 0
        assert "before its first checkpoint" in capsys.readouterr().out
    finally:
        proc.kill()
        proc.wait()


def test_kill_and_resume_equals_uninterrupted(planted, tmp_path, capsys):
    npy, _ = planted
    # on the CPU, where a run is bit for bit the same each time (CUDA's kernels are not: 2026-12-04, H200)
    extra = ["--checkpoint-every", "20", "--groups", "64,448", "--device", "cpu"]
    args = train_args(npy, tmp_path / "resumed", "matryoshka", 240, extra)
    proc = subprocess.Popen([sys.executable, "-m", "precompute", *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "resumed" / "checkpoint" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["step"] >= 60:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())["step"]
    assert killed_at < 240
    # `inspect` of the killed run: its checkpoint's step and the last row it logged
    with open(tmp_path / "resumed" / "train_log.csv") as f:
        last_row = list(csv.DictReader(f))[-1]
    assert precompute_main(["inspect", str(tmp_path / "resumed"), "--json"]) == 0
    seen = json.loads(capsys.readouterr().out)
    assert (seen["kind"], seen["step"], seen["steps"], seen["architecture"]) == ("training", killed_at, 240, "matryoshka")
    assert seen["last_logged"]["step"] == int(last_row["step"]) >= killed_at
    assert seen["last_logged"]["fvu"] == pytest.approx(float(last_row["fvu"]))
    # other rows of the same shape (another layer of one extraction) do not resume this checkpoint
    other = tmp_path / "other.npy"
    np.save(other, -np.load(npy))
    assert precompute_main(train_args(other, tmp_path / "resumed", "matryoshka", 240, extra)) == 2
    assert "holds a checkpoint of a different run" in capsys.readouterr().err
    resumed = _run_cli(args)
    assert resumed.returncode == 0, resumed.stderr

    assert _run_cli(train_args(npy, tmp_path / "straight", "matryoshka", 240, extra)).returncode == 0
    a = load_file(str(tmp_path / "resumed" / "sae.safetensors"))
    b = load_file(str(tmp_path / "straight" / "sae.safetensors"))
    for name in b:
        assert torch.equal(a[name], b[name]), name
    with open(tmp_path / "resumed" / "train_log.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == sorted(set(steps)) and steps[-1] == 240
    assert not (tmp_path / "resumed" / "checkpoint").exists()
    # and of the finished SAE: its config and held-out metrics as the files hold them
    capsys.readouterr()
    assert precompute_main(["inspect", str(tmp_path / "resumed"), "--json"]) == 0
    seen = json.loads(capsys.readouterr().out)
    config = json.loads((tmp_path / "resumed" / "config.json").read_text())
    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert (seen["kind"], seen["format"], seen["architecture"], seen["d_sae"], seen["group_sizes"]) == \
        ("sae", "sae-lab", "matryoshka", config["d_sae"], [64, 448])
    assert seen["steps"] == 240 and seen["trained_on"]["rows"] == len(np.load(npy))
    assert seen["metrics"]["fvu"] == metrics["fvu"] and seen["metrics"]["prefix_fvu"] == metrics["prefix_fvu"]
    assert precompute_main(["inspect", str(tmp_path / "resumed")]) == 0
    printed = capsys.readouterr().out
    assert "matryoshka" in printed and f"held out {metrics['rows']} rows" in printed


def test_two_process_ddp_equals_one_process(planted, tmp_path):
    npy, _ = planted
    # gloo on the CPU (a one-GPU machine cannot hold two NCCL processes: test_more_processes_than_gpus_...)
    args = lambda out: train_args(npy, tmp_path / out, "matryoshka", 60, ["--groups", "64,448", "--device", "cpu"])
    one = _run_cli(args("one"))
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
         "-m", "precompute", *args("two")],
        cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "sae.safetensors"))
    b = load_file(str(tmp_path / "two" / "sae.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["training"]["world_size"] == 2
    # the log gives the global batch's figures, as one process logs them: until 2026-12-05 it gave rank 0's half
    # (loss 6.36 for 7.07, L0 3.78 for 4.0 in a helper's run)
    logs = [list(csv.DictReader(open(tmp_path / out / "train_log.csv"))) for out in ("one", "two")]
    assert len(logs[0]) == len(logs[1]) == 6
    for row_one, row_two in zip(*logs):
        for column in ("loss", "recon_loss", "aux_loss", "sparsity_loss", "fvu", "l0", "dead_fraction"):
            assert float(row_two[column]) == pytest.approx(float(row_one[column]), rel=1e-4, abs=1e-6), column


def test_the_library_refuses_a_relu_sae_in_bfloat16(tmp_path):
    """As the command refuses --dtype bfloat16 for relu: a library caller's relu SAE trained in float32 while its
    config.json said bfloat16 (until 2026-12-05)."""
    from sae_core.activation_store import ActivationStore
    from sae_core.training import TrainConfig, train_sae

    npy = _small_rows(tmp_path / "x.npy")
    with pytest.raises(UserError, match="dtype bfloat16 applies to the topk / batchtopk / matryoshka SAEs, not relu"):
        train_sae(ActivationStore(npy), SAEConfig("relu", d_in=np.load(npy).shape[1], d_sae=32),
                  TrainConfig(steps=2, batch_size=64, dtype="bfloat16"), tmp_path / "sae", progress=False)
    assert not (tmp_path / "sae").exists()


def test_more_processes_than_gpus_is_one_sentence(monkeypatch):
    """torchrun with 2 processes on a one-GPU machine: rank 1 died in torch.cuda.set_device with "invalid device
    ordinal" and a traceback (seen on an H200, 2026-12-04); now the sentence says what to pass."""
    from sae_core.distributed import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=r"more processes on this machine than its 1 GPU \(local rank 1\).*"
                                        r"pass --nproc-per-node 1, or --device cpu\."):
        init_distributed("cuda")


def test_torchrun_devices_give_each_process_its_own_gpu():
    """Under torchrun `cuda` is each process's own GPU; `cuda:0` put every process on GPU 0 (NCCL fails at the
    first collective on two processes of one GPU), now refused in one sentence but on local rank 0."""
    from sae_core.distributed import DistInfo, local_device

    one, rank1 = DistInfo(0, 1, 0), DistInfo(1, 2, 1)
    assert [local_device(d, one) for d in ("cuda", "cuda:1", "cpu")] == ["cuda", "cuda:1", "cpu"]
    assert [local_device(d, rank1) for d in ("cuda", "cuda:1", "cpu")] == ["cuda:1", "cuda:1", "cpu"]
    assert local_device("cuda:0", DistInfo(0, 2, 0)) == "cuda:0"
    with pytest.raises(UserError, match=r"^--device cuda:0 names one GPU for every torchrun process, .*local rank 1, "
                                        r"is given cuda:1\); pass --device cuda\.$"):
        local_device("cuda:0", rank1)


def test_bad_inputs_end_in_one_sentence(tmp_path, capsys):
    # in-process (`python -m precompute` is main's exit code; other tests run it as a process)
    assert precompute_main(["train", "--activations", str(tmp_path / "nope.npy"), "--arch", "topk", "--width", "8",
                            "--steps", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "nope.npy" in err
    np.save(tmp_path / "small.npy", np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32))
    assert precompute_main(["train", "--activations", str(tmp_path / "small.npy"), "--arch", "topk", "--width", "8",
                            "--k", "2", "--steps", "1", "--batch-size", "64", "--out", str(tmp_path / "o")]) == 2
    # refused before the statistics pass, the progress bar and the log (the first batch found it, after them)
    from sae_core.activation_store import ActivationStore, held_out_split

    n_train = held_out_split(ActivationStore(tmp_path / "small.npy"), None).n_train
    assert 0 < n_train < 40
    err = capsys.readouterr().err
    assert err == f"error: batch size 64 is larger than the {n_train} training rows; lower --batch-size.\n"
    assert not (tmp_path / "o").exists()  # no train_log.csv left behind, nor the empty folder (since 2026-12-05)


def test_a_train_config_of_unusable_numbers_is_one_sentence():
    """From Python: eval_rows=0 said "too few to hold out 0 rows", batch_size 2.5 "does not split evenly over 1
    processes", a negative lr was torch's ValueError after the statistics pass."""
    from sae_core.training import TrainConfig

    for bad, said in (({"eval_rows": 0}, "eval_rows=0 must be a whole number of held-out rows from 1"),
                      ({"batch_size": 2.5}, r"--batch-size \(2\.5\) must be whole numbers from 1"),
                      ({"lr": -1e-3}, r"--lr -0\.001 must be a number above 0"),
                      ({"lr": float("nan")}, "--lr nan must be a number above 0")):
        with pytest.raises(UserError, match=said):
            TrainConfig(steps=5, **bad).resolved(16)
    numpy = TrainConfig(steps=np.int64(5), lr=np.float32(1e-3), eval_rows=np.int64(10)).resolved(16)
    assert numpy.lr == pytest.approx(1e-3) and json.loads(json.dumps(asdict(numpy)))["eval_rows"] == 10


@pytest.mark.parametrize("bad_row", [30_000, 39_000])  # a training row outside the init sample; a held-out row
def test_a_nan_row_is_named_not_trained_on(tmp_path, bad_row, capsys):
    """One NaN activation made every weight NaN (and metrics.json invalid JSON) with exit 0: the command now
    stops on the first batch that reads the row and names it, leaving no SAE behind."""
    x = np.random.default_rng(0).standard_normal((40_000, 8)).astype(np.float32)
    x[bad_row, 3] = np.nan
    np.save(tmp_path / "acts.npy", x)
    (tmp_path / "empty.npy").write_bytes(b"")
    args = ["train", "--activations", str(tmp_path / "acts.npy"), "--arch", "topk", "--width", "16", "--k", "2",
            "--steps", "40", "--batch-size", "4096", "--out", str(tmp_path / "sae")]
    assert precompute_main(args) == 2
    err = capsys.readouterr().err
    assert f"activation row {bad_row} of" in err and "NaN or infinite" in err and "Traceback" not in err
    # nor an empty --out: a refusal after the folder's lock was taken left the folder (and its missing parents)
    assert not (tmp_path / "sae").exists()
    args[2] = str(tmp_path / "empty.npy")
    assert precompute_main(args) == 2 and "empty" in capsys.readouterr().err


def test_bf16_on_a_cpu_without_native_bf16_is_named_and_warned(planted, tmp_path, monkeypatch, capsys):
    import sae_core.precision as P

    speeds = {torch.float32: 70.0, torch.bfloat16: 1.3, torch.float16: 1.4}  # GFLOP/s seen on an AVX2-only AMD EPYC host
    monkeypatch.setattr(P, "_matmul_gflops", lambda dtype: speeds[dtype])
    reason = P.slow_half_reason("cpu", torch.bfloat16)
    assert "bf16 matmuls run at 1.3 GFLOP/s" in reason and "70 in fp32" in reason
    assert "fp16 matmuls run at 1.4 GFLOP/s" in P.slow_half_reason("cpu", torch.float16)
    assert P.slow_half_reason("cuda", torch.bfloat16) is None
    with pytest.raises(ValueError, match="bf16 or fp16"):
        P.slow_half_reason("cpu", torch.float32)
    # the one-line warning of the commands (train, extract, steer, steer-eval): only for a slow half dtype
    assert P.warn_if_slow_half("cpu", "fp32", "--precision fp32") is None
    assert P.warn_if_slow_half("cpu", "4bit", "--precision fp32") is None
    auto = P.warn_if_slow_half("auto", "bf16", "--precision fp32")
    assert (auto is None) == torch.cuda.is_available()  # auto = the CPU here
    assert P.warn_if_slow_half("cpu", "float16", "--x") == "warning: " + P.slow_half_reason("cpu", torch.float16) + "; --x is faster on this machine."
    capsys.readouterr()
    speeds[torch.bfloat16] = 280.0  # a CPU with AMX: bf16 is the faster one
    assert P.slow_half_reason("cpu", torch.bfloat16) is None
    # the trainer says so before it starts, and trains all the same
    speeds[torch.bfloat16] = 1.3
    npy, _ = planted
    assert precompute_main(train_args(npy, tmp_path, "batchtopk", 2, ["--dtype", "bfloat16", "--device", "cpu"])) == 0
    err = capsys.readouterr().err
    assert "warning: bf16 matmuls run at 1.3 GFLOP/s" in err and "--dtype float32 is faster" in err
    assert (tmp_path / "sae.safetensors").is_file()


def test_a_kill_before_the_sae_is_marked_finished_keeps_its_metrics(planted, tmp_path, monkeypatch, capsys):
    """config.json marks the SAE finished, so metrics.json is written before it: a kill between the two
    left a finished SAE whose metrics never came back (a rerun said "nothing to do"). The temporary a killed
    write leaves is removed by the next run."""
    import sae_core.training as T

    npy, _ = planted

    def killed(*a, **k):
        raise KeyboardInterrupt  # the kill, as the SAE is being saved
    monkeypatch.setattr(T, "save_sae", killed)
    assert precompute_main(train_args(npy, tmp_path, "batchtopk", 2)) == 130  # Ctrl-C: a sentence, no traceback
    assert "interrupted; the same command again resumes" in capsys.readouterr().err
    assert (tmp_path / "metrics.json").is_file() and not (tmp_path / "config.json").exists()
    monkeypatch.undo()
    (tmp_path / ".metrics.json.tmp4194305").write_text("")  # a kill in the middle of its write
    assert precompute_main(train_args(npy, tmp_path, "batchtopk", 2)) == 0
    assert (tmp_path / "config.json").is_file() and (tmp_path / "metrics.json").is_file()
    assert not list(tmp_path.glob(".*.tmp*"))


def _small_rows(path, negate=False):
    x = np.random.default_rng(3).standard_normal((3000, 16)).astype(np.float32)
    np.save(path, -x if negate else x)
    return path


def _small_args(npy, out, steps, width=64, extra=()):
    return ["train", "--activations", str(npy), "--arch", "batchtopk", "--width", str(width), "--k", "3",
            "--steps", str(steps), "--batch-size", "256", "--out", str(out), *extra]


def test_a_torn_checkpoint_resumes_at_its_weights_step(tmp_path, monkeypatch, capsys):
    """The checkpoint's weights and its step are renamed into place as one file: with the step in a second
    file, a kill between the two renames paired step-4 weights with step 2 and the resumed run replayed two
    steps on them. Reference: the same run uninterrupted."""
    import sae_core.training as T

    npy = _small_rows(tmp_path / "x.npy")
    args = lambda out: _small_args(npy, tmp_path / out, 8, extra=["--checkpoint-every", "2", "--device", "cpu"])  # noqa: E731
    real = T.write_json_atomic
    calls = []

    def killed_at_second_checkpoint(path, obj):
        if Path(path).name == "state.json":
            calls.append(obj["step"])
            if len(calls) == 2:
                raise KeyboardInterrupt
        return real(path, obj)
    monkeypatch.setattr(T, "write_json_atomic", killed_at_second_checkpoint)
    assert precompute_main(args("resumed")) == 130
    monkeypatch.undo()
    assert json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())["step"] == 2  # the stale copy
    # what a kill in the middle of the tensors' write leaves: the folder could not be removed at the end (a
    # traceback after the SAE was saved, and the next run trained again from the checkpoint)
    (tmp_path / "resumed" / "checkpoint" / ".state.safetensors.tmp4194305").write_bytes(b"half")
    assert precompute_main(args("resumed")) == 0
    assert precompute_main(args("straight")) == 0
    a = load_file(str(tmp_path / "resumed" / "sae.safetensors"))
    b = load_file(str(tmp_path / "straight" / "sae.safetensors"))
    for name in b:
        assert torch.equal(a[name], b[name]), name
    assert not (tmp_path / "resumed" / "checkpoint").exists()


def test_a_checkpoint_or_finished_sae_of_other_settings_is_refused_naming_the_setting(tmp_path, monkeypatch, capsys):
    """A checkpoint of another width was loaded before it was compared (a size-mismatch traceback), and a
    finished SAE answered any other options with "nothing to do", exit 0."""
    import sae_core.training as T

    npy, other = _small_rows(tmp_path / "x.npy"), _small_rows(tmp_path / "neg.npy", negate=True)
    monkeypatch.setattr(T, "save_sae", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert precompute_main(_small_args(npy, tmp_path / "run", 4, extra=["--checkpoint-every", "2"])) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert precompute_main(_small_args(npy, tmp_path / "run", 4, width=128, extra=["--checkpoint-every", "2"])) == 2
    err = capsys.readouterr().err
    assert "holds a checkpoint of a different run (sae.d_sae: 64 there, 128 now)" in err and "Traceback" not in err
    assert precompute_main(_small_args(npy, tmp_path / "run", 4, extra=["--checkpoint-every", "2"])) == 0  # resumes
    capsys.readouterr()

    done = _small_args(npy, tmp_path / "done", 2)
    assert precompute_main(done) == 0
    weights = (tmp_path / "done" / "sae.safetensors").read_bytes()
    capsys.readouterr()
    for changed, named in [(_small_args(npy, tmp_path / "done", 3), "steps: 2 there, 3 now"),
                           (_small_args(npy, tmp_path / "done", 2, width=32), "d_sae: 64 there, 32 now"),
                           (_small_args(other, tmp_path / "done", 2), "(other activations, data.sample:")]:
        assert precompute_main(changed) == 2
        err = capsys.readouterr().err
        assert "already holds a finished SAE trained otherwise" in err and named in err, err
    assert precompute_main(done) == 0 and "nothing to do" in capsys.readouterr().out
    assert (tmp_path / "done" / "sae.safetensors").read_bytes() == weights
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text('{"trainer": {"dict_size": 64}}')  # dictionary_learning's
    assert precompute_main(_small_args(npy, tmp_path / "foreign", 2)) == 2
    assert "is not the config of an SAE this command trained; give a new --out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        precompute_main(_small_args(npy, tmp_path / "e", 2, extra=["--eval-rows", "0"]))
    assert exit_.value.code == 2 and "--eval-rows" in capsys.readouterr().err


def test_a_store_that_differs_in_one_row_is_other_data(tmp_path, capsys):
    """Two extractions that differed in one image's rows had one identity (a digest of the first, middle and last
    rows), so a finished SAE said "nothing to do" on the other, and a checkpoint resumed on it (until 2026-12-05).
    A store whose manifest lists each shard's digest of its rows (as extract writes it) is told by every row; a run
    recorded before that field is held to the rest, so it still resumes on its own store."""
    from sae_core.activation_store import rows_digest

    x = np.random.default_rng(3).standard_normal((3000, 16)).astype(np.float32)

    def store(name, rows):
        folder = tmp_path / name
        folder.mkdir()
        shards = []
        for j, part in enumerate(np.array_split(rows, 2)):
            np.save(folder / f"{j}.npy", part)
            index = np.c_[np.arange(len(part)) + 2000 * j, np.zeros(len(part), int)]  # a row an image
            shards.append({"path": f"{j}.npy", "rows": len(part), "rows_digest": rows_digest(part, index)})
        (folder / "manifest.json").write_text(json.dumps({"d": 16, "dtype": "float32", "shards": shards}))
        return folder

    edited = x.copy()
    edited[700, 3] += 1.0  # neither the first, the middle nor the last row
    a, b = store("a", x), store("b", edited)
    done = _small_args(a, tmp_path / "done", 2)
    assert precompute_main(done) == 0
    capsys.readouterr()
    assert precompute_main(_small_args(b, tmp_path / "done", 2)) == 2
    assert "already holds a finished SAE trained otherwise (other activations, data.content:" in capsys.readouterr().err
    config = json.loads((tmp_path / "done" / "config.json").read_text())
    del config["training"]["data"]["content"]  # as a run of before 2026-12-05 recorded it
    (tmp_path / "done" / "config.json").write_text(json.dumps(config))
    assert precompute_main(done) == 0 and "nothing to do" in capsys.readouterr().out


def test_undefined_held_out_metrics_are_null_in_valid_json(tmp_path, capsys):
    """Held-out rows without variance make FVU undefined: metrics.json held a bare NaN, which is not JSON
    (strict parsers, such as a browser's, refuse the whole file)."""
    from sae_core.activation_store import ActivationStore, held_out_split

    x = np.random.default_rng(3).standard_normal((3000, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    x[held_out_split(ActivationStore(tmp_path / "x.npy")).held_out_rows()] = x[0]  # the 150 held-out rows (5%):
    np.save(tmp_path / "x.npy", x)                                                  # one row repeated
    assert precompute_main(_small_args(tmp_path / "x.npy", tmp_path / "sae", 2)) == 0

    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    metrics = json.loads((tmp_path / "sae" / "metrics.json").read_text(), parse_constant=refuse)
    assert metrics["fvu"] is None and metrics["rows"] == 150
    assert metrics["mse"] > 0 and metrics["l0"] > 0  # the defined ones are kept
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1], parse_constant=refuse)  # the command's line
    assert printed["fvu"] is None and printed["l0"] == metrics["l0"]


def test_the_held_out_rows_are_never_trained_on_and_are_what_metrics_json_measures(tmp_path, monkeypatch):
    """Training batches, the init sample and the threshold calibration read training rows only; metrics.json
    is the SAE on exactly the held-out rows (FVU recomputed here in float64). A checkpoint written before
    the spread split (its run config without "held_out") resumes with the rule it began under, the last rows."""
    import sae_core.training as T
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sae_core.activation_store import ActivationStore, held_out_split

    npy = _small_rows(tmp_path / "x.npy")
    store = ActivationStore(npy)
    split = held_out_split(store)
    held = set(split.held_out_rows().tolist())
    assert split.n_eval == 150 and max(held) - min(held) > 2500  # spread, not the last 150 rows
    reads = []
    real_take = ActivationStore.take
    monkeypatch.setattr(ActivationStore, "take", lambda self, idx: reads.append(np.asarray(idx).copy()) or real_take(self, idx))
    assert precompute_main(_small_args(npy, tmp_path / "sae", 6)) == 0
    monkeypatch.undo()
    evaluated = [r for r in reads if set(r.tolist()) == held]
    assert len(evaluated) == 1  # the evaluation, in one batch of 150
    trained = [r for r in reads if r is not evaluated[0] and len(r) > 3]  # (3 rows: the store's identity sample)
    assert len(trained) >= 7 and not any(held & set(r.tolist()) for r in trained)

    @torch.no_grad()
    def fvu_on(sae_dir, rows):
        sae = load_sae(sae_dir)
        x = torch.from_numpy(np.load(npy)[np.sort(rows)])
        x_hat = sae.decode(sae.encode(x)).double()
        return float((x.double() - x_hat).pow(2).sum() / (x.double() - x.double().mean(0)).pow(2).sum())

    metrics = json.loads((tmp_path / "sae" / "metrics.json").read_text())
    assert metrics["rows"] == 150 and metrics["fvu"] == pytest.approx(fvu_on(tmp_path / "sae", list(held)), rel=1e-5)
    info = json.loads((tmp_path / "sae" / "config.json").read_text())["training"]
    assert info["held_out"] == {"n_rows": 3000, "block": 1, "n_blocks": 150, "period": 20}

    # an older checkpoint: killed after step 2, its run config without "held_out"; resumed, killed again after
    # step 4 (its checkpoint now records the last-rows rule, period 0), and resumed again: that second resume
    # was refused as "a different run" until 2026-12-05
    real_save = T._Checkpoint.save

    def save_then_kill(self, *args):
        real_save(self, *args)
        raise KeyboardInterrupt

    old_args = _small_args(npy, tmp_path / "old", 6, extra=["--checkpoint-every", "2"])
    monkeypatch.setattr(T._Checkpoint, "save", save_then_kill)
    assert precompute_main(old_args) == 130
    state = tmp_path / "old" / "checkpoint" / "state.safetensors"
    with safe_open(str(state), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    assert meta["step"] == 2
    del meta["run_config"]["held_out"]
    save_file(load_file(str(state)), str(state), metadata={"meta": json.dumps(meta)})
    (tmp_path / "old" / "checkpoint" / "state.json").write_text(json.dumps(meta))
    assert precompute_main(old_args) == 130
    assert json.loads((tmp_path / "old" / "checkpoint" / "state.json").read_text())["step"] == 4
    monkeypatch.undo()
    assert precompute_main(old_args) == 0
    info = json.loads((tmp_path / "old" / "config.json").read_text())["training"]
    assert info["held_out"]["period"] == 0 and info["held_out_rows"] == 150
    metrics = json.loads((tmp_path / "old" / "metrics.json").read_text())
    assert metrics["fvu"] == pytest.approx(fvu_on(tmp_path / "old", np.arange(2850, 3000)), rel=1e-5)


def test_a_checkpoint_the_disk_refuses_does_not_end_the_run(planted, tmp_path, monkeypatch, capsys):
    """A checkpoint that could not be written (a full disk: a SafetensorError or an OSError) ended the run, and its
    steps since the last checkpoint with it (until 2026-12-05). Training goes on, says so once, tries again at the
    next checkpoint, and ends with the weights of a run whose checkpoints were all written."""
    import errno

    from sae_core import training

    npy, _ = planted
    extra = ["--checkpoint-every", "20", "--groups", "64,448", "--device", "cpu"]
    real, calls = training._Checkpoint.save, []

    def flaky(self, *args):
        calls.append(1)
        if len(calls) in (2, 3):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args)

    monkeypatch.setattr(training._Checkpoint, "save", flaky)
    assert precompute_main(train_args(npy, tmp_path / "full", "matryoshka", 120, extra)) == 0
    err = capsys.readouterr().err
    assert err.count("could not save the checkpoint") == 1
    assert "could not save the checkpoint at step 40 (no space is left on the device); training goes on" in err
    assert len(calls) == 5  # steps 20, 40, 60, 80, 100
    monkeypatch.setattr(training._Checkpoint, "save", real)
    assert precompute_main(train_args(npy, tmp_path / "straight", "matryoshka", 120, extra)) == 0
    a, b = (load_file(str(tmp_path / run / "sae.safetensors")) for run in ("full", "straight"))
    assert all(torch.equal(a[name], b[name]) for name in b)
