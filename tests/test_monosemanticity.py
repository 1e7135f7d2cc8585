"""MS in closed form against the paper's pairwise definition, streaming, the CSV reader and the command."""
import csv
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from precompute.__main__ import main as precompute_main
from precompute.ms import compute_ms
from sae_core.errors import UserError
from sae_core.monosemanticity import MSAccumulator, monosemanticity_score, read_activations_csv

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def pairwise_ms(acts: np.ndarray, emb: np.ndarray) -> np.ndarray:
    """The paper's definition written out: min-max normalise each neuron over all images, then
    sum_{n<m} a_n a_m cos(e_n, e_m) / sum_{n<m} a_n a_m; NaN when no pair has weight."""
    N, K = acts.shape
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    out = np.full(K, np.nan)
    for k in range(K):
        x = acts[:, k].astype(np.float64)
        if x.max() == x.min():
            continue
        a = (x - x.min()) / (x.max() - x.min())
        num = den = 0.0
        for n in range(N):
            for m in range(n + 1, N):
                w = a[n] * a[m]
                num += w * float(unit[n] @ unit[m])
                den += w
        if den > 0:
            out[k] = num / den
    return out


def two_pass_ms(acts: np.ndarray, emb: np.ndarray) -> np.ndarray:
    """Two passes in float64: min-max normalise first, then the closed form on a (no raw sums)."""
    x = acts.astype(np.float64)
    lo, hi = x.min(0), x.max(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        a = (x - lo) / (hi - lo)
        unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        s = unit.T @ a
        s1, s2 = a.sum(0), (a * a).sum(0)
        return ((s * s).sum(0) - s2) / (s1 * s1 - s2)


def varied_neurons(rng, N: int) -> np.ndarray:
    """Columns: sparse ReLU, dense with a large offset, negative-only, constant, one firing image,
    exactly two firing images, ties at the minimum across chunks, a minimum reached only late."""
    cols = [np.maximum(rng.standard_normal(N) - 0.5, 0),
            rng.standard_normal(N) * 0.3 + 50.0,
            -np.abs(rng.standard_normal(N)) - 3.0,
            np.full(N, 0.7),
            np.where(np.arange(N) == N // 2, 2.5, 0.0),
            np.where(np.isin(np.arange(N), [3, N - 2]), [1.0] * N, 0.0) * np.linspace(1, 2, N),
            np.where(np.arange(N) % 3 == 0, -1.0, rng.random(N)),
            np.linspace(4.0, -2.0, N) + rng.random(N) * 0.1]
    return np.stack(cols, 1)


@pytest.fixture(scope="module")
def small_case():
    rng = np.random.default_rng(0)
    N, d = 37, 6
    acts = np.concatenate([varied_neurons(rng, N), np.maximum(rng.standard_normal((N, 6)), 0)], 1)
    emb = rng.standard_normal((N, d)) * rng.uniform(0.5, 3.0, (N, 1))   # not unit-norm on purpose
    emb[:, 0] += 1.0                                                    # so that cosines are not centred on 0
    return acts, emb, pairwise_ms(acts, emb)


def test_matches_pairwise_definition(small_case):
    acts, emb, ref = small_case
    r = monosemanticity_score(acts, emb, chunk=5)
    assert r.ms.dtype == np.float32 and r.support.dtype == np.int64
    np.testing.assert_array_equal(np.isnan(r.ms), np.isnan(ref))
    np.testing.assert_allclose(r.ms, ref, atol=1e-6, rtol=0, equal_nan=True)
    # neurons 3 (constant) and 4 (one firing image) have no score; 5 (two images) has one
    assert np.isnan(r.ms[[3, 4]]).all() and np.isfinite(r.ms[5])
    assert r.n_nan == 2 and r.n_images == acts.shape[0]
    # support = images whose normalised activation is > 0, i.e. above the neuron's minimum
    np.testing.assert_array_equal(r.support, (acts > acts.min(0)).sum(0))


def test_float32_matmul_and_torch_inputs(small_case):
    acts, emb, ref = small_case
    r = monosemanticity_score(torch.from_numpy(acts).float(), torch.from_numpy(emb).float(), chunk=8,
                              matmul_dtype=torch.float32)
    np.testing.assert_allclose(r.ms, ref, atol=2e-5, rtol=0, equal_nan=True)


def test_float32_matmul_scores_a_neuron_one_image_holds_against_the_definition(tmp_path, capsys):
    """A neuron firing 5.0 on one image and 5e-9 on another has MS = cos(e_0, e_1); its score is a difference of two
    nearly equal sums, which the float32 product wrote as 7.3 (1e-12: 7,279) until 2026-12-05. Such neurons are
    scored again in float64, by the library call and the `ms` command, against the pairwise definition."""
    rng = np.random.default_rng(3)
    n, d = 300, 16
    emb = rng.normal(size=(n, d))
    acts = np.zeros((n, 5))
    acts[:, 0] = rng.random(n)                       # an ordinary neuron: the float32 product, to 2e-6
    acts[0, 1], acts[1, 1] = 5.0, 5e-9               # the second image holds 1e-9 of the weight
    acts[0, 2], acts[1, 2] = 5.0, 5e-10                # (float64 itself holds 1e-10 to 1e-6)
    acts[2, 3], acts[7, 3], acts[9, 3] = 3.0, 1e-7, 2e-7
    acts[:40, 4] = rng.random(40) * 1e-3
    acts[40, 4] = 1.0                                # one image far above 40 small ones (share 0.04: float32's)
    ref = pairwise_ms(acts, emb)
    for how in (torch.float32, torch.float64):
        r = monosemanticity_score(acts, emb, chunk=64, matmul_dtype=how)
        np.testing.assert_allclose(r.ms, ref, atol=2e-6, rtol=0, err_msg=str(how))
    acc = MSAccumulator(5, d, matmul_dtype=torch.float32)
    acc.update(acts, emb)
    assert acc.float32_unresolved().tolist() == [1, 2, 3]
    np.save(tmp_path / "A.npy", acts.astype(np.float32))
    np.save(tmp_path / "E.npy", emb.astype(np.float32))
    assert precompute_main(["ms", "--activations", str(tmp_path / "A.npy"), "--embeddings", str(tmp_path / "E.npy"),
                            "--out", str(tmp_path / "ms.npy"), "--matmul", "float32", "--chunk", "64"]) == 0
    assert "3 neurons scored again in float64" in capsys.readouterr().out
    ref32 = pairwise_ms(acts.astype(np.float32).astype(np.float64), emb.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(np.load(tmp_path / "ms.npy"), ref32, atol=2e-6, rtol=0)


def test_a_refused_chunk_leaves_the_scores_as_they_were(small_case, monkeypatch):
    """A NaN in a later block of neurons was refused after the earlier blocks' sums had moved, and a caller who went
    on (the message says to clean or drop the images) had MS off by up to 6e-4 (until 2026-12-05). Blocks of 2
    neurons here; reference: the pairwise definition over the chunks that were taken."""
    import sae_core.monosemanticity as M

    acts, emb, _ = small_case
    monkeypatch.setattr(M, "_BLOCK_ELEMENTS", 2 * 15)
    acc = MSAccumulator(acts.shape[1], emb.shape[1])
    acc.update(acts[:15], emb[:15])
    bad = acts[15:30].copy()
    bad[3, acts.shape[1] - 1] = np.nan  # the last block
    for form in (bad, torch.from_numpy(bad)):
        with pytest.raises(UserError, match=rf"non-finite value \(NaN or inf\) at image 18, column {acts.shape[1] - 1};"):
            acc.update(form, emb[15:30])
    with pytest.raises(UserError, match="activations must hold numbers, got dtype <U1"):  # (checked first too)
        acc.update(np.full((15, acts.shape[1]), "x"), emb[15:30])
    acc.update(acts[30:], emb[30:])
    keep = np.r_[0:15, 30:len(acts)]
    np.testing.assert_allclose(acc.result().ms, pairwise_ms(acts[keep], emb[keep]), atol=1e-6, rtol=0, equal_nan=True)


def test_streaming_equals_one_shot(small_case):
    acts, emb, _ = small_case
    one = monosemanticity_score(acts, emb, chunk=len(acts))
    acc = MSAccumulator(acts.shape[1], emb.shape[1])
    edges = [0, 1, 4, 4, 15, 16, 30, len(acts)]          # uneven chunks, one of them empty
    for a, b in zip(edges, edges[1:]):
        acc.update(acts[a:b], emb[a:b])
    streamed = acc.result()
    np.testing.assert_allclose(streamed.ms, one.ms, atol=1e-12, rtol=0, equal_nan=True)
    np.testing.assert_array_equal(streamed.support, one.support)
    # the torch path (what CUDA runs) gives the same numbers on CPU tensors
    acc = MSAccumulator(acts.shape[1], emb.shape[1])
    acc.numpy_path = False
    for a, b in zip(edges, edges[1:]):
        acc.update(torch.from_numpy(acts[a:b]), emb[a:b])
    torch_path = acc.result()
    np.testing.assert_allclose(torch_path.ms, one.ms, atol=1e-12, rtol=0, equal_nan=True)
    np.testing.assert_array_equal(torch_path.support, one.support)


def test_one_pass_accuracy_against_two_pass_with_offsets():
    """Raw neurons far from zero, with their minimum late in the stream: no cancellation."""
    rng = np.random.default_rng(1)
    N, d = 6000, 32
    base = rng.standard_normal((N, 4))
    acts = np.stack([base[:, 0] * 0.01 + 1e4,                       # tiny spread on a huge offset
                     base[:, 1] - 1e3,                              # negative offset
                     np.maximum(base[:, 2], 0),                     # min 0
                     np.linspace(1e3, -1e3, N) + base[:, 3]], 1)    # minimum only in the last chunk
    emb = rng.standard_normal((N, d))
    emb[:, :4] += base * 0.8                                        # activations correlate with embeddings
    r = monosemanticity_score(acts.astype(np.float64), emb, chunk=1000)
    np.testing.assert_allclose(r.ms, two_pass_ms(acts, emb), atol=1e-9, rtol=0)


def test_min_support_filter(small_case):
    acts, emb, _ = small_case
    r = monosemanticity_score(acts, emb, min_support=10)
    low = r.support < 10
    assert np.isnan(r.ms_supported[low]).all()
    np.testing.assert_array_equal(r.ms_supported[~low], r.ms[~low])
    assert r.n_below_min_support == int((low & ~np.isnan(r.ms)).sum()) > 0
    with pytest.raises(UserError):
        monosemanticity_score(acts, emb, min_support=1)
    # the boundary: a neuron whose support is exactly min_support keeps its score (a > kept it only above)
    support = (acts > acts.min(0)).sum(0)  # images above the neuron's minimum: a positive normalised weight
    np.testing.assert_array_equal(r.support, support)
    edge = int(np.median(support[support >= 2]))
    at_edge = monosemanticity_score(acts, emb, min_support=edge)
    assert (support == edge).any()
    np.testing.assert_array_equal(at_edge.ms_supported, np.where(support >= edge, at_edge.ms, np.nan))


def test_bad_inputs_raise_one_sentence(small_case):
    acts, emb, _ = small_case
    with pytest.raises(UserError, match="37 images but embeddings 36"):
        monosemanticity_score(acts, emb[:-1])
    bad = acts.copy()
    bad[20, 7] = np.nan
    with pytest.raises(UserError, match="image 20, column 7"):
        monosemanticity_score(bad, emb, chunk=8)
    zero = emb.copy()
    zero[3] = 0
    with pytest.raises(UserError, match="image 3 is all zeros"):
        monosemanticity_score(acts, zero)
    # from a notebook: nested lists are arrays (an AttributeError), chunk 0 and devices this machine lacks are one
    # sentence (range()'s ValueError, torch's RuntimeErrors)
    np.testing.assert_array_equal(monosemanticity_score(acts.tolist(), emb.tolist()).ms, monosemanticity_score(acts, emb).ms)
    for kwargs, said in (({"chunk": 0}, "chunk must be a whole number of images, at least 1, got 0"),
                         ({"chunk": 2.5}, "chunk must be a whole number"),
                         ({"device": "bogus"}, "device bogus is not a device this runs on"),
                         ({"device": "cuda:7"}, "device cuda:7 (was asked for but no CUDA GPU is visible|names a GPU)")):
        with pytest.raises(UserError, match=said):
            monosemanticity_score(acts, emb, **kwargs)


def write_paper_csv(path: Path, ids, acts: np.ndarray, header: bool) -> None:
    """The paper's layout, written independently of the reader: one row per neuron, k then a_1..a_N."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(["k"] + [f"a_{n + 1}" for n in range(acts.shape[0])])
        for col, k in enumerate(ids):
            w.writerow([k] + [repr(float(v)) for v in acts[:, col]])


@pytest.mark.parametrize("header", [False, True])
def test_csv_reader_round_trip(tmp_path, header):
    rng = np.random.default_rng(2)
    acts = rng.random((9, 4)).astype(np.float32)
    ids = [7, 2, 40, 0]
    write_paper_csv(tmp_path / "a.csv", ids, acts, header)
    got_ids, got = read_activations_csv(tmp_path / "a.csv")
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got, acts)
    with open(tmp_path / "a.csv", "a") as f:  # blank lines (a trailing newline or two) are not rows
        f.write("\n\r\n")
    np.testing.assert_array_equal(read_activations_csv(tmp_path / "a.csv")[1], acts)
    write_paper_csv(tmp_path / "dup.csv", [1, 1], acts[:, :2], header)
    with pytest.raises(UserError, match="more than once"):
        read_activations_csv(tmp_path / "dup.csv")


def test_csv_reader_refuses_bad_files_in_one_sentence(tmp_path):
    cases = {"empty.csv": ("", "holds no activations"), "ids.csv": ("k,a_1\n-1,0.5\n", "neuron ids"),
             "text.csv": ("k,a_1,a_2\n0,1,x\n", "line 2 is not numeric"), "float_ids.csv": ("0.5,1,2\n", "neuron ids"),
             "ragged.csv": ("0,1,2\n1,3\n", "line 2 has 1 activations but the first row 2"),
             "header_only.csv": ("k,a_1\n", "holds no activations"), "ids_only.csv": ("0\n1\n", "holds no activations")}
    for name, (text, sentence) in cases.items():
        (tmp_path / name).write_text(text)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the sentence alone: no numpy warning beside it
            with pytest.raises(UserError, match=sentence):
                read_activations_csv(tmp_path / name)
    with pytest.raises(UserError, match="does not exist"):
        read_activations_csv(tmp_path / "missing.csv")


def test_resume_after_interruption(tmp_path, small_case, capsys):
    acts, emb, _ = small_case
    partial = tmp_path / "ms.npy.partial"
    broken = acts.copy()
    broken[-1, 0] = np.inf                       # the run dies on its last chunk, after checkpoints
    with pytest.raises(UserError):
        compute_ms(broken, emb, torch.device("cpu"), 8, "float64", 2, partial, checkpoint_every=0, inputs={"a": 1})
    assert partial.is_file()
    capsys.readouterr()
    resumed = compute_ms(acts, emb, torch.device("cpu"), 8, "float64", 2, partial, checkpoint_every=0, inputs={"a": 1})
    assert f"resuming after 32 of {len(acts)} images" in capsys.readouterr().out  # chunks of 8; the last one died
    np.testing.assert_allclose(resumed.ms, monosemanticity_score(acts, emb).ms, atol=1e-12, equal_nan=True)
    # other inputs: the saved state is not theirs, so the pass starts over
    other = compute_ms(acts, emb, torch.device("cpu"), 8, "float64", 2, partial, checkpoint_every=0, inputs={"a": 2})
    assert "resuming" not in capsys.readouterr().out
    np.testing.assert_allclose(other.ms, resumed.ms, atol=1e-12, equal_nan=True)


def test_command_end_to_end_npy(tmp_path, small_case):
    acts, emb, ref = small_case
    np.save(tmp_path / "A.npy", acts.astype(np.float32))
    np.save(tmp_path / "E.npy", emb.astype(np.float32))
    proc = subprocess.run([sys.executable, "-m", "precompute", "ms", "--activations", str(tmp_path / "A.npy"),
                           "--embeddings", str(tmp_path / "E.npy"), "--out", str(tmp_path / "out" / "ms.npy"),
                           "--min-support", "10", "--chunk", "10"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    assert "14 neurons over 37 images: 2 without a score" in proc.stdout
    ms = np.load(tmp_path / "out" / "ms.npy", allow_pickle=False)
    ref32 = pairwise_ms(acts.astype(np.float32).astype(np.float64), emb.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(ms, ref32, atol=1e-6, equal_nan=True)
    support = np.load(tmp_path / "out" / "ms_support.npy")
    np.testing.assert_array_equal(support, (acts.astype(np.float32) > acts.astype(np.float32).min(0)).sum(0))
    summary = json.loads((tmp_path / "out" / "ms.json").read_text())
    assert summary["n_nan"] == 2 and summary["n_neurons"] == 14 and summary["min_support"] == 10
    assert summary["ms_mean"] == pytest.approx(float(np.nanmean(ref32)), abs=1e-6)
    kept = np.load(tmp_path / "out" / "ms_min_support.npy")
    assert np.isnan(kept[support < 10]).all()
    assert not list((tmp_path / "out").glob("*.partial*"))


def test_command_csv_ids_index_the_output(tmp_path, small_case, capsys):
    acts, emb, ref = small_case
    ids = [5, 0, 9]
    write_paper_csv(tmp_path / "activations.csv", ids, acts[:, [0, 1, 2]], header=True)
    np.save(tmp_path / "E.npy", emb)
    rc = precompute_main(["ms", "--activations", str(tmp_path / "activations.csv"), "--embeddings",
                          str(tmp_path / "E.npy"), "--out", str(tmp_path / "ms.npy")])
    assert rc == 0
    ms = np.load(tmp_path / "ms.npy")
    assert ms.shape == (10,)
    np.testing.assert_allclose(ms[ids], ref[[0, 1, 2]], atol=1e-6)
    assert np.isnan(np.delete(ms, ids)).all()


def test_csv_keeps_the_precision_of_its_text(tmp_path, small_case):
    """Activations of 1e4 plus small offsets, as the text has them: read as float32 (before) they lost the
    offsets, which moved MS and turned a neuron's score into NaN."""
    acts, emb, _ = small_case
    shifted = 1e4 + acts * 1e-3
    write_paper_csv(tmp_path / "a.csv", range(acts.shape[1]), shifted, header=False)
    _, got = read_activations_csv(tmp_path / "a.csv")
    np.testing.assert_array_equal(got, shifted)
    np.testing.assert_allclose(monosemanticity_score(got, emb).ms, pairwise_ms(shifted, emb), atol=1e-6, equal_nan=True)


def test_a_smaller_min_support_run_removes_the_last_ones_file(tmp_path, small_case, capsys):
    """OUT_min_support.npy of an earlier run would sit beside the new scores as theirs."""
    acts, emb, _ = small_case
    np.save(tmp_path / "A.npy", acts)
    np.save(tmp_path / "E.npy", emb)
    argv = ["ms", "--activations", str(tmp_path / "A.npy"), "--embeddings", str(tmp_path / "E.npy"),
            "--out", str(tmp_path / "ms.npy"), "--device", "cpu"]
    assert precompute_main(argv + ["--min-support", "10"]) == 0
    assert "ms_min_support.npy" in capsys.readouterr().out and (tmp_path / "ms_min_support.npy").is_file()
    assert precompute_main(argv) == 0
    assert not (tmp_path / "ms_min_support.npy").exists()


@pytest.mark.parametrize("case", ["rows", "nonfinite", "missing", "not2d"])
def test_command_bad_input_exits_2(tmp_path, small_case, capsys, case):
    acts, emb, _ = small_case
    a, e = acts, emb
    if case == "rows":
        e = emb[:30]
    elif case == "nonfinite":
        a = acts.copy()
        a[4, 2] = np.inf
    elif case == "not2d":
        e = emb[:, 0]
    np.save(tmp_path / "A.npy", a)
    np.save(tmp_path / "E.npy", e)
    emb_arg = str(tmp_path / ("nope.npy" if case == "missing" else "E.npy"))
    rc = precompute_main(["ms", "--activations", str(tmp_path / "A.npy"), "--embeddings", emb_arg,
                          "--out", str(tmp_path / "ms.npy")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2
    assert err.startswith("error: ") and err.count(". ") == 0 and "Traceback" not in err
    assert not (tmp_path / "ms.npy").exists()


@pytest.mark.parametrize("header", [False, True])
def test_csv_reader_takes_bom_and_one_trailing_comma(tmp_path, header):
    """Excel's UTF-8 BOM and a comma ending every row (pandas-style exports) change no value."""
    rng = np.random.default_rng(4)
    acts = rng.random((6, 3)).astype(np.float32)
    ids = [3, 0, 8]
    write_paper_csv(tmp_path / "plain.csv", ids, acts, header)
    text = (tmp_path / "plain.csv").read_text()
    (tmp_path / "bom.csv").write_text("\ufeff" + text, encoding="utf-8")
    (tmp_path / "comma.csv").write_text(text.replace("\n", ",\n"))
    for name in ("bom.csv", "comma.csv"):
        got_ids, got = read_activations_csv(tmp_path / name)
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(got, acts)


def test_csv_reader_refuses_other_encodings_and_separators(tmp_path):
    cases = {"latin.csv": ("k,a_1,a_2\n0,1,2\n1,3,4 caf\xe9\n".encode("latin-1"),
                           r"line 3 is not UTF-8 text \(byte 0xe9\); save it as UTF-8"),
             "semicolon.csv": (b"0;1;2\n1;3;4\n", "line 1 is not numeric"),
             "two_commas.csv": (b"0,1,2\n1,3,4,,\n", "line 2 is not numeric")}
    for name, (data, sentence) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=sentence):
            read_activations_csv(tmp_path / name)


def test_command_resumes_only_from_the_same_input_files(tmp_path, small_case, capsys, monkeypatch):
    """A killed run resumes; after an input is rewritten with the same shape it starts over, and the
    temporary file a kill during a checkpoint write leaves is removed."""
    acts, emb, ref = small_case
    a_path, out = tmp_path / "A.npy", tmp_path / "ms.npy"
    np.save(tmp_path / "E.npy", emb)
    argv = ["ms", "--activations", str(a_path), "--embeddings", str(tmp_path / "E.npy"), "--out", str(out),
            "--chunk", "8", "--checkpoint-every", "0", "--device", "cpu"]
    update = MSAccumulator.update

    def killed_run():
        def dies_on_fourth_chunk(self, a, e):
            if self.n == 24:
                raise KeyboardInterrupt
            update(self, a, e)
        with monkeypatch.context() as m:
            m.setattr(MSAccumulator, "update", dies_on_fourth_chunk)
            assert precompute_main(argv) == 130  # Ctrl-C
        capsys.readouterr()

    np.save(a_path, acts)
    killed_run()
    assert precompute_main(argv) == 0
    assert f"resuming after 24 of {len(acts)} images" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(out), ref, atol=1e-6, equal_nan=True)

    killed_run()
    np.save(a_path, acts[:, ::-1])                        # same shape and path, other values
    (tmp_path / ".ms.npy.partial.tmp4194305").touch()     # left by a kill while a checkpoint was written
    assert precompute_main(argv) == 0
    printed = capsys.readouterr().out
    assert "resuming" not in printed and "starting over: activations changed" in printed
    np.testing.assert_allclose(np.load(out), ref[::-1], atol=1e-6, equal_nan=True)
    assert not list(tmp_path.glob(".*tmp*")) and not list(tmp_path.glob("*.partial*"))


@pytest.mark.parametrize("case", ["npz", "empty", "no_neurons", "device", "cpu_index", "out_folder", "out_under_file",
                                  "out_is_input", "min_support_is_input", "not_npy", "huge_id"])
def test_command_refuses_before_computing(tmp_path, small_case, capsys, monkeypatch, case):
    """Inputs and options that could not work end in one sentence before any MS is computed."""
    acts, emb, _ = small_case
    np.save(tmp_path / "A.npy", acts)
    np.save(tmp_path / "E.npy", emb)
    a_arg, out, extra = tmp_path / "A.npy", tmp_path / "ms.npy", []
    if case == "npz":
        a_arg = tmp_path / "A.npz"
        np.savez(a_arg, acts=acts)
    elif case == "empty":
        a_arg = tmp_path / "empty.npy"
        a_arg.touch()
    elif case == "no_neurons":
        np.save(a_arg, acts[:, :0])
    elif case == "device":
        extra = ["--device", "gpu"]
    elif case == "cpu_index":
        extra = ["--device", "cpu:3"]
    elif case == "out_folder":
        out.mkdir()
    elif case == "out_is_input":  # it was overwritten with the scores
        out = tmp_path / "A.npy"
    elif case == "min_support_is_input":  # removed as an earlier run's OUT_min_support.npy
        a_arg = tmp_path / "ms_min_support.npy"
        np.save(a_arg, acts)
    elif case == "not_npy":  # text: it was said to hold pickled objects
        a_arg = tmp_path / "A.txt.npy"
        a_arg.write_text("0.1,0.2\n")
    elif case == "huge_id":  # the scores are indexed by id: it asked for 364 TiB
        a_arg = tmp_path / "activations.csv"
        write_paper_csv(a_arg, [0, 10**14], acts[:, :2], header=False)
    else:
        (tmp_path / "taken").touch()
        out = tmp_path / "taken" / "ms.npy"
    expected = {"npz": "is an .npz archive; save the \\(N images, K neurons\\) array with np.save",
                "empty": "is empty \\(0 bytes\\)", "no_neurons": "has shape \\(37, 0\\), so it holds no values",
                "device": "--device gpu is not a device .*use auto, cpu, cuda or cuda:N",
                "cpu_index": "--device cpu:3 is not a device", "out_folder": "ms.npy is a folder",
                "out_under_file": "taken is a file", "out_is_input": "would replace A.npy, the activations file",
                "min_support_is_input": "would replace ms_min_support.npy, the activations file",
                "not_npy": "is not a plain numeric .npy \\(it has no .npy header\\)",
                "huge_id": "names neuron 100000000000000, above 16,777,215"}[case]

    def no_compute(*a, **k):
        raise AssertionError("computed before refusing")
    monkeypatch.setattr("precompute.ms.compute_ms", no_compute)
    before = sorted(tmp_path.rglob("*"))
    rc = precompute_main(["ms", "--activations", str(a_arg), "--embeddings", str(tmp_path / "E.npy"),
                          "--out", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].count(". ") == 0
    assert re.search(expected, err[0]), err[0]
    assert sorted(tmp_path.rglob("*")) == before            # nothing written, nothing lost
