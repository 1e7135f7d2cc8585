"""sae_core.resume: accumulator state through one safetensors file and back, kinds and all."""
import numpy as np
import pytest
import torch

from sae_core.resume import Journal, load_state, read_info, save_state


class Inner:
    STATE = ("counts", "edges")

    def __init__(self):
        self.counts, self.edges = np.zeros(3, np.int64), None


class Outer:
    STATE = ("n", "total", "shift", "inner", "buffers", "waiting", "label")

    def __init__(self):
        self.n, self.total, self.shift, self.label = 0, 0.0, None, ""
        self.inner = Inner()
        self.buffers: list = [None, np.zeros(0, np.int64)]
        self.waiting: list = []
        self.constant_not_saved = "set by __init__"


def test_round_trip_restores_values_kinds_and_nesting(tmp_path):
    a = Outer()
    a.n, a.total, a.label = np.int64(7), 2.5, "x"
    a.shift = torch.arange(4, dtype=torch.float64)  # None when built: restored as a tensor
    a.inner.counts += [1, 2, 3]
    a.inner.edges = np.linspace(0, 1, 4, dtype=np.float32)
    a.buffers = [np.eye(2, dtype=np.float16), None, [np.ones(2, bool)]]
    a.waiting = [(np.array([1, 2]), torch.zeros(2, dtype=torch.int32), 3)]
    save_state(tmp_path / "s.safetensors", {"acc": a, "absent": None}, {"done": 5, "key": {"k": [1, 2]}})
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, nothing left beside it
    # the file is safetensors as the library itself reads it (we write it array by array)
    from safetensors.numpy import load_file

    plain = load_file(str(tmp_path / "s.safetensors"))
    np.testing.assert_array_equal(plain["acc.shift"], np.arange(4.0))
    assert plain["acc.buffers.0"].dtype == np.float16 and plain["acc.buffers.2.0"].dtype == bool

    b = Outer()
    b.constant_not_saved = "kept"
    info = load_state(tmp_path / "s.safetensors", {"acc": b, "absent": None})
    assert info == read_info(tmp_path / "s.safetensors") == {"done": 5, "key": {"k": [1, 2]}}
    assert (b.n, b.total, b.label, b.constant_not_saved) == (7, 2.5, "x", "kept") and type(b.n) is int
    assert isinstance(b.shift, torch.Tensor) and b.shift.dtype == torch.float64
    torch.testing.assert_close(b.shift, a.shift, rtol=0, atol=0)
    np.testing.assert_array_equal(b.inner.counts, [1, 2, 3])
    assert b.inner.edges.dtype == np.float32 and np.array_equal(b.inner.edges, a.inner.edges)
    assert b.buffers[1] is None and b.buffers[0].dtype == np.float16 and b.buffers[2][0].dtype == bool
    (ids, t, three), = b.waiting
    assert isinstance(t, torch.Tensor) and t.dtype == torch.int32 and three == 3 and ids.tolist() == [1, 2]
    b.inner.counts[0] = 99  # restored arrays are the object's own, not views of the file
    assert load_state(tmp_path / "s.safetensors", {"acc": Outer(), "absent": None})["done"] == 5


def test_unreadable_or_foreign_files_read_as_no_state(tmp_path):
    assert read_info(tmp_path / "missing.safetensors") is None
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert read_info(tmp_path / "junk.safetensors") is None
    save_state(tmp_path / "cut.safetensors", {"acc": Inner()}, {"done": 1})
    assert read_info(tmp_path / "cut.safetensors") == {"done": 1}
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-1])  # a file cut short is no state
    assert read_info(tmp_path / "cut.safetensors") is None
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2)}, str(tmp_path / "foreign.safetensors"))  # no metadata of ours
    assert read_info(tmp_path / "foreign.safetensors") is None
    with pytest.raises(TypeError, match="cannot save a set"):
        bad = Inner()
        bad.edges = {1, 2}
        save_state(tmp_path / "bad.safetensors", {"acc": bad}, {})
    assert not (tmp_path / "bad.safetensors").exists()


def test_journal_skips_recorded_units_and_reruns_one_cut_short(tmp_path):
    """A unit recorded is not computed again by a journal opened with the same settings, and gives back what
    the first run got (a tuple comes back as a list both times); a last line cut short by a kill is dropped,
    its unit runs again, and the lines after it are read on the next resume (appended to the cut line they
    were lost)."""
    path = tmp_path / "eval.json.partial"
    ran = []

    def unit(key, value):
        return lambda: ran.append(key) or value

    j = Journal(path, {"alphas": [2.0, 3.0], "tau": 0.1})
    first = [j.run("a", unit("a", (1, 2))), j.run("b", unit("b", {"red": 0.5})), j.run("c", unit("c", "x"))]
    assert first == [[1, 2], {"red": 0.5}, "x"] and ran == ["a", "b", "c"]
    text = path.read_text()
    path.write_text(text[:-5])  # a kill inside the write of c's line

    j = Journal(path, {"alphas": [2.0, 3.0], "tau": 0.1})
    assert j.restarted is None and set(j.done) == {"a", "b"}
    again = [j.run("a", unit("a", None)), j.run("b", unit("b", None)), j.run("c", unit("c", "x")),
             j.run("d", unit("d", 4))]
    assert again == first + [4] and ran == ["a", "b", "c", "c", "d"]
    assert Journal(path, {"alphas": [2.0, 3.0], "tau": 0.1}).done == {"a": [1, 2], "b": {"red": 0.5}, "c": "x", "d": 4}


def test_journal_of_other_settings_starts_over_and_says_which(tmp_path):
    path = tmp_path / "eval.json.partial"
    Journal(path, {"alphas": [2.0], "tau": 0.1}).run("a", lambda: 1)
    j = Journal(path, {"alphas": [2.0], "tau": 0.2})
    assert j.done == {} and j.restarted == "tau: 0.1 there, 0.2 now"
    assert j.run("a", lambda: 2) == 2 and Journal(path, {"alphas": [2.0], "tau": 0.2}).done == {"a": 2}
    path.write_text("not json\n")  # a foreign file: started over, said so
    j = Journal(path, {"tau": 0.2})
    assert j.done == {} and j.restarted == "not a journal of this job"
    j.remove()
    assert not path.exists()
