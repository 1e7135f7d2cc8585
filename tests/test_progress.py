"""Progress bars in a log (a file or a pipe) are whole lines, not one line of carriage-return redraws."""
import io
import sys
import time

import pytest
import tqdm.std

from sae_core.progress import LOG_INTERVAL_S, progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_bar_in_a_log_is_its_first_and_last_state_as_lines():
    """1,000 updates well inside LOG_INTERVAL_S: the first state and the last, each a line of its own."""
    log = io.StringIO()
    bar = progress_bar(total=1000, desc="scan", unit="img", file=log)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    out = log.getvalue()
    assert "\r" not in out and out.endswith("\n")
    lines = out.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("scan:   0%") and " 0/1000 " in lines[0]
    assert lines[1].startswith("scan: 100%") and " 1000/1000 " in lines[1]


def test_a_bar_in_a_log_beside_another_open_bar_is_lines_without_escapes():
    """With another bar open (the atlas's pipeline bar on the terminal, while a stage loads a model), tqdm put
    the log's bar a line down: a blank first line and cursor-up escapes in BUNDLE/.stages/log.txt."""
    outer = tqdm.std.tqdm(total=3, file=io.StringIO())
    try:
        log = io.StringIO()
        bar = progress_bar(total=2, desc="Loading weights", file=log)
        bar.update(2)
        bar.close()
    finally:
        outer.close()
    lines = log.getvalue().splitlines()
    assert "\x1b" not in log.getvalue() and len(lines) == 2 and lines[0].startswith("Loading weights:   0%")
    assert lines[1].startswith("Loading weights: 100%")


def test_a_bar_on_a_terminal_still_redraws_in_place():
    term = Terminal()
    bar = progress_bar(total=3, desc="scan", file=term)
    for _ in range(3):
        time.sleep(0.11)  # past tqdm's own 0.1 s between redraws
        bar.update(1)
    bar.close()
    redraws = [r.split("|")[-1].split()[0] for r in term.getvalue().split("\r")[1:]]
    assert redraws == ["0/3", "1/3", "2/3", "3/3", "3/3"]  # close() draws the last state once more, then "\n"
    assert term.getvalue().endswith("\n") and term.getvalue().count("\n") == 1


def test_a_jupyter_cell_keeps_the_redrawn_bar():
    """ipykernel's output streams answer isatty() False but draw "\\r" in place: a notebook keeps its bar."""
    OutStream = type("OutStream", (io.StringIO,), {"__module__": "ipykernel.iostream"})
    cell = OutStream()
    bar = progress_bar(total=3, desc="scan", file=cell)
    bar.update(3)
    bar.close()
    assert not cell.isatty() and cell.getvalue().startswith("\rscan:")


def test_a_bar_in_a_log_writes_a_line_every_log_interval(monkeypatch):
    """On a clock that moves 1 s an update, 100 updates give a line at 0 s, then one each LOG_INTERVAL_S
    (30 s), then the last state: n = 0, 30, 60, 90, 100."""
    clock = [1000.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: clock[0])
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    log = io.StringIO()
    bar = progress_bar(total=100, desc="train", unit="step", file=log)
    for _ in range(100):
        clock[0] += 1.0
        bar.update(1)
    bar.close()
    shown = [int(line.split("|")[-1].split("/")[0]) for line in log.getvalue().splitlines()]
    step = int(LOG_INTERVAL_S)
    assert shown == [*range(0, 100, step), 100]


@pytest.mark.parametrize("done", [4, 10])
def test_a_bar_without_leave_ends_in_a_log_with_its_last_state(done):
    """leave=False (gone from a terminal once done) wrote nothing at the close: the probe commands' logs ended at
    "features ID:   0%| 0/2000" for a finished extraction. A bar closed unfinished says where it stopped."""
    log = io.StringIO()
    bar = progress_bar(total=10, desc="features", leave=False, file=log)
    bar.update(done)
    bar.close()
    assert "\r" not in log.getvalue() and log.getvalue().endswith("\n")
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and " 0/10 " in lines[0] and f" {done}/10 " in lines[1], lines


