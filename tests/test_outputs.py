"""Outputs: --save-images recordings, --save-curve, --plot, --make-figures, --json, the standard streams and
startup, also under abuse.

Every output option with every frame source (the simulator, a replayed stack, the REAL ZML against
tests/fake_zaber.py with the simulated camera); recordings that are lossless for every frame type,
never written through a link or into the stack being replayed; closed and failing stdout/stderr; signals before main() has
taken over; one JSON object on every exit.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

import autofocus
from cli_runs import (JSON_KEYS, PNG_MAGIC, TIMING_KEYS, assert_one_line_error, call, call_main, cli, read_csv, run_json,
                      strict, url)
from conftest import FAST_SIM, ROOT
from fake_zaber import DeviceConfig, FakeZaber

NM = 1_000_000
POSIX = os.name == "posix"
SIM = ["--simulate", "--sim-time-scale", "0", "--sim-size", "96x64"]
ZABER_SIM = ["--camera", "sim", "--native-unit-nm", "1", "--sim-size", "320x200"]
RANGE = ["12.1", "12.6", "0.05"]  # 11 positions around the simulated focus, 12.34 mm


def rows(stack: Path) -> list[list[str]]:
    with open(stack / "stack.csv", newline="") as f:
        return list(csv.reader(f))[1:]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small recorded stack (the simulator, 96x64, 12.0-12.7 mm every 0.05)."""
    stack = tmp_path_factory.mktemp("recorded") / "stack"
    assert autofocus.main(["12.0", "12.7", "0.05", *SIM, "--save-images", str(stack)]) == 0
    return stack


# --- every output with every source --------------------------------------------------------------------

@pytest.fixture(params=["simulate", "replay", "zaber"])
def source(request: pytest.FixtureRequest, recorded: Path) -> Any:
    if request.param == "simulate":
        yield SIM
    elif request.param == "replay":
        yield ["--replay", recorded]
    else:
        with FakeZaber(devices=[DeviceConfig(homed=True, position=12 * NM)]) as fake:
            yield [f"tcp://127.0.0.1:{fake.port}", "--camera", "sim", "--native-unit-nm", "1", "--sim-time-scale", "0",
                   "--sim-size", "96x64"]


