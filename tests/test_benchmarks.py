"""The benchmarks measure what their tables say: the rows they evaluate and the commands they run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch


def test_sae_train_evaluates_on_the_rows_train_held_out(tmp_path, capsys):
    """The table's held-out FVU was taken on the file's last rows, of which `train` (holding out rows spread over
    the file) had trained on 7 in 8; and the SAELens row's start statistics were a traceback. The reconstruction
    the table scores is the trained SAE's on the rows its config.json names as held out, and the start statistics
    handed to SAELens are the ones the trainer recorded."""
    from benchmarks.sae_train import main, pooled_fvu, write_init_stats
    from sae_core.activation_store import HeldOut
    from sae_core.checkpoint import load_sae

    work = tmp_path / "bench"
    assert main(["--only", "batchtopk", "--steps", "4", "--timing-skip", "3", "--batch-size", "256", "--rows", "4096",
                 "--eval-rows", "512", "--expansion", "1", "--k", "8", "--work", str(work)]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ours batchtopk")]
    training = json.loads((work / "batchtopk" / "config.json").read_text())["training"]
    held = HeldOut(**training["held_out"]).held_out_rows()
    data_path = next(work.glob("planted_*_n4096.npy"))
    data = np.load(data_path)
    assert (held < len(data) - 512).mean() > 0.8  # spread: most are not the file's last rows
    sae = load_sae(work / "batchtopk")
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(torch.from_numpy(data[held]))).numpy()
    np.testing.assert_allclose(np.load(work / "batchtopk.xhat.npy"), x_hat, rtol=1e-5, atol=1e-5)
    assert table[0].split("|")[4].strip() == f"{pooled_fvu(data[held], x_hat):.4f}"
    # the BatchTopK-mode reconstruction (FVU at L0 = k): per batch of held-out rows, the k * B largest activations
    # kept in a dense matrix written out here (the densifying scatter dropped an entry: a code lost its last value)
    k, batch = 8, 256
    with torch.no_grad():
        btk = []
        for a in range(0, len(held), batch):
            acts = sae.pre_acts(torch.from_numpy(data[held[a:a + batch]])).clamp_min(0)
            cut = acts.flatten().sort(descending=True).values[k * len(acts) - 1]
            assert cut > 0 and int((acts >= cut).sum()) == k * len(acts)  # no tie at the cut
            btk.append(sae.decode(torch.where(acts >= cut, acts, 0.0)).numpy())
    np.testing.assert_allclose(np.load(work / "batchtopk.xhat_btk.npy"), np.concatenate(btk), rtol=1e-5, atol=1e-5)
    stats = np.load(write_init_stats(data_path, 512, tmp_path / "s.npz"))
    assert float(stats["scale"]) == pytest.approx(training["input_scale"], rel=1e-9)


def test_sae_train_refuses_settings_that_leave_nothing_to_time_before_writing_data(tmp_path, monkeypatch, capsys):
    """--timing-skip at or above --steps, and --rows that leave less than a batch to train on, were printed without
    the "error:" every other command's refusal has and without a way out; the rows' check came after the
    planted-dictionary file was written (65,536 rows by default). One "error:" line each, nothing written."""
    import sys

    from benchmarks.__main__ import main

    work = tmp_path / "bench"
    for extra, said in ((["--steps", "4", "--timing-skip", "5"],
                         "error: --timing-skip 5 leaves no timed steps out of --steps 4; give a --timing-skip below 4."),
                        (["--steps", "4", "--rows", "8292", "--batch-size", "256"],
                         "error: --rows 8292 leaves 100 training rows after the --eval-rows 8192, fewer than one batch "
                         "of 256; give more --rows or a smaller --batch-size.")):
        monkeypatch.setattr(sys, "argv", ["benchmarks", "sae_train", *extra, "--work", str(work)])
        assert main() == 2
        assert capsys.readouterr().err == said + "\n"
    assert not work.exists()


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka", "topk", "relu"])
def test_saelens_export_trains_every_architecture_it_checks(arch, tmp_path):
    """The export check passed --k to relu, which `train` refuses: the benchmark died before its table."""
    from benchmarks.saelens_export import train_args
    from precompute.__main__ import main
    from sae_core.synthetic import planted_dictionary

    data = tmp_path / "x.npy"
    np.save(data, planted_dictionary(1024, d=16, n_atoms=32, active=2, seed=0).x)
    args = train_args(arch, data, tmp_path / arch)
    args[args.index("--steps") + 1] = "2"
    assert main(args) in (0, None)
    assert json.loads((tmp_path / arch / "config.json").read_text())["arch"] == arch


def test_the_ms_and_coact_benchmarks_fail_when_ours_disagrees_with_the_baseline(monkeypatch, capsys):
    """Both printed their agreement and returned 0 whatever it was (until 2026-12-05): a regression passed."""
    import benchmarks.coact as coact
    import benchmarks.ms as ms

    assert ms.main(["--n", "48", "--k", "16", "--d", "8", "--big-n", "0"]) == 0
    assert coact.main(["--latents", "256", "--images", "32", "--batch", "8", "--density", "0.1"]) == 0
    assert "| True |" in capsys.readouterr().out
    real_ms = ms.monosemanticity_score

    def off(acts, emb, **kw):
        result = real_ms(acts, emb, **kw)
        return result._replace(ms=result.ms + 1e-3)

    monkeypatch.setattr(ms, "monosemanticity_score", off)
    assert ms.main(["--n", "48", "--k", "16", "--d", "8", "--big-n", "0"]) == 1
    assert "ms: ours and the paper's loop disagree" in capsys.readouterr().err
    real_counter = coact.run_counter

    def other_parents(groups, K, batches, budget, old):
        seconds, (parent, score), held, modes = real_counter(groups, K, batches, budget, old)
        return seconds, ((parent + 1) if old else parent, score), held, modes

    monkeypatch.setattr(coact, "run_counter", other_parents)
    assert coact.main(["--latents", "256", "--images", "32", "--batch", "8", "--density", "0.1"]) == 1
    assert "| False |" in capsys.readouterr().out


def test_the_store_read_scan_counts_the_rows_it_reads(tmp_path):
    from benchmarks.store_read import scan_rows
    from sae_core.activation_store import ActivationStore

    np.save(tmp_path / "x.npy", np.zeros((70_000, 4), np.float32))
    assert scan_rows(ActivationStore(tmp_path / "x.npy")) == 70_000  # 131,072 counted before: two full chunks


def test_the_smallest_benchmark_runs_print_ratios_their_times_support(tiny_bundle, capsys):
    """A reviewer's small runs of 2026-12-05: coact and bands printed times to 2 decimals beside ratios of the
    unrounded ones ("0.00 | 0.00 | 1.5x"); `steer --calls 1` timed no cold call (np.percentile's IndexError) and
    `ms --n 2`, where no neuron has an MS, failed in np.max. Every printed ratio is now the printed times' within
    their 3 figures, and the two small runs end in a table or one line."""
    import re

    import benchmarks.bands as bands
    import benchmarks.coact as coact
    import benchmarks.ms as ms
    import benchmarks.steer as steer

    assert coact.main(["--latents", "64", "--images", "16", "--batch", "8", "--density", "0.1"]) == 0
    assert bands.main(["--latents", "64", "--images", "32", "--batch", "8", "--density", "0.1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if re.match(r"\| [\d.]+ \|", line)]
    assert len(rows) >= 3
    for cells in rows:
        old, new, ratio = (float(c.strip().rstrip("x").replace(",", "")) for c in cells[2:5])
        want = old / new if len(cells) == 8 else new / old  # coact: baseline / now; bands: now / baseline
        assert old > 0 and new > 0 and ratio == pytest.approx(want, rel=0.01), cells
    assert ms.main(["--n", "2", "--k", "4", "--d", "4", "--big-n", "0"]) == 2
    assert "no neuron has an MS over 2 images" in capsys.readouterr().err
    assert steer.main(["--bundle", str(tiny_bundle), "--calls", "1", "--tokens", "2", "--precisions", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "1 calls per row" in out and "| fp32 | cold: 3 answers on a new image" in out
