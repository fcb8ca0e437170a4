"""The Basler backend on Basler's REAL pylon SDK (pypylon), against pylon's own camera emulator.

``PYLON_CAMEMU=N`` makes pylon present N emulated GenICam cameras with the real node map; the
tests set it themselves (pylon reads it at each enumeration).  Emulator facts these tests rely on
(checked with pypylon 26.9): ``ImageFilename`` is writable only while not grabbing; a folder there
is played image by image, in name order, one per trigger; node values live as long as the device
object (a newly created device starts from the emulator's defaults), so "restored" is checked on a
camera the test holds and lends to the run (``from_camera``, also how the CLI's camera is swapped
in), and the tool's own open/close path separately.  The stage is the REAL ZML against
tests/fake_zaber.py.
"""
from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

import autofocus
from conftest import CAMERA_BAD
from fake_zaber import DeviceConfig, FakeZaber, Faults

pylon = pytest.importorskip("pypylon.pylon", reason="pypylon is not installed (pip install pypylon)")

NM = 1_000_000
USER_NODES = ("PixelFormat", "Width", "Height", "OffsetX", "OffsetY", "AcquisitionMode", "TriggerSelector",
              "TriggerMode", "TriggerSource", "ExposureTime", "ExposureAuto", "GainAuto")


@pytest.fixture
def emulator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYLON_CAMEMU", "1")  # one emulated camera


@pytest.fixture
def user_camera(emulator: None) -> Iterator[Any]:
    """The emulated camera held by the test, left as a user might have it: Mono8, free-running,
    auto exposure on, a 640x480 region."""
    cam = pylon.InstantCamera(pylon.TlFactory.GetInstance().CreateFirstDevice())
    cam.Open()
    cam.PixelFormat.Value = "Mono8"
    cam.Width.Value, cam.Height.Value, cam.OffsetX.Value, cam.OffsetY.Value = 640, 480, 8, 4
    cam.TriggerSelector.Value = "FrameStart"
    cam.TriggerMode.Value = "Off"
    cam.ExposureTime.Value = 10000.0
    cam.ExposureAuto.Value = "Continuous"
    cam.GainAuto.Value = "Once"
    yield cam
    cam.Close()
    cam.DestroyDevice()


def snapshot(cam: Any) -> dict[str, Any]:
    return {name: getattr(cam, name).Value for name in USER_NODES}


def lend(monkeypatch: pytest.MonkeyPatch, cam: Any) -> None:
    """--camera basler uses the test's camera (a new device would start from the defaults)."""
    monkeypatch.setitem(autofocus.LIVE_CAMERAS, "basler",
                        lambda serial, **options: autofocus.BaslerCamera.from_camera(cam, **options))


def url(fake: FakeZaber) -> str:
    return f"tcp://127.0.0.1:{fake.port}"


# --- the adapter ------------------------------------------------------------------------------------

def test_the_adapter_configures_grabs_and_puts_every_node_back(user_camera: Any) -> None:
    before = snapshot(user_camera)
    with autofocus.BaslerCamera.from_camera(user_camera, exposure_ms=2.5, roi=(16, 8, 320, 200)) as basler:
        cam = user_camera
        assert cam.TriggerMode.Value == "On" and cam.TriggerSource.Value == "Software"
        assert cam.TriggerSelector.Value == "FrameStart" and cam.AcquisitionMode.Value == "Continuous"
        assert cam.ExposureAuto.Value == "Off" and cam.GainAuto.Value == "Off"  # frozen for the sweep
        assert cam.ExposureTime.Value == 2500.0
        assert basler.pixel_format == "Mono16"  # a 12-bit sensor (Mono12 offered): 16-bit pixels, not Mono8
        assert (cam.OffsetX.Value, cam.OffsetY.Value, cam.Width.Value, cam.Height.Value) == (16, 8, 320, 200)
        frames = [basler.capture() for _ in range(3)]
        assert all(f.shape == (200, 320) and f.dtype == np.uint16 for f in frames)
        assert basler.timeout_ms >= 2.5 + autofocus.CAMERA_TIMEOUT_MARGIN_MS
    assert snapshot(user_camera) == before  # every node the run changed is back
    assert user_camera.IsOpen() and not user_camera.IsGrabbing()  # the caller's camera: open, as lent


def triggers(cam: Any) -> tuple[str, dict[str, tuple[str, str, str]]]:
    """The selected TriggerSelector entry, and every entry's (mode, source, activation)."""
    selected, out = cam.TriggerSelector.Value, {}
    for entry in cam.TriggerSelector.Symbolics:
        cam.TriggerSelector.Value = entry
        out[entry] = (cam.TriggerMode.Value, cam.TriggerSource.Value, cam.TriggerActivation.Value)
    cam.TriggerSelector.Value = selected
    return selected, out


