"""Outputs, recordings, image files, streams and startup under abuse (issue 19).

Every output option with every frame source (the simulator, a replayed stack, the REAL ZML against
tests/fake_zaber.py with the simulated camera); recordings that are lossless for every frame type,
never written through a link or into the stack being replayed; image headers read before decoding
for every format OpenCV could decode; closed and failing stdout/stderr; signals before main() has
taken over; one JSON object on every exit.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

import autofocus
from conftest import ROOT
from fake_zaber import DeviceConfig, FakeZaber

NM = 1_000_000
POSIX = os.name == "posix"
SIM = ["--simulate", "--sim-time-scale", "0", "--sim-size", "96x64"]
RANGE = ["12.1", "12.6", "0.05"]  # 11 positions around the simulated focus, 12.34 mm


def call(capfd: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    code = autofocus.main([str(a) for a in argv])
    cap = capfd.readouterr()
    return code, cap.out, cap.err


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
    assert all(name.endswith(".tif") for _, name, _ in rows(saved))
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
    assert [name for _, name, _ in rows(stack)] == [f"frame_{i:05d}.png" for i in range(5)]


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

def jpeg(width: int, height: int) -> bytes:
    app0 = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    return b"\xff\xd8" + app0 + b"\xff\xc0\x00\x0b\x08" + struct.pack(">HH", height, width) + b"\x01\x01\x11\x00\xff\xd9"


BOMBS = {  # each declares 30000x30000 pixels (900 MP) in a few bytes
    "JPEG": jpeg(30000, 30000),
    "BMP": b"BM" + bytes(12) + struct.pack("<Iii", 40, 30000, -30000) + bytes(28),
    "WebP": b"RIFF\x00\x00\x00\x00WEBPVP8X\x0a\x00\x00\x00\x00\x00\x00\x00" + (29999).to_bytes(3, "little") * 2,
    "GIF": b"GIF89a" + struct.pack("<HH", 30000, 30000) + bytes(3) + b"\x2c" + bytes(4) + struct.pack("<HH", 8, 8),
    "GIF frame beyond its screen": b"GIF89a" + struct.pack("<HHBBB", 8, 8, 0, 0, 0) + b"\x21\xf9\x04" + bytes(4)
                                   + b"\x00\x2c" + bytes(4) + struct.pack("<HH", 30000, 30000) + bytes(3),
    "PNM": b"P5\n# a comment\n30000 30000\n255\n",
    "PAM": b"P7\nWIDTH 30000\nHEIGHT 30000\nDEPTH 1\nMAXVAL 255\nENDHDR\n",
    "PFM": b"Pf\n30000 30000\n-1\n",
    "Sun raster": b"\x59\xa6\x6a\x95" + struct.pack(">III", 30000, 30000, 8) + bytes(20),
    "Radiance HDR": b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 30000 +X 30000\n",
    "BigTIFF": b"II+\x00\x08\x00\x00\x00" + struct.pack("<QQ", 16, 2) + struct.pack("<HHQQ", 256, 16, 1, 30000)
               + struct.pack("<HHQQ", 257, 16, 1, 30000) + bytes(8),
    "JPEG 2000": b"\xff\x4f\xff\x51\x00\x29\x00\x00" + struct.pack(">IIII", 30000, 30000, 0, 0) + bytes(24),
    "JPEG in a big APP segment": jpeg(30000, 30000)[:2] + b"\xff\xe1\xff\xff" + bytes(65533) + jpeg(30000, 30000)[2:],
}


@pytest.mark.parametrize("kind", list(BOMBS))
def test_a_declared_size_is_refused_before_anything_is_decoded(kind: str, tmp_path: Path,
                                                               capfd: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    stack = tmp_path / "stack"
    stack.mkdir()
    (stack / "img.bin").write_bytes(BOMBS[kind])
    (stack / "stack.csv").write_text("z_mm,file\n10,img.bin\n10.1,img.bin\n")
    monkeypatch.setattr(autofocus.cv2, "imdecode", None)  # it must never get that far
    code, out, err = call(capfd, "10", "10.1", "0.05", "--replay", stack, "--json")
    assert code == 2 and "declares 30000x30000 pixels, more than 50 MP" in err and err.count("\n") == 1, err
    assert json.loads(out)["exit_code"] == 2


@pytest.mark.parametrize("ext", [".bmp", ".jpg", ".jp2", ".webp", ".pgm", ".ppm", ".pam", ".pfm", ".sr", ".hdr",
                                 ".tif", ".png", ".gif"])
def test_every_format_opencv_reads_is_checked_and_replays(ext: str, tmp_path: Path) -> None:
    if not cv2.haveImageWriter("x" + ext):
        pytest.skip(f"this OpenCV cannot write {ext}")
    frame = (np.random.default_rng(4).random((48, 64, 3)) * 200 + 20).astype(np.uint8)
    if ext in (".pgm",):
        frame = frame[:, :, 0]
    if ext in (".pfm", ".hdr"):
        frame = frame.astype(np.float32) / 255
    ok, data = cv2.imencode(ext, frame)
    assert ok
    kind, width, height, _ = autofocus.image_header(data.tobytes())
    assert (width, height) == (64, 48), kind
    (tmp_path / f"img{ext}").write_bytes(data.tobytes())
    image = autofocus.read_image(tmp_path / f"img{ext}", "img")
    assert image.shape[:2] == (48, 64)


@pytest.mark.parametrize("data, message", [
    (b"\x00\x00\x00 ftypavif" + bytes(40), "not one of the formats whose size can be checked"),  # AVIF
    (b"\x76\x2f\x31\x01" + bytes(40), "not one of the formats"),  # OpenEXR
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01" + bytes(6) + b"\x00\x01\xff\xda", "no frame header"),  # JPEG, no SOF
    (b"\xff\xd8\xff\xc0\x00\x0b\x08\x00\x00\x01\x00\x01", "DNL"),  # height 0
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR\x00\x00", "cut short"),
    (b"II*\x00\x08\x00\x00\x00\x00\x00", "no width or height"),
])
def test_headers_that_cannot_be_checked_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        autofocus.image_header(data)


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
