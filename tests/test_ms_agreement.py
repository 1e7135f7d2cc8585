"""Alignment Score of MS with users (`precompute ms-agreement`) on a hand-made pairs.csv."""
import json
import math

import numpy as np
import pytest

from precompute.__main__ import main as precompute_main
from sae_core.alignment import alignment_score, read_pairs_csv
from sae_core.errors import UserError
from tests.test_monosemanticity import pairwise_ms, write_paper_csv

# Six pairs. R_user > 0 prefers x, < 0 prefers y, 0 is a tie. Hand-scored below for each variant.
PAIRS = """k_x,k_y,R_user,MS_x_dino,MS_y_dino,MS_x_clip,MS_y_clip
0,1,0.8,0.60,0.45,0.70,0.20
2,3,-0.5,0.30,0.45,0.57,0.50
4,5,0.2,0.10,0.13,0.30,0.00
6,7,0,0.90,0.10,0.10,0.90
8,9,-1,0.20,0.90,0.25,0.25
1,2,3,0.45,,0.20,0.57
"""
# dino: row 1 agrees (|d| .15), row 2 agrees (.15), row 3 disagrees (.03), row 4 tie, row 5 agrees (.7),
#       row 6 has no MS_y -> 3 of 4
# clip: row 1 agrees (.5), row 2 disagrees (.07), row 3 agrees (.3), row 4 tie, row 5 equal MS,
#       row 6 disagrees (.37) -> 2 of 4
EDGES = "0,0.05,0.1,0.2,0.4,inf"
EXPECTED_BINS = {  # (n, agreement) per bin [0,.05) [.05,.1) [.1,.2) [.2,.4) [.4,inf)
    "dino": [(1, 0.0), (0, None), (2, 1.0), (0, None), (1, 1.0)],
    "clip": [(0, None), (1, 0.0), (0, None), (2, 0.5), (1, 1.0)],
}


