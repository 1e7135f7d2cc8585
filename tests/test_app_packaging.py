"""Packaging: the Dockerfile runs the README's commands as a non-root user; the Space front matter;
the first start builds the default bundle through the precompute command; the README's commands parse."""
import json
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def dockerfile_steps():
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    return [(m.group(1), m.group(2).strip()) for m in re.finditer(r"^(FROM|RUN|CMD|USER|ENV|EXPOSE|WORKDIR|COPY)\s+(.*)$",
                                                                 text, re.M)]


def test_dockerfile_uses_the_readme_commands_as_a_non_root_user():
    steps = dockerfile_steps()
    kinds = [k for k, _ in steps]
    readme = (REPO / "README.md").read_text()
    user = [v for k, v in steps if k == "USER"]
    assert user and user[-1] not in ("root", "0") and kinds.index("USER") < kinds.index("CMD")
    assert ("EXPOSE", "7860") in steps
    env = dict(re.findall(r"(SAE_APP_\w+)=(\S+)", " ".join(v for k, v in steps if k == "ENV")))
    assert env["SAE_APP_HOST"] == "0.0.0.0" and env["SAE_APP_PORT"] == "7860"
    from app.settings import ENV_VARS
    from app.uploads import UploadLimits

    assert set(env) == set(ENV_VARS)  # every setting the app reads, to override with docker run -e
    limits = UploadLimits()
    # the app's own defaults, to the pixel (16.8 allowed 16,800,000 pixels in the image, 4096 x 4096 = 16,777,216
    # elsewhere, until 2026-12-05)
    assert float(env["SAE_APP_MAX_UPLOAD_MB"]) == limits.max_bytes / 2**20
    assert int(float(env["SAE_APP_MAX_UPLOAD_MEGAPIXELS"]) * 1e6) == limits.max_pixels  # as UploadLimits.from_env reads it
    workdir = [v for k, v in steps if k == "WORKDIR"][-1]
    runs = [v for k, v in steps if k == "RUN"]
    build = [r for r in runs if "precompute demo" in r]
    assert build, "the image must build the demo bundle"
    argv = shlex.split(build[0])
    assert workdir + "/" + argv[argv.index("--out") + 1] == env["SAE_APP_BUNDLE"]  # built where it is served from
    cmd = " ".join(json.loads([v for k, v in steps if k == "CMD"][-1]))  # JSON-array form
    for command in ["make setup", build[0], cmd]:
        assert command.replace(".venv/bin/", "") in readme, command
    from app.bootstrap import demo_command

    # the first-start build runs the same command the image runs
    assert demo_command(Path("runs/demo_bundle"), "demo")[1:] == argv[1:]


def test_space_front_matter_at_the_top_of_the_readme():
    lines = (REPO / "README.md").read_text().splitlines()
    assert lines[0] == "---"
    end = lines.index("---", 1)
    meta = dict(line.split(":", 1) for line in lines[1:end])
    meta = {k.strip(): v.strip().strip('"') for k, v in meta.items()}
    assert meta["sdk"] == "gradio" and (REPO / meta["app_file"]).is_file()
    from importlib.metadata import version

    assert meta["sdk_version"] == version("gradio")


@pytest.mark.slow
def test_first_start_builds_the_default_bundle(tmp_path, tiny_world, monkeypatch, capfd):
    """No bundle at the default path: `ensure_bundle` runs the precompute demo command as a process
    (its progress on our stderr) and returns the finished bundle."""
    import app.bootstrap as bootstrap
    import app.settings as settings
    from sae_core.bundle import open_bundle

    default = tmp_path / "demo_bundle"
    monkeypatch.setattr(settings, "DEFAULT_BUNDLE", default)
    real = bootstrap.demo_command
    monkeypatch.setattr(bootstrap, "demo_command",
                        lambda out, preset: real(out, preset) + ["--world", str(tiny_world), "--threads", "1"])
    s = settings.AppSettings.from_env(bundle=default, preset="tiny")
    assert s.uses_default_bundle
    assert bootstrap.ensure_bundle(s) == default
    err = capfd.readouterr().err
    assert "building the tiny bundle first" in err and "precompute demo --out" in err
    # stderr is a file here, as in Docker's logs: the build's bar is whole lines, the last one its end
    bar = [line for line in err.splitlines() if line.startswith("demo (tiny):")]
    assert "\r" not in err and len(bar) >= 3 and bar[-1].startswith("demo (tiny): 100%") and bar[-1].endswith(", done")
    assert open_bundle(default).n_neurons > 0


