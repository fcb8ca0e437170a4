"""Issue 10, numbers and replay stacks: extreme values and hostile files give one line, exit 2,
and nothing moves (the stage is the REAL ZML against tests/fake_zaber.py, not homed, so even
homing would show in its log)."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

import autofocus
from conftest import FAST_SIM
from fake_zaber import DeviceConfig, FakeZaber

NM = 1_000_000


def url(fake: FakeZaber) -> str:
    return f"tcp://127.0.0.1:{fake.port}"


def strict(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"non-strict JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


# --- numbers ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["10", "14", "5e-324"], "STEP_MM: 5e-324 is out of range"),
    (["1e300", "14", "0.05"], "START_MM: 1e+300 is out of range"),
    (["10", "1e300", "0.05"], "END_MM: 1e+300 is out of range"),
    (["10", "14", "0.05", "--settle-ms", "1e308"], "--settle-ms: 1e+308 is out of range"),
    (["10", "14", "0.05", "--camera-timeout-ms", "1000000000000"], "--camera-timeout-ms: 1000000000000 is out"),
    (["10", "14", "0.05", "--move-timeout-s", "1e308"], "--move-timeout-s: 1e+308 is out of range"),
    (["10", "14", "0.05", "--backlash-mm", "1e300"], "--backlash-mm: 1e+300 is out of range"),
    (["10", "14", "0.05", "--sim-seed", "-1"], "--sim-seed: -1 is out of range: must be from 0 to 4294967295"),
    (["10", "14", "0.05", "--sim-time-scale", "1e300"], "--sim-time-scale: 1e+300 is out of range"),
    (["10", "14", "0.05", "--sim-photons", "1e308"], "--sim-photons: 1e+308 is out of range"),
    (["10", "14", "0.05", "--sim-size", "10000x10000"], "at most 25 MP"),
    (["0", "20", "0.00000001", "--allow-many"], "STEP_MM: 1e-08 is out of range"),
    (["0", "20", "0.000002", "--allow-many"], "more than 1,000,000, even with --allow-many"),
    (["12", "12.000005", "0.000001", "--search", "fast"], "STEP_MM 1e-06 mm is 1 native units of this stage"),
])
def test_extreme_numbers_are_one_line_exit_2_and_nothing_moves(capsys: pytest.CaptureFixture[str], argv: list[str],
                                                               message: str) -> None:
    with FakeZaber(devices=[DeviceConfig(homed=False, position=5 * NM)]) as unhomed:
        code = autofocus.main([*argv, url(unhomed), "--camera", "sim", "--native-unit-nm", "1", "--json"])
        captured = capsys.readouterr()
        assert code == 2 and message in captured.err and captured.err.count("\n") == 1, captured.err
        assert strict(captured.out)["exit_code"] == 2
        assert unhomed.motion_commands() == []  # not even homing


@pytest.fixture
def micron_fake() -> Any:
    """A homed axis whose native unit is 1 um (coarse): 25 mm of travel, at 10.005 mm."""
    with FakeZaber(devices=[DeviceConfig(homed=True, limit_max=25_000, position=10_005)]) as fake:
        yield fake


def test_a_step_below_a_few_native_units_is_refused_before_anything_moves(micron_fake: FakeZaber,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    code = autofocus.main(["10", "10.02", "0.002", url(micron_fake), "--camera", "sim", "--native-unit-nm", "1000",
                           "--sim-time-scale", "0", "--sim-size", "320x200"])
    err = capsys.readouterr().err
    assert code == 2 and "STEP_MM 0.002 mm is 2 native units of this stage (one unit is 1000 nm)" in err
    assert "at least 3 units" in err and micron_fake.motion_commands() == []


def test_rounding_to_native_units_never_leaves_the_soft_limits(micron_fake: FakeZaber) -> None:
    # 10.0001 and 10.0106 mm are 10000.1 and 10010.6 units: plain rounding would command 10000
    # (below --z-min) and 10011 (above --z-max).
    code = autofocus.main(["10.0001", "10.0106", "0.0035", url(micron_fake), "--camera", "sim", "--native-unit-nm",
                           "1000", "--z-min", "10.0001", "--z-max", "10.0106", "--sim-time-scale", "0", "--sim-size",
                           "320x200", "--sim-focus-mm", "10.005"])
    assert code in (0, 3, 4)
    targets = micron_fake.move_targets()
    assert targets[:4] == [10001, 10004, 10007, 10010]
    assert all(10001 <= t <= 10010 for t in targets)  # the final move (or the return to 10005) too


def test_a_start_outside_the_soft_limits_is_not_returned_to_nor_clamped(micron_fake: FakeZaber) -> None:
    # Issue 18: nothing outside --z-min/--z-max is ever commanded, not even the return to a start
    # outside them (10.005 mm < 10.010): no_peak leaves the stage at the last frame -- never silently
    # at the limit either.
    code = autofocus.main(["10.010", "10.040", "0.005", url(micron_fake), "--camera", "sim", "--native-unit-nm",
                           "1000", "--z-min", "10.010", "--sim-time-scale", "0", "--sim-size", "320x200",
                           "--sim-specimen", "blank"])
    assert code == 3 and min(micron_fake.move_targets()) >= 10_010
    assert micron_fake.move_targets()[-1] == 10_040 and micron_fake.position() == 10_040


# --- replay stacks ----------------------------------------------------------------------------------

def png_bomb() -> bytes:
    """A 69-byte PNG whose header declares 50000x50000 pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 50000, 50000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")[:0]) + chunk(b"IEND", b"")


