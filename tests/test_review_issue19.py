"""Defects a cold review of issue 19's work found (hostile input, round 3), pinned.

Frames too narrow to bin, an image OpenCV refuses to decode, a header check that read the whole
file first, a NUL byte in a replay row, a stack read twice, a --save-images folder refused for a
recording it would not touch, an ROI that moved the stage before it was found too large, parts
probed instead of called, matplotlib's debug lines, confusing output-path messages, numbers shown
as the float they overflowed to, and the repeated work on the scoring path.
"""
from __future__ import annotations

import builtins
import io
import json
import logging
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

import autofocus
from conftest import FAST_SIM

POSIX = os.name == "posix"
SIM = ["--simulate", "--sim-time-scale", "0", "--sim-size", "96x64"]


def call(capfd: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    code = autofocus.main([str(a) for a in argv])
    cap = capfd.readouterr()
    return code, cap.out, cap.err


def one_image_stack(folder: Path, data: bytes, name: str = "img.bin") -> Path:
    folder.mkdir(parents=True)
    (folder / name).write_bytes(data)
    (folder / "stack.csv").write_text(f"z_mm,file\n10,{name}\n10.1,{name}\n")
    return folder


# --- frames: checked once, scored safely -----------------------------------------------------------------

def test_each_frame_is_checked_once_and_only_float_frames_are_rescaled(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"frame_problem": 0, "float_in_range": 0}
    for name in calls:
        real = getattr(autofocus, name)
        monkeypatch.setattr(autofocus, name, lambda *a, _real=real, _name=name: (
            calls.__setitem__(_name, calls[_name] + 1), _real(*a))[1])
    stage, camera = autofocus.simulated_microscope(width=96, height=64, time_scale=0, start_mm=12.3)
    result = autofocus.focus(stage, camera, 12.0, 12.7, 0.05)
    # One check per frame (check_frame), one for the look before the first move; no rescaling of 8-bit frames.
    assert calls == {"frame_problem": result.frames + 1, "float_in_range": 0}

    class Float:
        def capture(self) -> np.ndarray:
            return camera.capture().astype(np.float32)

    calls.update(frame_problem=0, float_in_range=0)
    result = autofocus.focus(stage, Float(), 12.0, 12.7, 0.05)
    assert calls == {"frame_problem": result.frames + 1, "float_in_range": 2 * result.frames}  # fine + coarse


def test_a_frame_too_narrow_to_bin_is_a_camera_error_before_anything_moves(capfd: pytest.CaptureFixture[str],
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # (1, 1_500_001) and (2_000_000, 1) frames reached the 2x2 binning and raised OpenCV's own error.
    moves: list[float] = []
    real_move = autofocus.SimStage.move_to
    monkeypatch.setattr(autofocus.SimStage, "move_to", lambda self, z: (moves.append(z), real_move(self, z))[1])
    for shape in ((1, 1_500_001), (2_000_000, 1)):
        monkeypatch.setattr(autofocus.SimCamera, "capture", lambda self, s=shape: np.full(s, 100, np.uint8))
        code, _, err = call(capfd, "12", "12.5", "0.05", *SIM)
        assert code == autofocus.EXIT_HARDWARE and err.count("\n") == 1, err
        assert f"a {shape[0]}x{shape[1]} frame; each side needs at least 16 pixels to be scored" in err
    assert moves == []


# --- replay images -----------------------------------------------------------------------------------------

def test_an_image_opencv_refuses_to_decode_is_one_line(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # 1 x 2,000,000 pixels: inside the tool's 50 MP, beyond OpenCV's CV_IO_MAX_IMAGE_WIDTH (2^20).
    ok, data = cv2.imencode(".tif", np.full((1, 2_000_000), 100, np.uint8))
    assert ok
    stack = one_image_stack(tmp_path / "stack", data.tobytes(), "wide.tif")
    code, out, err = call(capfd, "10", "10.1", "0.05", "--replay", stack, "--json")
    assert code == 2 and err.count("\n") == 1, err
    assert "wide.tif (2000000x1 TIFF) cannot be decoded: OpenCV refuses it" in err and "CV_IO_MAX_IMAGE_WIDTH" in err
    assert json.loads(out)["exit_code"] == 2


@pytest.fixture
def bytes_read(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every byte read_image reads from its file, counted where it leaves the file system."""
    counted: list[int] = []

    class Counting(io.FileIO):
        def readinto(self, buffer: Any) -> int | None:
            n = super().readinto(buffer)
            counted.append(n or 0)
            return n

    def counting_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        return io.BufferedReader(Counting(file, "r")) if mode == "rb" else builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(autofocus, "open", counting_open, raising=False)
    return counted


@pytest.mark.parametrize("data, message", [
    (b"\xff\xd8" + b"\xff" * (8 << 20), "its JPEG markers are damaged"),  # once walked in Python: 27.6 s for 50 MB
    (b"BM" + bytes(12) + struct.pack("<Iii", 40, 30000, -30000) + bytes(8 << 20), "declares 30000x30000 pixels"),
    (b"\xff\xd8" + b"\xff\xe1\x00\x04\x00\x00" * 1_000_000, "runs on for more than 4096 segments"),
])
def test_a_file_is_refused_from_its_header_without_reading_the_rest(tmp_path: Path, bytes_read: list[int],
                                                                    data: bytes, message: str) -> None:
    path = tmp_path / "img.bin"
    path.write_bytes(data)
    with pytest.raises(autofocus.StackError, match=message):
        autofocus.read_image(path, "img")
    assert len(data) > 5 << 20 and sum(bytes_read) <= 64 << 10


def test_a_header_far_into_the_file_is_found_and_the_file_read_once(tmp_path: Path, bytes_read: list[int]) -> None:
    frame = (np.random.default_rng(7).random((48, 64)) * 200 + 20).astype(np.uint8)
    ok, jpeg = cv2.imencode(".jpg", frame)
    padding = (b"\xff\xef\xff\xff" + bytes(65533)) * 3  # three full APP15 segments: the frame header lies 192 KiB in
    (tmp_path / "big.jpg").write_bytes(jpeg.tobytes()[:2] + padding + jpeg.tobytes()[2:])
    ok, tiff = cv2.imencode(".tif", (np.random.default_rng(8).random((400, 400)) * 255).astype(np.uint8))
    (tmp_path / "end.tif").write_bytes(tiff.tobytes())  # OpenCV writes the TIFF directory after the pixels
    assert struct.unpack("<I", tiff.tobytes()[4:8])[0] > 150_000
    for name in ("big.jpg", "end.tif"):
        bytes_read.clear()
        image = autofocus.read_image(tmp_path / name, name)
        size = (tmp_path / name).stat().st_size
        assert image.shape[:2] in ((48, 64), (400, 400)) and sum(bytes_read) <= size + (32 << 10), name


def test_a_nul_byte_in_a_stack_row_is_one_line(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    stack = tmp_path / "stack"
    stack.mkdir()
    cv2.imwrite(str(stack / "a.png"), np.full((16, 16), 100, np.uint8))
    (stack / "stack.csv").write_text("z_mm,file\n12,a.png\n12.1,a\x00.png\n")
    for extra in ([], ["--save-curve", tmp_path / "c.csv"], ["--save-images", tmp_path / "out"]):
        code, out, err = call(capfd, "12", "12.1", "0.05", "--replay", stack, *extra, "--json")
        assert code == 2 and err.count("\n") == 1, err
        assert "line 3: the file name holds a NUL byte" in err and json.loads(out)["exit_code"] == 2


# --- a replayed stack and the outputs ---------------------------------------------------------------------

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


# --- an ROI larger than the frame --------------------------------------------------------------------------

def test_an_roi_larger_than_the_frame_moves_nothing(capfd: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    moves: list[float] = []
    real_move = autofocus.SimStage.move_to
    monkeypatch.setattr(autofocus.SimStage, "move_to", lambda self, z: (moves.append(z), real_move(self, z))[1])
    code, out, err = call(capfd, "12", "12.5", "0.05", *SIM, "--roi", "0,0,500,500", "--json")
    assert code == 2 and err.count("\n") == 1 and "ROI 0,0,500,500" in err and "does not fit in the 96x64" in err
    assert json.loads(out)["exit_code"] == 2 and moves == []


# --- logging, output paths, numbers -------------------------------------------------------------------------

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


@pytest.mark.parametrize("typed", ["1e400", "-1e400", "1e-400"])
def test_a_number_beyond_a_float_is_shown_as_typed(typed: str, capfd: pytest.CaptureFixture[str]) -> None:
    code, _, err = call(capfd, typed, "12.5", "0.05", *SIM)
    assert code == 2 and err.count("\n") == 1 and f"'{typed}'" in err and "inf" not in err.replace("info", ""), err
    code, _, err = call(capfd, "12", "12.5", "0.05", *SIM, "--z-max", typed)
    assert code == 2 and f"'{typed}'" in err, err


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


# --- one helper for replacing writes ------------------------------------------------------------------------

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


def test_the_request_defaults_are_focus_defaults() -> None:
    defaults = {f.name: f.default for f in autofocus.dataclasses.fields(autofocus.Request)[3:]}
    assert defaults == {k: v for k, v in autofocus.focus.__kwdefaults__.items() if k != "on_frame"}
    assert autofocus.InterruptSignals.NAMES == autofocus.EARLY_SIGNALS