def test_a_named_bundle_that_is_missing_or_unfinished_is_one_sentence(tmp_path):
    """A user's unfinished bundle was told to run `demo --out` there, which an atlas-built or other-preset bundle
    refuses ("other settings"); it now points to `inspect`, which gives the command that resumes it."""
    import app.bootstrap as bootstrap
    import app.settings as settings
    from sae_core.errors import UserError

    for given, sentence in [
            (tmp_path / "none", f"bundle {tmp_path / 'none'} does not exist; build it with `python -m precompute demo "
                                f"--out {tmp_path / 'none'}` or leave out --bundle and SAE_APP_BUNDLE to serve the default one."),
            (tmp_path / "half", f"bundle {tmp_path / 'half'} is unfinished (no manifest.json: its build stopped or is "
                                f"still running); `python -m precompute inspect {tmp_path / 'half'}` says how far it got "
                                "and the command that resumes it."),
            # a file (it said "does not exist")
            (tmp_path / "sae.pt", f"bundle {tmp_path / 'sae.pt'} is a file, not a bundle's folder; give the folder "
                                  "`python -m precompute atlas` or `demo` wrote (its --out).")]:
        (tmp_path / "half" / ".stages").mkdir(parents=True, exist_ok=True)
        (tmp_path / "sae.pt").write_bytes(b"weights")
        with pytest.raises(UserError) as e:
            bootstrap.ensure_bundle(settings.AppSettings.from_env(bundle=given))
        assert str(e.value) == sentence
    assert not (tmp_path / "none").exists()


def test_a_second_start_waits_for_the_build_another_start_runs(tmp_path, monkeypatch, capfd):
    """Two `python -m app` on a fresh machine: the second's build was refused by the first's lock and it exited
    ("building the demo bundle failed"). It now waits for that build and serves its bundle; if that build stops
    before its manifest, the second start resumes it."""
    import subprocess
    import sys

    import app.bootstrap as bootstrap
    import app.settings as settings

    default = tmp_path / "demo_bundle"
    monkeypatch.setattr(settings, "DEFAULT_BUNDLE", default)
    monkeypatch.setattr(bootstrap, "WAIT_POLL_S", 0.05)
    builds = []

    def build(cmd, cwd=None):  # stands for the demo command this start would run
        builds.append(cmd)
        (default / "manifest.json").write_text("{}")
        return 0
    monkeypatch.setattr(bootstrap.subprocess, "call", build)
    for writes_manifest, built_here in ((True, 0), (False, 1)):
        (default / "manifest.json").unlink(missing_ok=True)
        first = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                                  "from sae_core.atomic import writer_lock\n"
                                  f"with writer_lock({str(default)!r}):\n    print('held', flush=True)\n"
                                  "    time.sleep(3.0)\n"
                                  + (f"    Path({str(default / 'manifest.json')!r}).write_text('{{}}')\n"
                                     if writes_manifest else "")],
                                 stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert first.stdout.readline().strip() == "held"
        assert bootstrap.ensure_bundle(settings.AppSettings.from_env(bundle=default, preset="tiny")) == default
        first.wait()
        assert len(builds) == built_here
        assert f"{default} is being built by another process (pid {first.pid} on " in capfd.readouterr().err