def test_trigger_settings_are_put_back_per_trigger_selector_entry(user_camera: Any) -> None:
    # A camera left with FrameStart triggered by Line1 (falling edge), a burst trigger on, and the
    # selector on FrameBurstStart: TriggerMode belongs to the selected entry, so a journal keeping
    # one value brought FrameStart back Off (reproduced on this emulator before the fix).
    cam = user_camera
    cam.TriggerSelector.Value = "FrameStart"
    cam.TriggerSource.Value, cam.TriggerActivation.Value, cam.TriggerMode.Value = "Line1", "FallingEdge", "On"
    cam.TriggerSelector.Value = "FrameBurstStart"
    cam.TriggerSource.Value, cam.TriggerMode.Value = "Line2", "On"
    before = triggers(cam)
    assert before[0] == "FrameBurstStart" and before[1]["FrameStart"] == ("On", "Line1", "FallingEdge")
    with autofocus.BaslerCamera.from_camera(cam) as basler:
        during = triggers(cam)[1]
        assert during["FrameStart"][:2] == ("On", "Software") and cam.TriggerSelector.Value == "FrameStart"
        assert [e for e, (mode, _, _) in during.items() if mode == "On"] == ["FrameStart"]  # the burst gate off
        assert basler.capture().ndim == 2
    assert triggers(cam) == before  # every entry's mode, source and activation, and the selector


def test_a_camera_the_tool_opens_is_configured_and_closed(emulator: None) -> None:
    basler = autofocus.BaslerCamera(exposure_ms=1.0)
    cam = basler._cam
    assert cam.IsOpen() and cam.IsGrabbing() and cam.TriggerMode.Value == "On"
    assert basler.capture().shape == (cam.Height.Value, cam.Width.Value)
    basler.close()
    assert basler._cam is None and not cam.IsOpen()  # closed, its device released
    basler.close()  # twice is harmless


def test_each_capture_is_a_new_frame_triggered_after_the_call(user_camera: Any, tmp_path: Path) -> None:
    for i in range(4):
        cv2.imwrite(str(tmp_path / f"f{i}.png"), np.full((200, 320), 20 * (i + 1), np.uint8))
    cam = user_camera
    cam.TestImageSelector.Value, cam.ImageFileMode.Value = "Off", "On"
    cam.ImageFilename.Value = str(tmp_path)
    cam.Width.Value, cam.Height.Value, cam.OffsetX.Value, cam.OffsetY.Value = 320, 200, 0, 0
    with autofocus.BaslerCamera.from_camera(cam) as basler:
        means = [int(basler.capture().mean()) >> 8 for _ in range(4)]  # Mono16: the 8-bit file << 8
    assert means == [20, 40, 60, 80]  # one trigger, one frame, in order: nothing stale, nothing skipped


@pytest.mark.parametrize("where", ["Open", "configuration"])
def test_ctrl_c_while_the_camera_opens_still_closes_it(emulator: None, monkeypatch: pytest.MonkeyPatch,
                                                       where: str) -> None:
    opened: list[Any] = []

    class InterruptedCamera(pylon.InstantCamera):  # type: ignore[misc, name-defined]
        def Open(self) -> None:  # noqa: N802 - pylon's name
            super().Open()
            opened.append(self)
            if where == "Open":
                raise KeyboardInterrupt  # Ctrl-C as Open() returns: the camera is open

    monkeypatch.setattr(pylon, "InstantCamera", InterruptedCamera)
    if where == "configuration":
        monkeypatch.setattr(autofocus.BaslerCamera, "_configure", lambda self, *a: signal.raise_signal(signal.SIGINT))
    with pytest.raises(KeyboardInterrupt):
        autofocus.BaslerCamera()
    assert len(opened) == 1 and not opened[0].IsOpen()  # closed (the emulator would not refuse a second open)
    monkeypatch.undo()
    monkeypatch.setenv("PYLON_CAMEMU", "1")
    again = autofocus.BaslerCamera()
    assert again.capture().ndim == 2
    again.close()


def test_an_unknown_serial_names_the_cameras_found(emulator: None) -> None:
    with pytest.raises(autofocus.CameraError, match=r"^serial 123: no such Basler camera; found 0815-0000") as caught:
        autofocus.BaslerCamera("123")  # the adapter speaks in its own terms; the command line in its options
    labels = autofocus.option_labels(autofocus.build_parser())
    assert str(caught.value.relabel(labels)).startswith("--camera-serial 123: no such Basler camera")


def test_without_pypylon_one_line_says_how_to_install_it_and_nothing_moves(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "pypylon", None)  # as if not installed
    with FakeZaber(devices=[DeviceConfig(homed=False, position=5 * NM)]) as unhomed:
        code = autofocus.main(["10", "10.5", "0.05", url(unhomed), "--camera", "basler", "--native-unit-nm", "1"])
        err = capsys.readouterr().err
        assert code == 2 and "pip install pypylon" in err and err.count("\n") == 1
        assert unhomed.motion_commands() == []


# --- end to end: real ZML, fake Zaber, real pylon emulator ----------------------------------------