def make_stack(folder: Path, writer: Any, rows: int = 3) -> Path:
    folder.mkdir()
    writer(folder)
    (folder / "stack.csv").write_text("z_mm,file\n" + "".join(f"{10 + i * 0.05},img.tif\n" for i in range(rows)))
    return folder


def tiff(array: np.ndarray) -> Any:
    def write(folder: Path) -> None:
        assert cv2.imwrite(str(folder / "img.tif"), array)
    return write


def raw(data: bytes) -> Any:
    def write(folder: Path) -> None:
        (folder / "img.tif").write_bytes(data)
    return write


def five_channel_tiff(folder: Path) -> None:
    """An uncompressed 64x48 TIFF with 5 samples a pixel (OpenCV cannot write one)."""
    h, w, c = 48, 64, 5
    data = np.random.default_rng(3).integers(0, 255, (h, w, c), np.uint8).tobytes()
    n = 10
    bits_at = 8 + 2 + n * 12 + 4
    data_at = bits_at + 2 * c
    entries = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, c, bits_at), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, data_at), (277, 3, 1, c), (278, 3, 1, h), (279, 4, 1, len(data)), (284, 3, 1, 1)]
    out = b"II*\x00" + struct.pack("<IH", 8, n)
    for tag, kind, count, value in entries:
        out += struct.pack("<HHIHH", tag, kind, count, value, 0) if kind == 3 and count == 1 else \
            struct.pack("<HHII", tag, kind, count, value)
    (folder / "img.tif").write_bytes(out + struct.pack("<I", 0) + struct.pack(f"<{c}H", *[8] * c) + data)