def test_the_apps_command_line_refusals_are_one_line(capsys):
    """`python -m app --port abc` printed argparse's usage block before its error, unlike every other refusal
    here (the app's own and precompute's): one line now, naming --help; --help itself keeps the usage."""
    from app.__main__ import parse_args

    for argv, said in ((["--port", "abc"], "argument --port: invalid int value: 'abc'"),
                       (["--bundel", "x"], "unrecognized arguments: --bundel x")):
        with pytest.raises(SystemExit) as e:
            parse_args(argv)
        assert e.value.code == 2
        assert capsys.readouterr().err == f"error: {said} (`python -m app --help` lists the options).\n"
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m app")


def test_main_in_process_leaves_sigterm_as_it_was(tmp_path, capsys):
    """main's SIGTERM handler (docker stop) is put back when main returns, and main runs in a thread too (until
    2026-12-05 a later SIGTERM raised KeyboardInterrupt in the caller, and main in a thread raised ValueError)."""
    import signal
    import threading

    from app.__main__ import main

    before = signal.getsignal(signal.SIGTERM)
    missing = ["--bundle", str(tmp_path / "missing")]
    assert main(missing) == 2 and signal.getsignal(signal.SIGTERM) is before
    got = []
    thread = threading.Thread(target=lambda: got.append(main(missing)))
    thread.start()
    thread.join(30)
    assert got == [2] and "does not exist" in capsys.readouterr().err


def test_the_quick_start_commands_parse():
    """Every command of the README's quick start is accepted by the real command-line parsers (an
    option renamed or a choice dropped would leave users a first command that fails)."""
    from app.__main__ import parse_args
    from precompute.__main__ import parser_for

    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    lines = [line.split("#", 1)[0].strip() for line in "\n".join(blocks).replace("\\\n", " ").splitlines()]
    commands = [shlex.split(line) for line in lines if line]
    parsed = {"make": 0, "precompute": 0, "app": 0}
    for argv in commands:
        if argv[:3] == ["python", "-m", "precompute"]:
            args = parser_for(argv[3:]).parse_args(argv[3:])
            assert args.command == argv[3]
            parsed["precompute"] += 1
        elif argv[:3] == ["python", "-m", "app"]:
            assert parse_args(argv[3:]).bundle == "runs/bundle"
            parsed["app"] += 1
        else:
            assert argv[0] == "make" and re.search(rf"^{argv[1]}:", (REPO / "Makefile").read_text(), re.M), argv
            parsed["make"] += 1
    assert parsed == {"make": 1, "precompute": 5, "app": 1}


def readme_code_lines() -> list[str]:
    """The lines inside the README's fenced code blocks, continuation backslashes joined."""
    lines, inside = [], False
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("```"):
            inside = not inside
        elif inside:
            lines.append(line)
    return "\n".join(lines).replace("\\\n", " ").splitlines()


def test_every_readme_command_parses():
    """Every `python -m precompute|app ...` in the README's code blocks (33 on 2026-12-04, the quick start's among
    them) is accepted by the real parsers, read as a user types it: optional parts `[--x V]` included, the first
    of `a|b`, an upper-case placeholder (N, DIR, SPEC) given as 1. A renamed option or a dropped choice in any
    section would leave a documented command that fails."""
    from app.__main__ import parse_args
    from precompute.__main__ import parser_for

    checked = []
    for line in readme_code_lines():
        m = re.search(r"python -m (precompute|app)\b(.*)", line.split(" #", 1)[0])
        if not m or m.group(2).strip().startswith("-"):  # `python -m precompute --help` and the like
            continue
        rest = re.sub(r"(\S+?)\|\S+", r"\1", m.group(2).replace("[", "").replace("]", ""))
        argv = ["1" if re.fullmatch(r"[A-Z]+", a) else a for a in shlex.split(rest)]
        try:
            if m.group(1) == "precompute":
                assert parser_for(argv).parse_args(argv).command == argv[0]
            else:
                parse_args(argv)
        except SystemExit:
            pytest.fail(f"the README's command does not parse: {line.strip()}")
        checked.append(line)
    assert len(checked) >= 30 and any("python -m app" in c for c in checked)