@pytest.mark.parametrize("output", ["--save-curve", "--plot", "--save-images", "--json"])
def test_every_output_works_with_every_frame_source(source: list[Any], output: str, tmp_path: Path,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    # --replay DIR --save-curve FILE once crashed in check_outputs (exit 1): no test crossed them.
    target = {"--save-curve": tmp_path / "curve.csv", "--plot": tmp_path / "curve.svg",
              "--save-images": tmp_path / "frames", "--json": None}[output]
    code, out, err = call(capfd, *RANGE, *source, output, *([target] if target else []))
    assert code == 0, err
    assert "Traceback" not in err
    if output == "--save-curve":
        lines = target.read_text().splitlines()  # type: ignore[union-attr]
        assert lines[0] == "index,z_mm,score" and len(lines) == 12
    elif output == "--plot":
        assert target.read_text().startswith("<?xml")  # type: ignore[union-attr]
    elif output == "--save-images":
        assert len(rows(target)) == 11  # type: ignore[arg-type]
        replay = autofocus.ReplayStack(target)  # type: ignore[arg-type]
        assert replay.frames[0].shape == (64, 96) and replay.frames[0].dtype == np.uint8
    else:
        doc = json.loads(out)
        assert doc["verdict"] == "focused" and doc["frames"] == 11 and set(doc) == set(autofocus.NO_RESULT_JSON)


# --- recordings ----------------------------------------------------------------------------------------

def float_stack(folder: Path, z0: float = 12.34) -> Path:
    """A replay stack of float32 TIFF frames (a texture blurred away from z0, values around 0.5)."""
    folder.mkdir()
    texture = cv2.GaussianBlur(np.random.default_rng(9).random((64, 96)).astype(np.float32), (0, 0), 1.0)
    lines = ["z_mm,file"]
    for i, z in enumerate(np.round(np.arange(12.0, 12.71, 0.05), 6)):
        frame = cv2.GaussianBlur(texture, (0, 0), 0.4 + 30 * abs(z - z0)) + np.float32(0.25)
        assert cv2.imwrite(str(folder / f"f{i}.tif"), frame)
        lines.append(f"{z},f{i}.tif")
    (folder / "stack.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_float_frames_are_recorded_losslessly_and_replay_to_the_same_curve(tmp_path: Path,
                                                                           capfd: pytest.CaptureFixture[str]) -> None:
    # They were saved as PNGs of 0 and 1 (and OpenCV's [ WARN ] reached stderr); the copy was "all black".
    original = float_stack(tmp_path / "float")
    saved = tmp_path / "saved"
    code, out, err = call(capfd, *RANGE, "--replay", original, "--save-images", saved, "--json")
    assert code == 0 and err.count("\n") == 1 and "WARN" not in err, err
    assert all(name.endswith(".tif") for _, name, *_ in rows(saved))
    source, copy = autofocus.ReplayStack(original), autofocus.ReplayStack(saved)
    first = source.nearest(12.1)
    assert copy.frames[0].dtype == np.float32 and np.array_equal(copy.nearest(12.1), first)  # bit for bit
    code, again, _ = call(capfd, *RANGE, "--replay", saved, "--json")
    assert code == 0 and json.loads(again)["curve"] == json.loads(out)["curve"]


def test_a_recording_is_replaced_only_with_overwrite_and_leaves_no_stale_slices(recorded: Path, tmp_path: Path,
                                                                                 capfd: pytest.CaptureFixture[str]) -> None:
    stack = tmp_path / "stack"
    shutil.copytree(recorded, stack)
    before = {p.name: p.read_bytes() for p in stack.iterdir()}
    code, _, err = call(capfd, *RANGE, *SIM, "--save-images", stack)
    assert code == 2 and "already holds a recording (15 frames, stack.csv): pass --overwrite" in err
    assert {p.name: p.read_bytes() for p in stack.iterdir()} == before  # untouched
    (stack / ".frame_00099.png.part").write_bytes(b"cut short")  # left by a run that died
    code, _, err = call(capfd, "12.2", "12.4", "0.05", *SIM, "--save-images", stack, "--overwrite")
    assert code in (0, 3, 4), err
    assert sorted(p.name for p in stack.iterdir()) == ["frame_00000.png", "frame_00001.png", "frame_00002.png",
                                                       "frame_00003.png", "frame_00004.png", "stack.csv"]
    assert [name for _, name, *_ in rows(stack)] == [f"frame_{i:05d}.png" for i in range(5)]


@pytest.mark.skipif(not POSIX, reason="symbolic links need privileges on Windows")
def test_links_in_an_output_are_never_written_through(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    outside = tmp_path / "precious.csv"
    outside.write_text("keep me\n")
    stack = tmp_path / "stack"
    stack.mkdir()
    (stack / "stack.csv").symlink_to(outside)  # a link planted in the recording folder
    (stack / "frame_00000.png").symlink_to(outside)
    code, _, err = call(capfd, *RANGE, *SIM, "--save-images", stack)
    assert code == 2 and "already holds a recording" in err
    code, _, err = call(capfd, *RANGE, *SIM, "--save-images", stack, "--overwrite")
    assert code == 0, err
    assert outside.read_text() == "keep me\n"  # the links were removed, not followed
    assert not (stack / "stack.csv").is_symlink() and len(rows(stack)) == 11
    for flag in ("--save-curve", "--plot"):
        link = tmp_path / f"link{flag}.png"
        link.symlink_to(outside)
        code, _, err = call(capfd, *RANGE, *SIM, flag, link)
        assert code == 2 and "symbolic link" in err and err.count("\n") == 1
    assert outside.read_text() == "keep me\n"


@pytest.mark.skipif(not POSIX, reason="symbolic links need privileges on Windows")
@pytest.mark.parametrize("how", ["relative", "dotdot", "absolute", "link"])
def test_nothing_is_written_into_files_the_replayed_stack_reads(recorded: Path, tmp_path: Path, how: str,
                                                                capfd: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other"
    shutil.copytree(recorded, other)  # a recording the replayed stack's rows reach into
    replay = tmp_path / "replay"
    (replay / "sub").mkdir(parents=True)  # (the OS follows sub/.. only through a folder that is there)
    name = {"relative": "../other/frame_00003.png", "dotdot": "sub/../../other/frame_00003.png",
            "absolute": str(other / "frame_00003.png"), "link": "linked.png"}[how]
    if how == "link":
        (replay / "linked.png").symlink_to(other / "frame_00003.png")
    (replay / "stack.csv").write_text("z_mm,file\n" + "".join(f"{12 + i / 10},{name}\n" for i in range(8)))
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    code, _, err = call(capfd, "12.1", "12.6", "0.1", "--replay", replay, "--save-images", other, "--overwrite")
    assert code == 2 and "which the replayed stack reads" in err and err.count("\n") == 1, err
    code, _, err = call(capfd, "12.1", "12.6", "0.1", "--replay", replay, "--save-curve", other / "frame_00003.png")
    assert code == 2 and "is a file of the stack being replayed" in err, err
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before


# --- image files: size from the header before decoding -------------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="a file name that is not UTF-8 needs a Linux file system")
def test_a_folder_name_that_is_not_utf8_replays(recorded: Path, tmp_path: Path) -> None:
    # OpenCV's Python binding segfaulted on the path (exit 139): the tool no longer hands it paths.
    folder = os.fsencode(tmp_path) + b"/stack-\xff"
    shutil.copytree(recorded, os.fsdecode(folder))
    proc = subprocess.run([sys.executable, "autofocus.py", "12.1", "12.6", "0.05", "--replay", os.fsdecode(folder),
                           "--save-images", os.fsdecode(folder + b"-copy"), "--json"], cwd=ROOT, capture_output=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["verdict"] == "focused"


# --- output paths that fail before anything moves ----------------------------------------------------------

def test_output_paths_the_system_refuses_are_one_line_and_nothing_moves(tmp_path: Path,
                                                                         capfd: pytest.CaptureFixture[str]) -> None:
    long_name = tmp_path / ("x" * 300 + ".csv")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [(["--save-curve", long_name], "File name too long"), (["--plot", str(long_name) + ".png"], "too long"),
             (["--save-images", tmp_path / ("d" * 300)], "File name too long"),
             (["--save-images", a_file / "sub"], "cannot create the folder")]
    if shutil.which("xelatex") is None:
        cases.append((["--plot", tmp_path / "c.pgf"], "matplotlib cannot write .pgf here ('xelatex' not found"))
    with FakeZaber(devices=[DeviceConfig(homed=False, position=12 * NM)]) as unhomed:
        for extra, message in cases:
            code, out, err = call(capfd, *RANGE, f"tcp://127.0.0.1:{unhomed.port}", "--camera", "sim",
                                  "--native-unit-nm", "1", *extra, "--json")
            assert code == 2 and message in err and err.count("\n") == 1, (extra, err)
            assert json.loads(out)["exit_code"] == 2
        assert unhomed.motion_commands() == []  # not one move, not even homing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # no trial file left behind


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc here")
@pytest.mark.parametrize("flag, path, reason", [
    ("--save-images", "/proc/autofocus-test", "cannot create the folder (No such file or directory); pick another "
                                              "folder"),
    ("--save-curve", "/proc/autofocus-test.csv", "No such file or directory (checked before anything moved); pick "
                                                 "another path"),
])
def test_outputs_under_proc_are_one_line_and_nothing_moves(flag: str, path: str, reason: str,
                                                           capfd: pytest.CaptureFixture[str]) -> None:
    with FakeZaber(devices=[DeviceConfig(homed=False, position=12 * NM)]) as unhomed:
        code, out, err = call(capfd, *RANGE, f"tcp://127.0.0.1:{unhomed.port}", "--camera", "sim",
                              "--native-unit-nm", "1", flag, path, "--json")
        assert code == 2 and err == f"autofocus.py: {flag} {path}: {reason}\n"
        assert json.loads(out)["exit_code"] == 2 and json.loads(out)["error"] == err[len("autofocus.py: "):-1]
        assert unhomed.motion_commands() == []  # not one move, not even homing
    assert not Path(path).exists()


def test_names_the_system_refuses_inside_a_replay_are_one_line(tmp_path: Path,
                                                               capfd: pytest.CaptureFixture[str]) -> None:
    stack = tmp_path / "stack"
    stack.mkdir()
    (stack / "stack.csv").write_text("z_mm,file\n" + "".join(f"{12 + i / 10},{'x' * 300}.png\n" for i in range(3)))
    for extra in ([], ["--save-curve", tmp_path / "c.csv"]):
        code, out, err = call(capfd, "12", "12.2", "0.1", "--replay", stack, *extra, "--json")
        assert code == 2 and "File name too long" in err and err.count("\n") == 1, err
    code, _, err = call(capfd, "12", "12.2", "0.1", "--replay", tmp_path / ("y" * 300))
    assert code == 2 and "File name too long" in err and err.count("\n") == 1, err
    code, _, err = call(capfd, *RANGE, "COM99", "--device-db", tmp_path / ("z" * 300))
    assert code == 2 and "--device-db" in err and "too long" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("target, message", [("file", "is a file, not a folder"),
                                             ("proc", "cannot create the folder")])
def test_make_figures_onto_a_file_or_proc_is_one_line_and_one_json(target: str, message: str, tmp_path: Path,
                                                                   capfd: pytest.CaptureFixture[str]) -> None:
    if target == "proc" and not Path("/proc").is_dir():
        pytest.skip("no /proc here")
    folder = tmp_path / "f" if target == "file" else Path("/proc/autofocus-figures")
    if target == "file":
        folder.write_text("x")
    code, out, err = call(capfd, "--make-figures", folder, "--json")
    assert code == 2 and message in err and err.count("\n") == 1
    assert json.loads(out)["exit_code"] == 2


def test_make_figures_with_json_prints_one_object(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(autofocus, "make_figures", lambda folder, optics, blur: [Path(folder) / "a.png"])
    code, out, err = call(capfd, "--make-figures", tmp_path, "--json")
    assert code == 0 and json.loads(out) == {**autofocus.NO_RESULT_JSON, "exit_code": 0}
    assert err == f"{tmp_path / 'a.png'}\n"


@pytest.mark.skipif(not POSIX, reason="/proc and the temporary folders are POSIX")
@pytest.mark.parametrize("temporary_folder", [True, False])
def test_matplotlib_without_a_writable_home_is_quiet_and_without_any_folder_one_line(tmp_path: Path,
                                                                                     temporary_folder: bool) -> None:
    if temporary_folder:
        # The cache folder matplotlib makes is new and empty: seeded with this machine's font list, so
        # that matplotlib does not spend seconds rebuilding it (what it writes there is not under test).
        import matplotlib.font_manager  # noqa: F401 - builds this process's font list once, if missing

        fonts = [str(f) for f in Path(matplotlib.get_cachedir()).glob("fontlist-v*.json")]
        patch = (f"import shutil; _mkdtemp = tempfile.mkdtemp; tempfile.mkdtemp = lambda *a, **k: (lambda d: "
                 f"([shutil.copy(f, d) for f in {fonts!r}], d)[1])(_mkdtemp(*a, **k)); ")
    else:
        patch = "tempfile._candidate_tempdir_list = lambda: ['/proc/nowhere']; "
    run = (f"import sys, tempfile, runpy; {patch}sys.argv = ['autofocus.py', *sys.argv[1:]]; "
           "runpy.run_path('autofocus.py', run_name='__main__')")
    env = {**os.environ, "HOME": "/proc/nowhere", "XDG_CONFIG_HOME": "/proc/nowhere", "XDG_CACHE_HOME": "/proc/nowhere",
           "TMPDIR": str(tmp_path) if temporary_folder else "/proc/nowhere"}
    env.pop("MPLCONFIGDIR", None)
    proc = subprocess.run([sys.executable, "-c", run, *RANGE, *SIM, "--plot", str(tmp_path / "c.png"), "--json"],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    if temporary_folder:  # matplotlib makes a cache folder there; its notes about it are --verbose only
        assert proc.returncode == 0 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith("best focus at") and (tmp_path / "c.png").stat().st_size > 0
    else:
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "MPLCONFIGDIR" in proc.stderr, proc.stderr
        assert json.loads(proc.stdout)["exit_code"] == 2 and not (tmp_path / "c.png").exists()


# --- streams ------------------------------------------------------------------------------------------------

class Failing(io.StringIO):
    """A stdout that fails as a full disk does, or as a pipe whose reader went away."""

    def __init__(self, error: OSError) -> None:
        super().__init__()
        self.error = error

    def write(self, text: str) -> int:
        raise self.error


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), BrokenPipeError(32, "Broken pipe")])
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_a_stdout_that_fails_is_one_line_and_exit_5(monkeypatch: pytest.MonkeyPatch, error: OSError,
                                                    json_flag: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdout", Failing(error))
    code = autofocus.main([*RANGE, *SIM, *json_flag])
    err = capsys.readouterr().err
    assert code == autofocus.EXIT_HARDWARE and "Traceback" not in err
    assert err.splitlines()[-1] == (f"autofocus.py: could not write to stdout ({error.strerror}); the result did not "
                                    "reach it: exit code 5, not 0")


def test_closed_streams_are_dev_null(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stderr", None)  # 2>&-: Python makes sys.stderr None (--json 2>&- exited 1)
    assert autofocus.main([*RANGE, *SIM, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "focused"
    monkeypatch.setattr(sys, "stdout", None)  # >&- too
    assert autofocus.main([*RANGE, *SIM, "--json"]) == 0


@pytest.mark.skipif(not POSIX, reason="shell redirections of descriptors are POSIX")
def test_closed_and_full_descriptors_through_a_shell(tmp_path: Path) -> None:
    command = " ".join([sys.executable, "autofocus.py", *RANGE, *SIM, "--json", "--save-curve", str(tmp_path / "c.csv")])
    # 2>&-: descriptor 2 is closed, so the first file the run opens would take it (and receive what
    # libpng writes there) were it not opened on /dev/null first; > /dev/full fails at the end.
    script = f"{command} 2>&-; echo rc=$?; {command} >/dev/full 2>{tmp_path / 'err'}; echo rc=$?"
    proc = subprocess.run(["sh", "-c", script], cwd=ROOT, capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    assert json.loads(lines[0])["verdict"] == "focused" and lines[1:] == ["rc=0", "rc=5"], proc.stdout
    err = (tmp_path / "err").read_text()
    assert err.endswith("could not write to stdout (No space left on device); the result did not reach it: exit "
                        "code 5, not 0\n") and "Traceback" not in err
    assert (tmp_path / "c.csv").read_text().startswith("index,z_mm,score")  # opened on its own descriptor


# --- signals before main() has taken over, and --json on every exit ---------------------------------------

@pytest.mark.skipif(not POSIX, reason="kill from outside is POSIX")
def test_a_kill_while_the_standard_library_loads_is_one_line_and_every_json_key(tmp_path: Path) -> None:
    # The handler is installed before the first import: a stdlib module as slow as a cold disk.
    marker = tmp_path / "loading"
    (tmp_path / "argparse.py").write_text(f"import pathlib, time\npathlib.Path({str(marker)!r}).touch()\ntime.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "autofocus.py", *RANGE, *SIM, "--json"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    deadline = 300
    while not marker.exists() and deadline:
        deadline -= 1
        proc.poll()
        __import__("time").sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and err == "autofocus.py: interrupted while starting; nothing was opened or moved\n"
    assert json.loads(out) == {**autofocus.NO_RESULT_JSON, "exit_code": 143, "error": "interrupted while starting"}


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_while_parsing_or_before_main_is_one_line_and_one_json(monkeypatch: pytest.MonkeyPatch, name: str,
                                                                        code: int,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    def parse(self: Any, argv: Any) -> Any:
        signal.raise_signal(getattr(signal, name))
        raise AssertionError("not reached")

    with monkeypatch.context() as patch:
        patch.setattr(autofocus.OneLineParser, "parse_intermixed_args", parse)
        assert autofocus.main([*RANGE, *SIM, "--json"]) == code
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("autofocus.py: ")
    assert set(json.loads(captured.out)) == set(autofocus.NO_RESULT_JSON)
    monkeypatch.setattr(autofocus, "_early_signal", getattr(signal, name))  # noted while the module loaded
    assert autofocus.main([*RANGE, *SIM, "--json"]) == code and autofocus._early_signal is None
    assert json.loads(capsys.readouterr().out)["exit_code"] == code


@pytest.mark.parametrize("argv, message", [
    (["--js"], "unrecognized arguments: --js"),  # no abbreviations: --js is not --json
    (["--save-c", "x.csv"], "unrecognized arguments"),
    (["--sim-seed", "x"], "'x' is not a whole number"),
])
def test_usage_errors_are_one_line_and_json_says_which(argv: list[str], message: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    code = autofocus.main([*RANGE, *SIM, *argv, "--json"])
    captured = capsys.readouterr()
    assert code == 2 and message in captured.err and captured.err.count("\n") == 1
    doc = json.loads(captured.out)
    assert set(doc) == set(autofocus.NO_RESULT_JSON) and message in doc["error"]


def test_the_json_of_a_result_and_of_no_result_have_the_same_keys() -> None:
    stage, camera = autofocus.simulated_microscope(width=96, height=64, time_scale=0, start_mm=12.3)
    result = autofocus.focus(stage, camera, 12.1, 12.6, 0.05)
    assert list(autofocus.result_json(result, exit_code=0)) == list(autofocus.NO_RESULT_JSON)


# --- warnings stay out of the one-line messages ---------------------------------------------------------------

@pytest.mark.parametrize("scale", [1e-40, 3e38])
def test_float_frames_of_any_scale_score_as_at_scale_one_without_warnings(scale: float) -> None:
    frame = np.random.default_rng(0).random((64, 96)).astype(np.float32)
    scaled = (frame.astype(np.float64) * scale).astype(np.float32)  # 1e-40: subnormal float32
    with np.errstate(all="raise"):  # no overflow, underflow or invalid value anywhere in the scores
        for metric in autofocus.METRICS:
            scorer = autofocus.Scorer(metric)
            assert math.isclose(scorer(scaled), scorer(frame), rel_tol=1e-3 if scale < 1e-38 else 1e-6)
            assert math.isclose(scorer.coarse(scaled), scorer.coarse(frame), rel_tol=1e-3 if scale < 1e-38 else 1e-6)


def test_python_warnings_show_only_with_verbose(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    real = autofocus.decide

    calls = []

    def decide(*args: Any, **kwargs: Any) -> Any:
        import warnings

        calls.append(1)  # a new message each time: Python shows a warning once per message and place
        warnings.warn(f"overflow encountered in something ({len(calls)})", RuntimeWarning, stacklevel=1)
        return real(*args, **kwargs)

    monkeypatch.setattr(autofocus, "decide", decide)
    assert autofocus.main([*RANGE, *SIM]) == 0
    assert "RuntimeWarning" not in capsys.readouterr().err
    assert autofocus.main([*RANGE, *SIM, "--verbose"]) == 0
    assert "RuntimeWarning" in capsys.readouterr().err


# --- --json ---------------------------------------------------------------------------------

def test_json_is_the_whole_stdout_with_every_key(capfd: pytest.CaptureFixture[str]) -> None:
    code, doc, err = run_json(capfd, ["12.0", "12.7", "0.05", *FAST_SIM])
    assert code == 0 and doc["exit_code"] == 0 and doc["error"] is None
    assert JSON_KEYS <= doc.keys()
    assert doc["verdict"] == "focused" and doc["search"] == "sweep"
    assert abs(doc["best_mm"] - autofocus.SimOptics.focus_mm) <= 0.05
    assert isinstance(doc["best_score"], float) and doc["best_score"] > 0
    assert doc["frames"] == len(doc["curve"]) == 15
    assert doc["moves"] >= doc["frames"]
    assert doc["elapsed_s"] >= 0
    assert set(doc["timing"]) == TIMING_KEYS and all(v >= 0 for v in doc["timing"].values())
    # Capture order: the sweep's positions, in order, each [z, score].
    assert [z for z, _ in doc["curve"]] == autofocus.plan_positions(12.0, 12.7, 0.05)
    assert all(len(p) == 2 and isinstance(p[1], float) for p in doc["curve"])
    assert max(s for _, s in doc["curve"]) == doc["best_score"]
    # The human summary goes to stderr.
    assert "best focus at" in err


def test_json_fast_search_curve_is_in_capture_order(capfd: pytest.CaptureFixture[str]) -> None:
    code, doc, _ = run_json(capfd, ["10", "14", "0.02", *FAST_SIM, "--search", "fast"])
    assert code == 0 and doc["search"] == "fast"
    assert doc["frames"] == len(doc["curve"]) < 201 // 3
    zs = [z for z, _ in doc["curve"]]
    # The coarse pass comes first, every 8th grid position in sweep order.
    coarse = autofocus.plan_positions(10, 14, 0.02)[::autofocus.COARSE_FACTOR]
    assert zs[: len(coarse)] == coarse
    assert len(set(zs)) == len(zs)


def test_json_on_a_blank_specimen_is_no_peak(capfd: pytest.CaptureFixture[str]) -> None:
    code, doc, err = run_json(capfd, ["11", "13.5", "0.05", *FAST_SIM, "--sim-specimen", "blank", "--sim-start-mm", "11.5"])
    assert code == 3 and doc["exit_code"] == 3
    assert doc["verdict"] == "no_peak" and doc["error"] is None
    assert doc["frames"] == len(doc["curve"]) == 51
    assert doc["best_mm"] == 11.5  # never moved to a noise maximum: back where it started
    assert JSON_KEYS <= doc.keys()
    assert "no focus found" in err


def test_json_exit_codes_of_the_process() -> None:
    proc = cli("11", "13.5", "0.05", *FAST_SIM, "--sim-specimen", "blank", "--json")
    assert proc.returncode == 3
    doc = json.loads(proc.stdout)
    assert doc["verdict"] == "no_peak" and doc["exit_code"] == 3
    assert "Traceback" not in proc.stderr


def test_json_on_a_failure_has_the_same_keys(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    _, ok, _ = run_json(capfd, ["12.0", "12.7", "0.05", *FAST_SIM])
    _, failed, _ = run_json(capfd, ["0", "0.5", "0.1", "--replay", tmp_path / "nothing-here"])
    assert failed["error"]
    assert set(failed) == set(ok), f"missing on failure: {sorted(set(ok) - set(failed))}"


def test_json_on_a_usage_error(capfd: pytest.CaptureFixture[str]) -> None:
    code = call_main(["12", "12", "0.05", *FAST_SIM, "--json"])  # START equals END
    cap = capfd.readouterr()
    assert code == 2
    assert_one_line_error(cap.err, "START_MM equals END_MM")
    doc = json.loads(cap.out)
    assert doc["exit_code"] == 2 and "START_MM equals END_MM" in doc["error"]


def test_json_never_holds_nan_or_infinity() -> None:
    assert autofocus.strict_json({"a": float("nan"), "b": [1.5, float("inf")], "c": {"d": -float("inf")}}) == \
        '{"a": null, "b": [1.5, null], "c": {"d": null}}'


def test_a_failed_run_prints_strict_json(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    real_capture, captures = autofocus.SimCamera.capture, []

    def capture(self: Any) -> Any:
        captures.append(1)
        if len(captures) > 1:  # the look before moving, then unplugged: the run fails with no frame scored
            raise autofocus.CameraError("camera unplugged")
        return real_capture(self)

    monkeypatch.setattr(autofocus.SimCamera, "capture", capture)
    code = autofocus.main(["10", "11", "0.05", *FAST_SIM, "--json"])
    out = strict(capsys.readouterr().out)  # best_mm and the fit are NaN inside: null here
    assert code == 5 and out["best_mm"] is None and out["verdict"] == "failed"


# --- --save-curve and --plot -------------------------------------------------------------------

def test_save_curve_csv(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "curve.csv"
    code, doc, _ = run_json(capfd, ["10", "14", "0.02", *FAST_SIM, "--search", "fast", "--save-curve", out])
    assert code == 0
    header, rows = read_csv(out)
    assert header == ["index", "z_mm", "score"]
    assert len(rows) == doc["frames"]
    assert [int(r[0]) for r in rows] == list(range(doc["frames"]))
    for (_, z, score), (jz, js) in zip(rows, doc["curve"]):
        assert float(z) == pytest.approx(jz, abs=1e-9)
        assert float(score) == pytest.approx(js, rel=1e-8)


def test_save_curve_on_no_peak(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "blank.csv"
    code, doc, _ = run_json(capfd, ["11", "13", "0.1", *FAST_SIM, "--sim-specimen", "blank", "--save-curve", out])
    assert code == 3
    _, rows = read_csv(out)
    assert len(rows) == doc["frames"] == 21


def test_plot_png_headless(tmp_path: Path) -> None:
    out = tmp_path / "curve.png"
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "MPLBACKEND")}
    proc = cli("12.0", "12.7", "0.05", *FAST_SIM, "--plot", out, env=env)
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    image = cv2.imread(str(out), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[0] >= 200 and image.shape[1] >= 300
    assert image.std() > 10  # not a blank canvas


def test_plot_and_curve_to_a_missing_folder_fail_before_moving(tmp_path: Path,
                                                               capfd: pytest.CaptureFixture[str]) -> None:
    for flag in ("--plot", "--save-curve"):
        code = call_main(["12.0", "12.7", "0.05", *FAST_SIM, flag, str(tmp_path / "no" / "such" / "x")])
        cap = capfd.readouterr()
        assert code == 2
        assert_one_line_error(cap.err, flag, "does not exist")
        assert not (tmp_path / "no").exists()


# --- --make-figures -------------------------------------------------------------------------

def test_make_figures_writes_valid_images(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "img"
    code = call_main(["--make-figures", str(folder)])  # the README's command: no range needed
    out = capfd.readouterr().out
    assert code == 0
    written = [Path(line) for line in out.splitlines() if line.strip()]
    names = {p.name for p in written}
    assert {"blurry_image.png", "blurry_laplacian.png", "focused_image.png", "focused_laplacian.png",
            "autofocus.gif", "roi.png", "transparent.png", "show_images.png"} <= names
    roi_view = cv2.imread(str(folder / "roi.png"))
    assert np.all(roi_view == (0, 255, 255), axis=2).sum() > 100  # the --roi figure outlines its region
    assert all(p.is_file() and p.parent == folder for p in written)
    for png in folder.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC
        image = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
        assert image is not None and image.size > 0 and image.std() > 1
    # The focused frame is sharper than the blurry one (the figures tell the README's story).
    scorer = autofocus.Scorer()
    assert scorer(cv2.imread(str(folder / "focused_image.png"), cv2.IMREAD_UNCHANGED)) > \
        2 * scorer(cv2.imread(str(folder / "blurry_image.png"), cv2.IMREAD_UNCHANGED))
    gif = folder / "autofocus.gif"
    assert gif.read_bytes()[:6] in (b"GIF87a", b"GIF89a")
    from PIL import Image

    with Image.open(gif) as anim:
        assert anim.n_frames > 10
        assert anim.size[0] > 100 and anim.size[1] > 50


# --- refused before anything moves; written exactly where asked; failing mid-run ---------------------------

def output_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    (tmp_path / "adir").mkdir()
    (tmp_path / "imgs" / "stack.csv").mkdir(parents=True)
    cases = [
        (["--save-curve", str(tmp_path / "adir")], "is a folder; give a file name"),
        (["--plot", str(tmp_path / "p")], "has no extension"),
        (["--plot", str(tmp_path / "p.xyz")], ".xyz is not a format matplotlib writes"),
        (["--save-curve", str(tmp_path / "same.png"), "--plot", str(tmp_path / "same.png")],
         "is also written as --save-curve"),
        (["--save-images", str(tmp_path / "imgs")], "stack.csv is a folder"),
        (["--save-images", str(tmp_path / "adir"), "--save-curve", str(tmp_path / "adir" / "stack.csv")],
         "is also written as --save-images's stack.csv"),
        (["--save-curve", ""], "empty path"),
    ]
    if POSIX:
        cases.append((["--save-curve", "/dev/full"], "it is a device, not a file; give a file name"))
    return cases


def test_bad_outputs_are_refused_before_anything_moves_even_homing(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with FakeZaber(devices=[DeviceConfig(homed=False, position=5 * NM)]) as unhomed:
        for extra, message in output_cases(tmp_path):
            code = autofocus.main(["10", "10.5", "0.05", url(unhomed), *ZABER_SIM, "--sim-time-scale", "0", *extra])
            err = capsys.readouterr().err
            assert code == 2 and message in err and err.count("\n") == 1, (extra, err)
        assert unhomed.motion_commands() == []  # not one move, not even homing


def test_a_curve_inside_a_new_images_folder_and_a_frame_like_name_are_fine(tmp_path: Path) -> None:
    images = tmp_path / "new" / "imgs"  # does not exist yet: --save-images creates it
    code = autofocus.main(["12", "12.6", "0.05", *FAST_SIM, "--save-images", str(images), "--save-curve",
                           str(images / "curve.csv"), "--plot", str(images / "frame_scores.png")])
    assert code == 0 and (images / "curve.csv").is_file() and (images / "frame_scores.png").is_file()


def test_saving_images_into_the_replayed_stack_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stack = tmp_path / "stack"
    assert autofocus.main(["12", "12.6", "0.05", *FAST_SIM, "--save-images", str(stack)]) == 0
    before = {p.name: p.read_bytes() for p in stack.iterdir()}
    capsys.readouterr()
    code = autofocus.main(["12", "12.6", "0.05", "--replay", str(stack), "--save-images", str(stack)])
    assert code == 2 and "is the stack being replayed" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in stack.iterdir()} == before  # the recording is untouched


def test_exactly_the_plot_path_given_is_written(tmp_path: Path) -> None:
    assert autofocus.main(["12", "12.6", "0.05", *FAST_SIM, "--plot", str(tmp_path / "curve.pdf")]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["curve.pdf"]
    assert (tmp_path / "curve.pdf").read_bytes().startswith(b"%PDF")


def test_a_curve_file_that_fails_mid_run_is_one_line_and_the_json_keeps_the_curve(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    def write_curve_csv(path: Any, samples: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(autofocus, "write_curve_csv", write_curve_csv)
    code = autofocus.main(["10", "11", "0.05", *FAST_SIM, "--json", "--save-curve", str(tmp_path / "c.csv")])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert code == 5 and out["exit_code"] == 5 and len(out["curve"]) == 21
    assert "writing --save-curve" in captured.err and "No space left on device" in captured.err
    assert captured.err.count("\n") == 1


@pytest.mark.skipif(not POSIX, reason="RLIMIT_FSIZE is POSIX")
def test_a_disk_that_fills_up_while_saving_images_stops_the_run_and_leaves_a_replayable_stack(
        tmp_path: Path) -> None:
    import resource

    def small_disk() -> None:  # a file past 37 kB fails with EFBIG, as on a full disk with ENOSPC: the
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # blurred frames' PNGs are ~36.8 kB, sharper ones more
        resource.setrlimit(resource.RLIMIT_FSIZE, (37_000, 37_000))

    stack = tmp_path / "stack"
    proc = subprocess.run([sys.executable, "autofocus.py", "10", "14", "0.05", *FAST_SIM, "--save-images", str(stack), "--json"], cwd=ROOT, capture_output=True, text=True,
                          preexec_fn=small_disk)
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr.count("\n") == 1 and "--save-images: writing" in proc.stderr and "libpng" not in proc.stderr
    out = json.loads(proc.stdout)
    assert 0 < out["frames"] < 81
    rows = (stack / "stack.csv").read_text().splitlines()[1:]
    assert [r.split(",")[1] for r in rows] == sorted(p.name for p in stack.glob("frame_*.png"))
    replay = subprocess.run([sys.executable, "autofocus.py", "10", "10.05", "0.05", "--replay", str(stack)],
                            cwd=ROOT, capture_output=True, text=True)
    assert replay.returncode in (0, 3, 4), replay.stderr  # a valid (partial) stack


# --- saving beside a replayed stack; logging; links, pipes and replacing writes ---------------------------

@pytest.fixture(scope="module")
def rec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """rec/stackA: a recording (the simulator, 96x64, 12.0-12.7 mm every 0.05)."""
    folder = tmp_path_factory.mktemp("rec") / "rec"
    assert autofocus.main(["12.0", "12.7", "0.05", *SIM, "--save-images", str(folder / "stackA")]) == 0
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_replayed_stack_is_read_once(rec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[Path] = []
    real = autofocus.ReplayStack._read_rows
    monkeypatch.setattr(autofocus.ReplayStack, "_read_rows", staticmethod(lambda p: (reads.append(p), real(p))[1]))
    assert autofocus.main(["12.1", "12.6", "0.05", "--replay", str(rec / "stackA"), "--save-curve",
                           str(tmp_path / "c.csv"), "--save-images", str(tmp_path / "copy")]) == 0
    assert len(reads) == 1


def test_saving_beside_a_replayed_stack_is_allowed(rec: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # --replay rec/stackA --save-images rec was refused ("holds frame_00000.png, which the replayed
    # stack reads"), though nothing in rec/stackA is written.
    work = tmp_path / "rec"
    shutil.copytree(rec, work)
    before = snapshot(work / "stackA")
    code, _, err = call(capfd, "12.1", "12.6", "0.05", "--replay", work / "stackA", "--save-images", work)
    assert code == 0, err
    assert snapshot(work / "stackA") == before and (work / "stack.csv").is_file() and (work / "frame_00000.png").is_file()


def test_only_files_the_saver_writes_count_however_the_rows_reach_them(rec: Path, tmp_path: Path,
                                                                       capfd: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other"
    shutil.copytree(rec / "stackA", other / "sub")  # frames one folder down: not the saver's
    shutil.copy(rec / "stackA" / "frame_00003.png", other / "picture.png")  # a name the saver never writes
    replay = tmp_path / "replay"
    replay.mkdir()
    rows = [f"{12 + i / 10},{'../other/sub/frame_00003.png' if i % 2 else str(other / 'picture.png')}" for i in range(8)]
    (replay / "stack.csv").write_text("z_mm,file\n" + "\n".join(rows) + "\n")
    before = snapshot(other)
    code, _, err = call(capfd, "12.1", "12.6", "0.1", "--replay", replay, "--save-images", other)
    assert code in (0, 3, 4) and "which the replayed stack reads" not in err, err
    assert {k: v for k, v in snapshot(other).items() if k in before} == before
    # ... but a frame name of the saver's, reached through ../ or a link, still is refused.
    if POSIX:
        (replay / "linked.png").symlink_to(other / "frame_00001.png")
        (replay / "stack.csv").write_text("z_mm,file\n12,linked.png\n12.1,../other/frame_00002.png\n")
        code, _, err = call(capfd, "12", "12.1", "0.05", "--replay", replay, "--save-images", other, "--overwrite")
        assert code == 2 and "holds frame_00001.png, which the replayed stack reads" in err and err.count("\n") == 1
        # A row naming a link the saver's --overwrite would remove (the file it leads to is elsewhere).
        (other / "frame_00009.png").symlink_to(other / "picture.png")
        (replay / "stack.csv").write_text("z_mm,file\n12,../other/frame_00009.png\n12.1,../other/picture.png\n")
        code, _, err = call(capfd, "12", "12.1", "0.05", "--replay", replay, "--save-images", other, "--overwrite")
        assert code == 2 and "holds frame_00009.png, which the replayed stack reads" in err, err
        assert (other / "frame_00009.png").is_symlink()


def test_verbose_shows_matplotlib_warnings_but_not_its_debug_lines(capfd: pytest.CaptureFixture[str]) -> None:
    # --verbose --plot printed ~240 "findfont: ..." lines.
    try:
        autofocus.configure_logging(True)
        font_manager = logging.getLogger("matplotlib.font_manager")
        font_manager.debug("findfont: Matching sans-serif")
        font_manager.warning("Matplotlib created a temporary cache directory")
        autofocus.log.debug("frame 0: z=12.0000 mm")
        err = capfd.readouterr().err
        assert "findfont" not in err and "temporary cache directory" in err and "frame 0" in err
        autofocus.configure_logging(False)
        font_manager.warning("Matplotlib created a temporary cache directory")
        assert capfd.readouterr().err == ""  # without --verbose an error stays one line
    finally:
        autofocus.configure_logging(False)


@pytest.mark.skipif(not POSIX, reason="symbolic links, pipes and /dev/stdout are POSIX")
def test_an_output_that_is_a_link_a_pipe_or_a_standard_stream_says_what_it_is(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "target.csv"
    target.write_text("keep\n")
    (tmp_path / "link.csv").symlink_to(target)
    code, _, err = call(capfd, "12", "12.5", "0.05", *SIM, "--save-curve", tmp_path / "link.csv")
    assert code == 2 and err.count("\n") == 1 and err.count("give ") == 1, err
    assert err.rstrip().endswith(f"it is a symbolic link to {target}, and the tool never writes through a link; "
                                 "give that file's own path, or another name")
    read_end, write_end = os.pipe()
    try:
        for path, what in ((f"/proc/self/fd/{write_end}", "it is a pipe, not a file"),
                           ("/dev/stdout", "it is the standard output"), ("/dev/null", "it is a device, not a file")):
            if not Path(path).exists():
                continue
            code, _, err = call(capfd, "12", "12.5", "0.05", *SIM, "--save-curve", path)
            assert code == 2 and err.count("\n") == 1 and what in err and "symbolic link" not in err, err
            assert err.count("give ") == 1 and err.rstrip().endswith("give a file name"), err
    finally:
        os.close(read_end)
        os.close(write_end)
    code, _, err = call(capfd, "--make-figures", tmp_path / "link.csv")
    assert code == 2 and "symbolic link" in err and err.rstrip().endswith("or another name"), err
    assert target.read_text() == "keep\n"


@pytest.mark.skipif(not POSIX, reason="symbolic links need privileges on Windows")
def test_a_replacing_write_never_writes_through_a_name_it_did_not_claim(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    precious = tmp_path / "precious"
    precious.write_text("keep\n")
    monkeypatch.setattr(autofocus.os, "urandom", lambda n: b"\x00" * n)  # every temporary name the same ...
    for name in ("curve.csv", "frame_00000.png"):
        temporary = tmp_path / f".{name}.00000000.part"
        temporary.symlink_to(precious)  # ... and a link planted there
        with pytest.raises(FileExistsError):
            autofocus.write_replacing(tmp_path / name, lambda path: path.write_text("overwritten\n"))
        assert precious.read_text() == "keep\n" and not (tmp_path / name).exists()
        assert autofocus.FRAME_FILE.fullmatch(temporary.name) or name == "curve.csv"  # --overwrite finds it