def truncated_png(folder: Path) -> None:
    ok, encoded = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (200, 320), np.uint8))
    (folder / "img.tif").write_bytes(encoded.tobytes()[: len(encoded) // 2])  # the name does not matter to OpenCV


GRAY = np.random.default_rng(1).random((48, 64))


@pytest.mark.parametrize("writer, message", [
    (raw(png_bomb()), "declares 50000x50000 pixels, more than 50 MP"),
    (tiff(np.dstack([GRAY] * 3)), "has float64 pixels"),
    (tiff((GRAY * 1000).astype(np.int16)), "has int16 pixels"),
    (tiff((GRAY * 1000).astype(np.int32)), "has int32 pixels"),
    (five_channel_tiff, "has 5 channels"),
    (tiff(np.where(GRAY > 0.5, np.inf, GRAY).astype(np.float32)), "non-finite pixels"),
    (truncated_png, "cannot be read as an image"),
    (raw(b"not an image at all"), "cannot be read as an image"),
])
def test_hostile_replay_images_are_one_line_and_nothing_from_opencv_reaches_stderr(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], writer: Any, message: str) -> None:
    stack = make_stack(tmp_path / "stack", writer)
    code = autofocus.main(["10", "10.1", "0.05", "--replay", str(stack), "--json"])
    captured = capfd.readouterr()  # file-descriptor level: libpng and OpenCV write there directly
    assert code == 2 and message in captured.err, captured.err
    assert captured.err.count("\n") == 1 and "libpng" not in captured.err and "WARN" not in captured.err
    assert strict(captured.out)["exit_code"] == 2


def test_each_distinct_file_is_decoded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frame = (np.random.default_rng(2).random((48, 64)) * 200).astype(np.uint8)
    stack = make_stack(tmp_path / "stack", tiff(frame), rows=50)
    real_imdecode = cv2.imdecode
    calls = []

    def imdecode(*args: Any) -> Any:  # the file's bytes are decoded: OpenCV never opens a path itself
        calls.append(len(args[0]))
        return real_imdecode(*args)

    monkeypatch.setattr(autofocus.cv2, "imdecode", imdecode)
    monkeypatch.setattr(autofocus.cv2, "imread", None)  # never called
    replay = autofocus.ReplayStack(stack)
    assert len(replay.frames) == 50 and calls == [(stack / "img.tif").stat().st_size]


def test_replay_picks_the_nearest_slice_between_slices(tmp_path: Path) -> None:
    folder = tmp_path / "stack"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"f{i}.png"), np.full((16, 16), 10 + i, np.uint8))
    (folder / "stack.csv").write_text("z_mm,file\n0.0,f0.png\n0.1,f1.png\n0.2,f2.png\n")
    replay = autofocus.ReplayStack(folder)
    picked = {z: int(replay.nearest(z)[0, 0]) - 10 for z in (-1.0, 0.03, 0.07, 0.13, 0.17, 0.2, 5.0)}
    assert picked == {-1.0: 0, 0.03: 0, 0.07: 1, 0.13: 1, 0.17: 2, 0.2: 2, 5.0: 2}  # nearer neighbour, not lower


# --- strict JSON ------------------------------------------------------------------------------------

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


def test_a_custom_camera_delivering_infinity_is_a_camera_error() -> None:
    stage, camera = autofocus.simulated_microscope(width=64, height=48, time_scale=0)

    class Hot:
        def capture(self) -> np.ndarray:
            frame = camera.capture().astype(np.float32)
            frame[3, 4] = np.inf
            return frame

    with pytest.raises(autofocus.CameraError, match="non-finite pixels"):
        autofocus.focus(stage, Hot(), 12.0, 12.5, 0.05)
    assert stage.position_mm() == 0.0  # back where it started


# --- found by a second implementation of this issue -------------------------------------------------

@pytest.mark.parametrize("extra", [["--sim-seed", "5000"], ["--sim-seed", "4294967295"], ["--z-min", "-1e-3"],
                                   ["--z-max", "1e2"]])
def test_documented_values_work(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # Seeds above 2^31/1e6 overflowed OpenCV's C-int seed; "-1e-3" was taken for an option.
    assert autofocus.main(["12", "12.6", "0.05", *FAST_SIM, *extra]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("options, message", [({"start_mm": 30.0}, "must start inside its travel"),
                                              ({"bit_depth": 64}, "bit_depth: 64 is not one of 8, 12, 16"),
                                              ({"focus_mm": float("inf")}, "focus_mm: inf is not a finite number")])
def test_simulator_options_outside_what_it_models_are_refused(options: dict, message: str) -> None:
    with pytest.raises(autofocus.UsageError, match=message):
        autofocus.simulated_microscope(**options)


def test_replay_half_way_between_slices_picks_the_lower_whatever_the_row_order(tmp_path: Path) -> None:
    folder = tmp_path / "stack"
    folder.mkdir()
    for i in range(2):
        cv2.imwrite(str(folder / f"f{i}.png"), np.full((16, 16), 10 + i, np.uint8))
    (folder / "stack.csv").write_text("z_mm,file\n0.1,f1.png\n0.0,f0.png\n")  # rows not in z order
    assert int(autofocus.ReplayStack(folder).nearest(0.05)[0, 0]) == 10