def test_the_space_entry_serves_on_gradios_port_and_stops_on_sigterm(tiny_bundle, tmp_path):
    """`space.py` set SAE_APP_PORT=7860 over the GRADIO_SERVER_PORT a host gives (it served on 7860 when told
    7999), and `docker stop`'s SIGTERM did not stop the app as PID 1 (killed after 10 s): it serves on Gradio's
    port, and SIGTERM closes the server and exits 0 (before: died by the signal, rc -15, with no cleanup)."""
    import os
    import select
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAE_APP_", "GRADIO_SERVER_"))}
    env.update(GRADIO_SERVER_PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1", SAE_APP_BUNDLE=str(tiny_bundle),
               SAE_APP_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "space.py")], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        lines, deadline = [], time.monotonic() + 120
        while not any("[app] serving" in line for line in lines):  # read with a deadline: a hung start fails here
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, "the app did not serve within 120 s:\n" + "".join(lines)
            line = proc.stdout.readline()
            assert line, "the app exited before serving:\n" + "".join(lines)
            lines.append(line)
        assert lines[-1].strip().endswith(f"at http://localhost:{port}"), lines[-1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "closing server" in rest, (proc.returncode, rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_requirements_list_every_package_our_code_imports_and_no_test_tool():
    """Every third-party module imported by the app, the precompute jobs and the benchmarks (read from their
    source, mapped to its distribution by the installed metadata) is in requirements.txt, which the image and a
    Space install; the tests' tools are in requirements-dev.txt only. Until 2026-12-05 pandas, huggingface_hub and
    httpx came only through other packages' dependencies, and the image carried pytest and Playwright."""
    import ast
    import sys
    from importlib.metadata import packages_distributions

    def names(path):
        lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
        return {re.split(r"[<>=!~\[; ]", line)[0].lower().replace("_", "-") for line in lines if line}

    # imported only where a user asks for them, each with its own one-sentence error or venv
    optional = {"wandb": "train --wandb", "sae_lens": "benchmarks' own venv", "dictionary_learning": "benchmarks' own venv"}
    dists = packages_distributions()
    wanted = {}
    for folder in ("app", "sae_core", "precompute", "benchmarks"):
        for f in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
                for m in (m.split(".")[0] for m in mods):
                    if m not in sys.stdlib_module_names and m not in ("app", "sae_core", "precompute", "benchmarks") \
                            and m not in optional:
                        wanted.setdefault(dists[m][0].lower().replace("_", "-"), f.relative_to(REPO))
    runtime, dev = names(REPO / "requirements.txt"), names(REPO / "requirements-dev.txt")
    assert {"torch", "numpy", "gradio", "pillow", "open-clip-torch"} <= set(wanted)  # the scan reads imports
    assert {d: str(f) for d, f in wanted.items() if d not in runtime} == {}
    assert {"pytest", "playwright"} <= dev and not {"pytest", "playwright"} & runtime
    # what requirements.txt lists beyond the imports, each for a reason its comment gives
    assert runtime - set(wanted) <= {"torchvision", "accelerate", "sentencepiece", "protobuf"}


def test_the_python_floor_is_what_every_requirement_admits_and_setup_refuses_below_it(tmp_path):
    """DESIGN.md promised Python 3.10+, but transformers>=5.24 (steering's `cache=`) requires 3.11: on 3.10.13
    `make setup` stopped inside pip with "No matching distribution found" (a review, 2026-12-06). The floor is
    written once (the Makefile's PYTHON_MIN), the README says it, every installed requirement's Requires-Python
    admits it, and setup refuses a venv below it in one sentence before pip runs."""
    import subprocess
    import sys
    from importlib.metadata import PackageNotFoundError, metadata

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    floor = re.search(r"^PYTHON_MIN := (3\.\d+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    readme = (REPO / "README.md").read_text()
    assert f"Python {floor} or newer" in readme
    version = tuple(map(int, floor.split(".")))
    assert tuple(map(int, re.search(r'^python_version: "(3\.\d+)"', readme, re.M).group(1).split("."))) >= version
    assert tuple(map(int, re.search(r"^FROM python:(3\.\d+)", (REPO / "Dockerfile").read_text(), re.M)
                     .group(1).split("."))) >= version
    refused = {}
    for name in ("requirements.txt", "requirements-dev.txt"):
        for line in (REPO / name).read_text().splitlines():
            if line.split("#")[0].strip():
                req = Requirement(line.split("#")[0].strip())
                try:
                    needs = metadata(req.name).get("Requires-Python") or ""
                except PackageNotFoundError:  # pragma: no cover - the venv installs both files
                    needs = "not installed"
                if needs == "not installed" or not SpecifierSet(needs).contains(f"{floor}.0"):
                    refused[req.name] = needs
    assert refused == {}
    assert sys.version_info >= version
    # the set-up's check, as make runs it, on this interpreter: passes at the floor, refuses a floor above it
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)

    def check(minimum: str) -> subprocess.CompletedProcess:
        lines = subprocess.run(["make", "-s", "-n", "-B", "setup", f"VENV={venv}", f"PYTHON_MIN={minimum}"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.splitlines()
        line = next(x for x in lines if "sys.version_info" in x)
        return subprocess.run(["bash", "-c", line], capture_output=True, text=True)

    assert check(floor).returncode == 0
    above = f"{sys.version_info[0]}.{sys.version_info[1] + 1}"
    proc = check(above)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        f"error: {venv} has Python {sys.version.split()[0]} and the project needs Python {above} or newer "
        f"(transformers 5.24, which steering needs, requires it); run make clean, then make setup PY=python{above} "
        "(or a newer python).")


def test_text_files_are_utf8_whatever_the_locale(tmp_path):
    """Every text file our code opens names its encoding: 58 calls took the locale's, so under a locale that is not
    UTF-8 (LC_ALL=C without Python's coercion, a Latin-1 server, Windows' cp1252) the neuron table's CSV of a
    vocabulary with "café" or "東京" failed with a UnicodeEncodeError, as would a stage log quoting such a path
    (until 2026-12-06). Scanned from the source; and the CSV writer run under an ASCII locale."""
    import ast
    import os
    import subprocess
    import sys

    bare = []
    for folder in ("app", "sae_core", "precompute", "benchmarks"):
        for f in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.Call) or any(k.arg == "encoding" for k in node.keywords):
                    continue
                fn = node.func
                if isinstance(fn, ast.Name) and fn.id == "open":
                    mode = node.args[1] if len(node.args) > 1 else next(
                        (k.value for k in node.keywords if k.arg == "mode"), ast.Constant("r"))
                    if not (isinstance(mode, ast.Constant) and "b" in mode.value):
                        bare.append(f"{f.relative_to(REPO)}:{node.lineno} open")
                # our ImageCache.write_text(name, text) is not pathlib's, and names the encoding inside
                elif isinstance(fn, ast.Attribute) and fn.attr in ("read_text", "write_text") and not (
                        isinstance(fn.value, ast.Attribute) and fn.value.attr == "images"):
                    bare.append(f"{f.relative_to(REPO)}:{node.lineno} {fn.attr}")
    assert bare == []
    code = ("import sys; from pathlib import Path; from app.render import ImageCache\n"
            "path = ImageCache(Path(sys.argv[1]), 'b').write_text('neurons.csv', 'label\\ncaf\\u00e9\\n\\u6771\\u4eac\\n')\n"
            "print(Path(path).read_bytes().hex())")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert bytes.fromhex(proc.stdout.strip()).decode("utf-8") == "label\ncafé\n東京\n"