def rendered_stack(folder: Path, positions: list[float], focus_mm: float) -> None:
    """What the simulator shows at each position, one file per planned frame (the emulator plays
    them in name order, one per trigger: frame k is what the stage sees at position k)."""
    optics = autofocus.SimOptics(focus_mm=focus_mm, width=320, height=200, seed=3)
    stage = autofocus.SimStage(travel_mm=(0, 25), timing=autofocus.SimTiming(scale=0.0))
    sim = autofocus.SimCamera(stage, optics, autofocus.SimTiming(scale=0.0))
    folder.mkdir()
    for k, z in enumerate(positions):
        stage.move_to(z)
        cv2.imwrite(str(folder / f"frame_{k:04d}.png"), sim.capture())


@pytest.fixture
def serving(user_camera: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    positions = autofocus.plan_positions(10.0, 10.5, 0.02)
    rendered_stack(tmp_path / "frames", [10.0, *positions], focus_mm=10.237)  # first: the look before moving
    cam = user_camera
    cam.TestImageSelector.Value, cam.ImageFileMode.Value = "Off", "On"
    cam.ImageFilename.Value = str(tmp_path / "frames")
    cam.Width.Value, cam.Height.Value, cam.OffsetX.Value, cam.OffsetY.Value = 320, 200, 0, 0
    lend(monkeypatch, cam)
    yield positions


def watch_triggers(monkeypatch: pytest.MonkeyPatch, fake: FakeZaber, stop_at: int | None = None) -> list[bool]:
    """Record, at every capture (the trigger), whether the fake's axis was moving."""
    busy: list[bool] = []
    real = autofocus.BaslerCamera.capture

    def capture(self: autofocus.BaslerCamera) -> np.ndarray:
        busy.append(fake.is_busy())
        if stop_at is not None and len(busy) == stop_at:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C in the middle of the sweep
        return real(self)

    monkeypatch.setattr(autofocus.BaslerCamera, "capture", capture)
    return busy


def test_end_to_end_finds_the_focal_plane_with_the_stage_idle_at_every_trigger(
        serving: list[float], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with FakeZaber(devices=[DeviceConfig(homed=True, position=10 * NM)], speed_native_per_s=2e7) as fake:
        busy = watch_triggers(monkeypatch, fake)
        code = autofocus.main(["10", "10.5", "0.02", url(fake), "--camera", "basler", "--native-unit-nm", "1",
                               "--json"])
        out = capsys.readouterr()
        import json

        result = json.loads(out.out)
        assert code == 0, out.err
        assert abs(result["best_mm"] - 10.237) <= 0.02 / 4  # within STEP/4 of the simulator's focal plane
        assert result["frames"] == len(serving) == len(busy) - 1 and not any(busy)  # idle at every trigger
        assert fake.move_targets()[:-1] == [round(z * NM) for z in serving]


@pytest.mark.parametrize("how", ["stage fault", "Ctrl-C"])
def test_every_node_is_put_back_after_a_fault_or_ctrl_c_mid_sweep(
        serving: list[float], user_camera: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        how: str) -> None:
    before = snapshot(user_camera)
    faults = Faults(reject_move=6) if how == "stage fault" else None
    with FakeZaber(devices=[DeviceConfig(homed=True, position=10 * NM)], faults=faults) as fake:
        watch_triggers(monkeypatch, fake, stop_at=5 if how == "Ctrl-C" else None)
        code = autofocus.main(["10", "10.5", "0.02", url(fake), "--camera", "basler", "--native-unit-nm", "1"])
        err = capsys.readouterr().err
        assert code == (5 if how == "stage fault" else 130), err
        # A rejected move is not the tool's doing: nothing more moves; Ctrl-C is: back to the start.
        assert ("nothing more was moved" if how == "stage fault" else "returned to its start, 10.0000 mm") in err
    assert snapshot(user_camera) == before and not user_camera.IsGrabbing()


def test_basler_from_camera_refuses_bad_settings_and_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    pylon = pytest.importorskip("pypylon.pylon", reason="pypylon is not installed")
    monkeypatch.setenv("PYLON_CAMEMU", "1")
    cam = pylon.InstantCamera(pylon.TlFactory.GetInstance().CreateFirstDevice())
    cam.Open()
    try:
        before = {n: getattr(cam, n).Value for n in ("PixelFormat", "Width", "TriggerMode", "ExposureTime")}
        for keywords, named in CAMERA_BAD:
            with pytest.raises(autofocus.BadValue) as caught:
                autofocus.BaslerCamera.from_camera(cam, **keywords)
            assert str(caught.value).startswith(named) and not cam.IsGrabbing()
            assert {n: getattr(cam, n).Value for n in before} == before
            with pytest.raises(autofocus.BadValue):
                autofocus.BaslerCamera(**keywords)  # checked before any camera is listed or opened
    finally:
        cam.Close()
        cam.DestroyDevice()