@pytest.fixture
def pairs_csv(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text(PAIRS)
    return path


def test_alignment_by_hand(pairs_csv, tmp_path, capsys):
    rc = precompute_main(["ms-agreement", "--pairs", str(pairs_csv), "--bins", EDGES, "--out", str(tmp_path / "o")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "6 pairs" in out and "1 without a preference (R_user at the centre) skipped" in out
    # per variant, the pairs scored and those skipped for a tie of MS or a missing one (the header's one
    # count was the preference ties only)
    rows = {line.split()[0]: line.split()[1:4] for line in out.splitlines() if line.startswith(("dino ", "clip "))}
    assert rows == {"dino": ["4", "0", "1"], "clip": ["4", "1", "0"]}
    res = json.loads((tmp_path / "o" / "alignment.json").read_text())["variants"]
    assert res["dino"]["agreement"] == pytest.approx(0.75) and res["dino"]["n_pairs"] == 4
    assert res["dino"]["n_missing"] == 1 and res["dino"]["n_preference_ties"] == 1
    assert res["clip"]["agreement"] == pytest.approx(0.5) and res["clip"]["n_ms_ties"] == 1
    for name, bins in EXPECTED_BINS.items():
        got = [(b["n"], b["agreement"]) for b in res[name]["bins"]]
        assert got == bins, name
    html = (tmp_path / "o" / "alignment.html").read_text()
    assert "plotly" in html.lower() and "dino (overall 0.750" in html


def test_r_user_center(pairs_csv, tmp_path):
    """With R_user as a share of users (0.5 = no preference): row 3 and row 4 now prefer y."""
    rc = precompute_main(["ms-agreement", "--pairs", str(pairs_csv), "--r-user-center", "0.5",
                          "--out", str(tmp_path / "o")])
    assert rc == 0
    dino = json.loads((tmp_path / "o" / "alignment.json").read_text())["variants"]["dino"]
    assert dino["agreement"] == pytest.approx(4 / 5) and dino["n_preference_ties"] == 0


def test_computed_ms_variant(tmp_path, pairs_csv, capsys, monkeypatch):
    """MS computed from activations.csv + embeddings, scored against a pairwise MS and a loop by hand."""
    rng = np.random.default_rng(3)
    N = 25
    acts = np.maximum(rng.standard_normal((N, 10)) + rng.standard_normal(10) * 0.5, 0)
    emb = rng.standard_normal((N, 5)) + np.array([1.5, 0, 0, 0, 0])
    write_paper_csv(tmp_path / "activations.csv", list(range(10)), acts, header=False)
    np.save(tmp_path / "emb_dino.npy", emb)
    rc = precompute_main(["ms-agreement", "--pairs", str(pairs_csv), "--activations", str(tmp_path / "activations.csv"),
                          "--embeddings", str(tmp_path / "emb_dino.npy"), "--out", str(tmp_path / "o")])
    assert rc == 0
    got = json.loads((tmp_path / "o" / "alignment.json").read_text())["variants"]["ours_emb_dino"]
    ms = pairwise_ms(acts, emb)
    pairs = [(0, 1, 0.8), (2, 3, -0.5), (4, 5, 0.2), (6, 7, 0), (8, 9, -1), (1, 2, 3)]
    agree = [(ms[x] > ms[y]) == (r > 0) for x, y, r in pairs if r != 0]
    assert got["n_pairs"] == len(agree) == 5
    assert got["agreement"] == pytest.approx(sum(agree) / len(agree))
    # a NaN activation is named by its neuron (it was "column 2", its place among the pairs' neurons 0, 4, 6, 8);
    # an embedding's by its dimension (renamed as an activation's, it was a traceback)
    gappy = write(tmp_path / "gappy.csv", "k_x,k_y,R_user\n0,4,1\n6,8,-1\n")
    bad = acts.copy()
    bad[5, 6] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    bad_emb = np.repeat(emb, 3, axis=1)
    bad_emb[2, 12] = np.nan
    np.save(tmp_path / "bad_emb.npy", bad_emb)
    for a, e, said in (("bad.npy", "emb_dino.npy", "activations contain a non-finite value (NaN or inf) at image 5, "
                                                     "neuron 6;"),
                       ("activations.csv", "bad_emb.npy", "embeddings contain a non-finite value (NaN or inf) at "
                                                          "image 2, column 12;")):
        capsys.readouterr()
        assert precompute_main(["ms-agreement", "--pairs", str(gappy), "--activations", str(tmp_path / a),
                                "--embeddings", str(tmp_path / e), "--out", str(tmp_path / "o")]) == 2
        assert said in capsys.readouterr().err
    # the file's own variant of the computed one's name is refused (it was replaced silently)
    clash = tmp_path / "clash.csv"
    clash.write_text(PAIRS.replace("MS_x_clip,MS_y_clip", "MS_x_ours_emb_dino,MS_y_ours_emb_dino"))
    capsys.readouterr()

    def no_compute(*a, **k):
        raise AssertionError("computed before refusing")
    monkeypatch.setattr("precompute.ms_agreement.compute_ms", no_compute)
    assert precompute_main(["ms-agreement", "--pairs", str(clash), "--activations", str(tmp_path / "activations.csv"),
                            "--embeddings", str(tmp_path / "emb_dino.npy"), "--out", str(tmp_path / "o")]) == 2
    assert "MS_x_ours_emb_dino/MS_y_ours_emb_dino, the name of the variant computed" in capsys.readouterr().err


def test_bad_pairs(tmp_path):
    (tmp_path / "p.csv").write_text("k_x,k_y,MS_x_a,MS_y_a\n1,2,0.1,0.2\n")
    with pytest.raises(UserError, match="R_user"):
        read_pairs_csv(tmp_path / "p.csv")
    (tmp_path / "q.csv").write_text("k_x,k_y,R_user\n1,2,1\n")
    assert precompute_main(["ms-agreement", "--pairs", str(tmp_path / "q.csv")]) == 2   # no MS anywhere


def test_alignment_score_counts():
    r = alignment_score([0.5, 0.2, np.nan, 0.3], [0.1, 0.4, 0.2, 0.3], [1, 1, -1, -1], edges=(0, math.inf))
    assert (r.n_pairs, r.n_missing, r.n_ms_ties, r.agreement) == (2, 1, 1, 0.5)
    # each pair in exactly one count, in this order: missing MS, no preference, MS tie, scored (a pair both
    # missing and without a preference, or without a preference and tied, was counted twice by a dropped mask)
    ms_x = [0.5, 0.2, np.nan, 0.3, 0.3, np.nan, 0.7]
    ms_y = [0.1, 0.4, 0.2, 0.3, 0.5, 0.5, 0.7]
    pref = [1, 1, -1, -1, 0, 0, 0]
    r = alignment_score(ms_x, ms_y, pref, edges=(0, math.inf))
    assert (r.n_pairs, r.n_missing, r.n_preference_ties, r.n_ms_ties, r.agreement) == (2, 2, 2, 1, 0.5)


def test_pairs_csv_bom_trailing_comma_and_bad_rows(tmp_path):
    """A BOM and one trailing comma per row read as the plain file; other encodings, extra fields and
    semicolons are named in one sentence."""
    plain = read_pairs_csv(write(tmp_path / "plain.csv", PAIRS))
    for name, text in {"bom.csv": "\ufeff" + PAIRS, "comma.csv": PAIRS.replace("\n", ",\n")}.items():
        got = read_pairs_csv(write(tmp_path / name, text))
        for k in ("k_x", "k_y", "R_user"):
            np.testing.assert_array_equal(got[k], plain[k])
        for v in plain["ms"]:
            np.testing.assert_array_equal(got["ms"][v], plain["ms"][v])
    cases = {"latin.csv": (b"k_x,k_y,R_user\n" + b"0,1,0.5\n" * 5000 + "9,8,0.5 caf\xe9\n".encode("latin-1"),
                           r"line 5002 is not UTF-8 text \(byte 0xe9\); save it as UTF-8"),
             "long.csv": (b"k_x,k_y,R_user\n0,1,0.5\n2,3,1,9,9\n", "line 3 has 5 fields but the header 3"),
             "short.csv": (b"k_x,k_y,R_user,MS_x_a,MS_y_a\n0,1,0.5\n", "line 2 has 3 fields but the header 5"),
             "semicolon.csv": (b"k_x;k_y;R_user\n0;1;0.5\n", "line 1 is not comma-separated"),
             "header_only.csv": (b"k_x,k_y,R_user\n", "has a header but no pairs"),
             "text.csv": (b"k_x,k_y,R_user\n0,1,0.5\n\n2,3,lots\n", "line 4 has 'lots' in column R_user, which is not")}
    for name, (data, sentence) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=sentence):
            read_pairs_csv(tmp_path / name)
    with pytest.raises(UserError, match="is a folder"):
        read_pairs_csv(tmp_path)
    # spaces after the header's commas, as activations.csv allows (k_y and R_user were "missing")
    spaced = read_pairs_csv(write(tmp_path / "spaced.csv", PAIRS.replace(",", ", ")))
    np.testing.assert_array_equal(spaced["R_user"], plain["R_user"])
    assert set(spaced["ms"]) == {"dino", "clip"}


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_same_stem_embeddings_are_two_variants(tmp_path, pairs_csv, capsys):
    """e1/emb.npy and e2/emb.npy: both scored, each under its own name, each against its own pairwise MS."""
    rng = np.random.default_rng(5)
    N = 20
    acts = np.maximum(rng.standard_normal((N, 10)) + rng.standard_normal(10) * 0.5, 0)
    np.save(tmp_path / "A.npy", acts)
    embs = {}
    for folder in ("e1", "e2"):
        (tmp_path / folder).mkdir()
        embs[folder] = rng.standard_normal((N, 4)) + np.array([1.0, 0, 0, 0])
        np.save(tmp_path / folder / "emb.npy", embs[folder])
    rc = precompute_main(["ms-agreement", "--pairs", str(pairs_csv), "--activations", str(tmp_path / "A.npy"),
                          "--embeddings", str(tmp_path / "e1" / "emb.npy"), str(tmp_path / "e2" / "emb.npy"),
                          "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert rc == 0
    res = json.loads((tmp_path / "o" / "alignment.json").read_text())["variants"]
    assert set(res) == {"dino", "clip", "ours_e1/emb", "ours_e2/emb"}
    pairs = [(0, 1, 0.8), (2, 3, -0.5), (4, 5, 0.2), (6, 7, 0), (8, 9, -1), (1, 2, 3)]
    for folder, emb in embs.items():
        ms = pairwise_ms(acts, emb)
        agree = [(ms[x] > ms[y]) == (r > 0) for x, y, r in pairs if r != 0]
        assert res[f"ours_{folder}/emb"]["agreement"] == pytest.approx(sum(agree) / len(agree)), folder
    capsys.readouterr()
    assert precompute_main(["ms-agreement", "--pairs", str(pairs_csv), "--activations", str(tmp_path / "A.npy"),
                            "--embeddings", str(tmp_path / "e1" / "emb.npy"), str(tmp_path / "e1" / "emb.npy")]) == 2
    assert "emb.npy more than once" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["center", "bins", "one_edge", "out_file", "device"])
def test_bad_options_refused_before_computing(tmp_path, pairs_csv, capsys, monkeypatch, case):
    np.save(tmp_path / "A.npy", np.random.default_rng(6).random((5, 10)))
    np.save(tmp_path / "E.npy", np.random.default_rng(7).random((5, 3)))
    (tmp_path / "taken").touch()
    extra, expected = {
        "center": (["--r-user-center", "nan"], "--r-user-center must be a finite number"),
        "bins": (["--bins", "nan,1"], "--bins nan,1 must be two or more numbers increasing from 0 or above"),
        # one edge: it said "bin edges must be increasing ..., got (0.1,)", neither the option nor the need of two
        "one_edge": (["--bins", "0.1"], "error: --bins 0.1 must be two or more numbers increasing from 0 or above, "
                                        "e.g. 0,0.1,0.2,inf."),
        "out_file": (["--out", str(tmp_path / "taken")], "taken is a file; give a folder for alignment.json"),
        "device": (["--device", "gpu"], "--device gpu is not a device")}[case]

    def no_compute(*a, **k):
        raise AssertionError("computed before refusing")
    monkeypatch.setattr("precompute.ms_agreement.compute_ms", no_compute)
    before = sorted(tmp_path.rglob("*"))
    rc = precompute_main(["ms-agreement", "--pairs", str(pairs_csv), "--activations", str(tmp_path / "A.npy"),
                          "--embeddings", str(tmp_path / "E.npy"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and expected in err[0], err
    assert sorted(tmp_path.rglob("*")) == before


def test_pairs_on_a_bin_edge_and_ties_without_a_score(tmp_path, capsys):
    """Two files of a reviewer's, 2026-12-05. MS written to two decimals: |0.3 - 0.2| is 0.09999999999999998 in binary,
    and such pairs fell in the bin below the edge they sit on, [0.05, 0.1) for a delta of 0.1. And two rows at the
    centre, one of them without dino scores: the header said "1 without a preference" (the first variant's count)
    where the file has 2."""
    path = tmp_path / "pairs.csv"
    path.write_text("k_x,k_y,R_user,MS_x_dino,MS_y_dino,MS_x_clip,MS_y_clip\n"
                    "0,1,1,0.30,0.20,0.15,0.10\n"      # deltas 0.1 (up) and 0.05
                    "2,3,-1,0.70,0.30,0.45,0.55\n"     # 0.4 (dino disagrees) and 0.1 (clip agrees)
                    "4,5,0,0.50,0.40,0.10,0.20\n"
                    "6,7,0,,,0.10,0.20\n")
    assert precompute_main(["ms-agreement", "--pairs", str(path), "--bins", EDGES, "--out", str(tmp_path / "o")]) == 0
    assert "2 without a preference (R_user at the centre) skipped" in capsys.readouterr().out
    res = json.loads((tmp_path / "o" / "alignment.json").read_text())["variants"]
    # by the decimal values: dino 0.1 -> [0.1, 0.2) agreeing, 0.4 -> [0.4, inf) disagreeing;
    # clip 0.05 -> [0.05, 0.1) agreeing, 0.1 -> [0.1, 0.2) agreeing
    assert [(b["n"], b["agreement"]) for b in res["dino"]["bins"]] == [(0, None), (0, None), (1, 1.0), (0, None), (1, 0.0)]
    assert [(b["n"], b["agreement"]) for b in res["clip"]["bins"]] == [(0, None), (1, 1.0), (1, 1.0), (0, None), (0, None)]