def test_a_pipeline_in_a_log_is_a_line_a_stage(monkeypatch, tmp_path):
    """The demo's and atlas's one bar, its stderr a log: its first state, a line as each stage starts and the
    last state, though its ticker moves the bar twice a second; a stage that was already done is not a line."""
    from precompute.progress import PipelineProgress

    log = io.StringIO()
    monkeypatch.setattr(sys, "__stderr__", log)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    progress = PipelineProgress({"world": 2.0, "extract": 1.0, "train": 1.0}, desc="demo", log=tmp_path / "log.txt")
    progress.skip("world")
    with progress.stage("extract"):
        time.sleep(1.2)  # two ticks
    with progress.stage("train") as advance:
        for f in (0.25, 0.5, 0.75, 1.0):
            advance(f)
    progress.close()
    out = log.getvalue()
    assert "\r" not in out
    lines = out.splitlines()
    assert [line.rsplit(" , ", 1)[-1] for line in lines[1:]] == ["extract", "train", "done"], lines
    assert [line.split("%")[0] for line in lines] == ["demo:   0", "demo:  50", "demo:  75", "demo: 100"]


def _load_clip_vision(stderr, monkeypatch, through_hf_call=True):
    """A saved random CLIPVisionModel loaded with `stderr` as sys.stderr: what transformers wrote there."""
    from transformers import CLIPVisionModel

    from sae_core.adapters import _hf_call
    from tests.extract_helpers import clip_vision_dir

    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    if through_hf_call:
        _hf_call("model", CLIPVisionModel.from_pretrained, clip_vision_dir())
    else:
        CLIPVisionModel.from_pretrained(clip_vision_dir())
    return stderr.getvalue()


def test_transformers_loading_bar_in_a_log_is_lines(monkeypatch):
    """transformers' "Loading weights" bar, loaded through sae_core, is its first and last state as lines in a
    log (loaded directly, the same load writes carriage-return redraws), and stays a redrawn bar on a terminal."""
    from transformers.utils import logging as hf_logging

    direct = _load_clip_vision(io.StringIO(), monkeypatch, through_hf_call=False)
    assert "\rLoading weights" in direct  # transformers' own bar: what a log got before
    out = _load_clip_vision(io.StringIO(), monkeypatch)
    assert "\r" not in out
    lines = [line for line in out.splitlines() if line.startswith("Loading weights")]
    assert len(lines) == 2 and "  0%" in lines[0] and "100%" in lines[1], out
    assert "\rLoading weights" in _load_clip_vision(Terminal(), monkeypatch)
    assert hf_logging.set_tqdm_hook(None) is None  # the hook lasts the load only


def test_a_programs_own_transformers_hook_wins(monkeypatch):
    from transformers.utils import logging as hf_logging

    made = []

    def own(factory, args, kwargs):
        made.append(kwargs.get("desc"))
        return factory(*args, **kwargs)

    hf_logging.set_tqdm_hook(own)
    try:
        _load_clip_vision(io.StringIO(), monkeypatch)
        assert made == ["Loading weights"]
        assert hf_logging.set_tqdm_hook(None) is own
    finally:
        hf_logging.set_tqdm_hook(None)


def test_a_pipeline_that_fails_does_not_say_done(monkeypatch, tmp_path):
    """An error (or a kill) inside a stage: the bar's last state names the stage it stopped in; it said "done"."""
    from precompute.progress import PipelineProgress

    log = io.StringIO()
    monkeypatch.setattr(sys, "__stderr__", log)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    with pytest.raises(KeyboardInterrupt):
        with PipelineProgress({"extract": 1.0, "train": 1.0}, desc="demo", log=tmp_path / "log.txt") as progress:
            with progress.stage("extract"):
                pass
            with progress.stage("train"):
                raise KeyboardInterrupt
    lines = log.getvalue().splitlines()
    assert lines[-1].startswith("demo:  50%") and lines[-1].endswith(", stopped in train"), lines
    assert "done" not in log.getvalue()
    with pytest.raises(ValueError):  # between stages: no stage to name
        with PipelineProgress({"extract": 1.0}, desc="demo", log=tmp_path / "log.txt") as progress:
            with progress.stage("extract"):
                pass
            raise ValueError
    assert log.getvalue().splitlines()[-1].endswith(", stopped")
    with PipelineProgress({"extract": 1.0}, desc="demo", log=tmp_path / "log.txt") as progress:
        progress.skip("extract")
    assert log.getvalue().splitlines()[-1].endswith(", done")
