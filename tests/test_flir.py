"""The FLIR camera through the REAL simple-pyspin package over the fake PySpin (tests/fake_pyspin; no SDK,
no camera): streaming with one acquisition and a trigger per frame, exposure and bit depth, faults and
the missing SDK; on real-camera terms (issues 9 and 13) colour (Bayer) and packed
pixel formats, auto exposure/gain that hunt between frames, every node put back on every exit path
(also through the real CLI, ZML and the fake Zaber device), the camera released so that the next
Init works, long exposures, a camera lent by the caller, and the sensor ROI.
"""
from __future__ import annotations

import builtins
import sys
import time
from types import ModuleType
from typing import Any

import cv2
import numpy as np
import pytest

import autofocus
from conftest import CAMERA_BAD
from fake_zaber import DeviceConfig, FakeZaber

W, H = 160, 120
FAST = dict(exposure_auto="Off", exposure_us=1000.0, readout_s=0.0005)
RGB = (200.0, 100.0, 50.0)  # a warm, uniform colour field
GRAY = 0.299 * RGB[0] + 0.587 * RGB[1] + 0.114 * RGB[2]  # what a correct debayer makes of it: 124.35


def fake_camera(PySpin: ModuleType, **spec: Any) -> Any:  # noqa: N803
    PySpin.fake.reset(cameras=[PySpin.FakeCameraSpec(serial="4242", width=W, height=H, **{**FAST, **spec})])
    return PySpin.fake.camera("4242")


def camera(PySpin: ModuleType, **spec: object) -> object:  # noqa: N803
    return fake_camera(PySpin, **spec)  # the 160x120 camera, W x H


def snapshot(dev: Any) -> dict[str, Any]:
    """Every node value of the camera (the fake's node store, read past the access rules), the
    trigger nodes of every TriggerSelector entry included."""
    dev.value("PayloadSize")  # refresh the derived values
    return {**dev.values, "triggers": {e: dict(t) for e, t in dev.trigger_entries.items()}}


def uniform_colour(t: float) -> np.ndarray:
    return np.broadcast_to(np.array(RGB), (H, W, 3))


def mosaic(rgb: np.ndarray, cfa: str) -> np.ndarray:
    """What a sensor with this 2x2 colour filter tile (top-left first, e.g. RGGB) records."""
    out = np.empty(rgb.shape[:2], np.uint8)
    for k, c in enumerate(cfa):
        out[k // 2::2, k % 2::2] = rgb[k // 2::2, k % 2::2, "RGB".index(c)]
    return out


# --- pixel format: mono, Bayer, packed -------------------------------------------------------------

@pytest.mark.parametrize("color_filter, cfa", [("BayerRG", "RGGB"), ("BayerGB", "GBRG"), ("BayerGR", "GRBG"),
                                               ("BayerBG", "BGGR")])
def test_a_bayer_only_camera_is_converted_to_gray_with_its_own_pattern(PySpin: ModuleType, sp: ModuleType,  # noqa: N803
                                                                     color_filter: str, cfa: str) -> None:
    dev = fake_camera(PySpin, color_filter=color_filter, adc_bits=8, render=uniform_colour)
    with autofocus.FlirCamera(timeout_ms=500) as cam:
        frame = cam.capture()
        assert cam.pixel_format == f"{color_filter}8" and dev.value("PixelColorFilter") == color_filter
    raw = mosaic(np.broadcast_to(np.array(RGB), (H, W, 3)), cfa)
    assert frame.shape == (H, W) and frame.dtype == np.uint8
    assert np.array_equal(frame, cv2.cvtColor(raw, autofocus.BAYER_TO_GRAY[color_filter]))
    # A uniform colour field is a uniform gray of its luminance: a wrong pattern gives another gray
    # (R and B swapped: 96) or a checkerboard; the raw mosaic is a checkerboard of 200/100/50.
    inner = frame[2:-2, 2:-2].astype(float)
    assert abs(inner.mean() - GRAY) < 1.5 and inner.std() < 1.0


def test_the_score_sees_the_debayered_frame_never_the_mosaic(PySpin: ModuleType, sp: ModuleType) -> None:  # noqa: N803
    """A focus run on a blank colour field: the mosaic alone would score like a sharp specimen."""
    fake_camera(PySpin, color_filter="BayerRG", adc_bits=8, render=uniform_colour)
    stage = autofocus.SimStage(timing=autofocus.SimTiming(scale=0.0), position_mm=1.0)
    seen: list[np.ndarray] = []
    with autofocus.FlirCamera(timeout_ms=500) as cam:
        result = autofocus.run_autofocus(stage, cam, autofocus.Scorer(), autofocus.Plan(
            tuple(autofocus.plan_positions(1.0, 1.5, 0.1))), on_frame=lambda i, z, f, s: seen.append(f))
    raw_score = autofocus.Scorer()(mosaic(np.broadcast_to(np.array(RGB), (H, W, 3)), "RGGB"))
    assert raw_score > 0.05  # the mosaic's checkerboard is "sharp"
    assert max(s.score for s in result.samples) < 1e-4 < raw_score * 1e-3
    assert all(f.ndim == 2 and abs(float(f.mean()) - GRAY) < 1.5 for f in seen)
    assert result.verdict.kind == "no_peak"


@pytest.mark.parametrize("spec, chosen, dtype", [
    (dict(adc_bits=12), "Mono16", np.uint16),  # a 12-bit sensor: 16-bit frames
    (dict(adc_bits=8, pixel_formats=("Mono8", "Mono16")), "Mono8", np.uint8),
    (dict(adc_bits=12, pixel_format="Mono12Packed"), "Mono16", np.uint16),  # left packed by SpinView
    (dict(color_filter="BayerGB", adc_bits=12, pixel_format="BayerGB12p"), "BayerGB16", np.uint16),
])
def test_pixel_format_is_mono_or_unpacked_and_put_back(PySpin: ModuleType, sp: ModuleType,  # noqa: N803
                                                       spec: dict, chosen: str, dtype: type) -> None:
    dev = fake_camera(PySpin, **spec)
    before = dev.value("PixelFormat")
    with autofocus.FlirCamera(timeout_ms=500) as cam:
        frame = cam.capture()
        assert cam.pixel_format == chosen == dev.value("PixelFormat")
    assert frame.shape == (H, W) and frame.dtype == dtype  # never packed bytes
    assert dev.value("PixelFormat") == before


def test_a_camera_offering_only_packed_formats_is_refused(PySpin: ModuleType, sp: ModuleType) -> None:  # noqa: N803
    dev = fake_camera(PySpin, pixel_formats=("Mono12p", "Mono12Packed"))
    with pytest.raises(autofocus.CameraError, match="offers no pixel format this tool can score"):
        autofocus.FlirCamera(timeout_ms=500)
    assert not dev.initialized  # released


def test_packed_bytes_are_never_returned_as_a_frame(PySpin: ModuleType, sp: ModuleType) -> None:  # noqa: N803
    fake_camera(PySpin)
    with autofocus.FlirCamera(timeout_ms=500) as cam:
        cam._cam.stop()  # another program switches the camera to a packed format behind our back
        cam._cam.PixelFormat = "Mono12p"
        cam._cam.start()
        with pytest.raises(autofocus.CameraError, match=r"delivered a \(120, 240\) uint8 array"):
            cam.capture()


# --- auto exposure and gain -------------------------------------------------------------------------

def test_auto_exposure_and_gain_are_frozen_for_the_sweep_and_put_back(PySpin: ModuleType,  # noqa: N803
                                                                      sp: ModuleType) -> None:
    dev = fake_camera(PySpin, exposure_auto="Continuous", gain_auto="Continuous", exposure_us=2000.0)
    with autofocus.FlirCamera(timeout_ms=500) as cam:
        assert (dev.value("ExposureAuto"), dev.value("GainAuto")) == ("Off", "Off")
        for _ in range(4):
            cam.capture()
    assert len({d["exposure_us"] for d in dev.delivered}) == 1  # the fake's auto loop would change them
    assert len({d["gain_db"] for d in dev.delivered}) == 1
    assert (dev.value("ExposureAuto"), dev.value("GainAuto")) == ("Continuous", "Continuous")


def test_an_auto_gain_that_cannot_be_turned_off_is_refused(PySpin: ModuleType, sp: ModuleType) -> None:  # noqa: N803
    dev = fake_camera(PySpin, gain_auto="Continuous", locked_nodes=("GainAuto",))
    before = snapshot(dev)
    with pytest.raises(autofocus.CameraError, match=r"auto gain \(GainAuto Continuous\) cannot be turned off") as info:
        autofocus.FlirCamera(timeout_ms=500)
    assert "\n" not in str(info.value) and "SpinView" in str(info.value)
    assert snapshot(dev) == before and not dev.initialized  # what it had changed is back; released


def test_a_node_the_camera_will_not_take_is_one_line_and_everything_is_put_back(PySpin: ModuleType,  # noqa: N803
                                                                                  sp: ModuleType) -> None:
    dev = fake_camera(PySpin, locked_nodes=("ExposureTime",))
    before = snapshot(dev)
    with pytest.raises(autofocus.CameraError, match=r"^cannot configure the FLIR camera: .*'ExposureTime'") as info:
        autofocus.FlirCamera(timeout_ms=500, exposure_ms=2.0)
    assert "\n" not in str(info.value)
    assert snapshot(dev) == before and not dev.initialized


# --- long exposures ----------------------------------------------------------------------------------

def test_the_frame_timeout_covers_a_long_exposure(PySpin: ModuleType, sp: ModuleType) -> None:  # noqa: N803
    fake_camera(PySpin)
    with autofocus.FlirCamera(exposure_ms=300.0, timeout_ms=100) as cam:
        assert cam.timeout_ms == 300 + autofocus.CAMERA_TIMEOUT_MARGIN_MS
        t0 = time.monotonic()
        frame = cam.capture()  # a 100 ms timeout would fail here
        assert time.monotonic() - t0 >= 0.3 and frame.shape == (H, W)


# --- every node put back, on every exit path, and the camera released ------------------------------

def lived_in(PySpin: ModuleType, sp: ModuleType) -> None:  # noqa: N803
    """Leave the camera as another program might: every node the tool touches set otherwise."""
    cam = sp.Camera()
    cam.init()
    cam.AcquisitionMode = "MultiFrame"
    cam.TriggerSource = "Line1"  # FrameStart: a hardware trigger on Line1, falling edge
    cam.TriggerActivation = "FallingEdge"
    cam.TriggerMode = "On"
    cam.TriggerSelector = "AcquisitionStart"  # acquisition gated by Line2: no frame without it
    cam.TriggerSource = "Line2"
    cam.TriggerMode = "On"
    cam.TriggerSelector = "FrameBurstStart"  # left selected, Off, with its own source
    cam.TriggerSource = "Line3"
    cam.ExposureAuto = "Off"
    cam.ExposureTime = 1500.0
    cam.ExposureAuto = "Once"  # converges and turns itself Off (fake), as on a real camera
    cam.GainAuto = "Continuous"
    cam.PixelFormat = "Mono12p"
    cam.Width = 120
    cam.Height = 100
    cam.OffsetX = 8
    cam.OffsetY = 6
    cam.cam.DeInit()
    cam.close()


def focus_cli(PySpin: ModuleType, sp: ModuleType, *extra: str) -> tuple[int, FakeZaber]:  # noqa: N803
    """The real CLI in this process: real ZML against the fake Zaber device, FLIR over the fake PySpin."""
    with FakeZaber(devices=[DeviceConfig(homed=True, position=1_000_000)]) as stage:
        code = autofocus.main(["1", "1.5", "0.1", f"tcp://127.0.0.1:{stage.port}", "--native-unit-nm", "1",
                               "--camera-timeout-ms", "200", "--camera-roi", "20,10,100,80", *extra])
    return code, stage


def flat(t: float) -> np.ndarray:
    return np.full((H, W), 1000.0) + (np.arange(W) % 7)[None, :] * 50


@pytest.mark.parametrize("fault, exit_code", [
    ({}, None),  # a normal run (a flat field: no peak, exit 3)
    ({"timeout_from_frame": 3}, autofocus.EXIT_HARDWARE),  # the camera stops delivering mid-sweep
    ({"error_at_frame": 2}, autofocus.EXIT_HARDWARE),
    ({"render": "interrupt"}, autofocus.EXIT_INTERRUPTED),  # Ctrl-C during a capture
])
def test_every_node_is_restored_and_the_camera_reopens_after_any_run(PySpin: ModuleType, sp: ModuleType,  # noqa: N803
                                                                    capsys: pytest.CaptureFixture[str],
                                                                    fault: dict, exit_code: int | None) -> None:
    frames = {"n": 0}

    def render(t: float) -> np.ndarray:
        frames["n"] += 1
        if fault.get("render") == "interrupt" and frames["n"] == 3:
            raise KeyboardInterrupt
        return flat(t)

    dev = fake_camera(PySpin, **{k: v for k, v in fault.items() if k != "render"}, render=render,
                      exposure_auto="Continuous")
    lived_in(PySpin, sp)
    before = snapshot(dev)
    assert before["PixelFormat"] == "Mono12p" and before["TriggerSelector"] == "FrameBurstStart"
    assert before["triggers"]["FrameStart"] == {"TriggerMode": "On", "TriggerSource": "Line1",
                                                "TriggerActivation": "FallingEdge"}
    code, stage = focus_cli(PySpin, sp)
    err = capsys.readouterr().err
    if exit_code is None:
        assert code in (autofocus.EXIT_OK, autofocus.EXIT_NO_PEAK, autofocus.EXIT_EDGE), err
    else:
        assert code == exit_code, err
    assert snapshot(dev) == before  # every node as it was: trigger, acquisition, auto, format, ROI
    assert not dev.streaming and not dev.initialized and dev.buffers_in_use() == 0
    assert dev.acquisitions_started == 1
    assert "did not take back" not in err
    # The same process opens the camera again (no -1004 from a handle left initialised).
    frames["n"] = 100
    dev.timeout_from_frame, dev.error_at_frames = None, frozenset()
    with autofocus.FlirCamera(timeout_ms=200) as again:
        assert again.capture().shape == (100, 120)  # the camera's own ROI, as lived_in() left it
    assert snapshot(dev) == before


def test_trigger_settings_are_journalled_and_restored_per_trigger_selector_entry(PySpin: ModuleType,  # noqa: N803
                                                                                 sp: ModuleType) -> None:
    dev = fake_camera(PySpin, render=flat)
    lived_in(PySpin, sp)  # FrameStart on Line1 (falling edge), AcquisitionStart on Line2, FrameBurstStart selected
    before = snapshot(dev)["triggers"]
    with autofocus.FlirCamera(timeout_ms=200) as camera:
        assert dev.trigger_value("AcquisitionStart", "TriggerMode") == "Off"  # left on, it would gate every frame
        assert [dev.trigger_value("FrameStart", n) for n in ("TriggerMode", "TriggerSource")] == ["On", "Software"]
        assert dev.value("TriggerSelector") == "FrameStart"  # TriggerSoftware fires the selected trigger
        assert camera.capture().shape == (100, 120)  # the camera's own ROI, as lived_in() left it
    assert snapshot(dev)["triggers"] == before  # mode, source and activation of every entry
    assert dev.value("TriggerSelector") == "FrameBurstStart"


@pytest.mark.parametrize("where", ["Init", "node walk", "configuration"])
def test_ctrl_c_while_the_camera_opens_still_releases_it(PySpin: ModuleType, sp: ModuleType,  # noqa: N803
                                                         monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    dev = fake_camera(PySpin, render=flat)
    once = {"left": 1}

    def interrupt_once() -> None:
        if once["left"]:
            once["left"] -= 1
            raise KeyboardInterrupt

    if where == "Init":  # Spinnaker's Init() has returned (the camera is initialised) when Ctrl-C lands
        real_init = PySpin.CameraPtr.Init
        monkeypatch.setattr(PySpin.CameraPtr, "Init", lambda self: (real_init(self), interrupt_once()))
    elif where == "node walk":  # simple_pyspin's init() walks every node after Init()
        real_nodemap = PySpin.CameraPtr.GetNodeMap
        monkeypatch.setattr(PySpin.CameraPtr, "GetNodeMap", lambda self: (interrupt_once(), real_nodemap(self))[1])
    else:  # the tool's own set-up, once the camera is open
        real_configure = autofocus.FlirCamera._configure
        monkeypatch.setattr(autofocus.FlirCamera, "_configure",
                            lambda self, *a: (interrupt_once(), real_configure(self, *a))[1])
    with pytest.raises(KeyboardInterrupt):
        autofocus.FlirCamera(timeout_ms=200)
    assert not dev.initialized and not dev.streaming  # released: DeInit
    with autofocus.FlirCamera(timeout_ms=200) as again:  # the next open in this process works (no -1004)
        assert again.capture().shape == (H, W)


def test_a_camera_left_initialised_is_reported_in_one_line(PySpin: ModuleType, sp: ModuleType) -> None:  # noqa: N803
    dev = fake_camera(PySpin)
    held = sp.Camera()
    held.init()  # e.g. an earlier script that never released it
    with pytest.raises(autofocus.CameraError, match="still holds it") as info:
        autofocus.FlirCamera(timeout_ms=200)
    assert "-1004" in str(info.value) and "\n" not in str(info.value)
    assert dev.initialized  # the failed open did not DeInit a camera that another part of the process holds
    held.cam.DeInit()


# --- a camera the caller owns -------------------------------------------------------------------------

def test_from_camera_leaves_the_callers_camera_open_and_as_it_was(PySpin: ModuleType, sp: ModuleType) -> None:  # noqa: N803
    dev = fake_camera(PySpin, exposure_auto="Continuous", gain_auto="Continuous")
    with sp.Camera() as cam:  # the caller's camera, open for the whole script
        cam.PixelFormat = "Mono8"
        cam.AcquisitionFrameRate = 20.0
        cam.start()  # streaming free-run when lent
        before = snapshot(dev)
        for _ in range(2):  # two focus calls on the same camera
            stage = autofocus.SimStage(timing=autofocus.SimTiming(scale=0.0))
            with autofocus.FlirCamera.from_camera(cam, roi=(0, 0, 80, 60)) as camera:
                autofocus.run_autofocus(stage, camera, autofocus.Scorer(),
                                        autofocus.Plan(tuple(autofocus.plan_positions(0, 0.4, 0.1))))
                assert dev.value("TriggerMode") == "On" and dev.value("Width") == 80
            assert cam.initialized and cam.running and dev.initialized and dev.streaming
            assert snapshot(dev) == before
        image = cam.cam.GetNextImage(1000)  # still the caller's, and still usable
        assert image.GetNDArray().shape == (H, W)
        image.Release()
        cam.stop()
        cam.cam.DeInit()


def test_from_camera_needs_an_initialised_camera(PySpin: ModuleType, sp: ModuleType) -> None:  # noqa: N803
    fake_camera(PySpin)
    with pytest.raises(autofocus.UsageError, match="initialised simple_pyspin.Camera"):
        autofocus.FlirCamera.from_camera(sp.Camera())


# --- --camera-roi -------------------------------------------------------------------------------------

def test_camera_roi_is_rounded_to_the_increments_and_restored(PySpin: ModuleType, sp: ModuleType,  # noqa: N803
                                                              caplog: pytest.LogCaptureFixture) -> None:
    dev = fake_camera(PySpin)  # fake increments: OffsetX 4, OffsetY 2, Width 4, Height 2; min size 16
    before = snapshot(dev)
    with autofocus.FlirCamera(timeout_ms=200, roi=(10, 11, 101, 51)) as cam:
        assert cam.roi == (8, 10, 104, 52)  # covers the request: 8..111 >= 10..110, 10..61 >= 11..61
        assert (dev.value("OffsetX"), dev.value("OffsetY"), dev.value("Width"), dev.value("Height")) == cam.roi
        assert cam.capture().shape == (52, 104)
    assert snapshot(dev) == before
    assert "rounded to the camera's increments: 8,10,104,52" in caplog.text


def test_camera_roi_outside_the_sensor_is_a_usage_error(PySpin: ModuleType, sp: ModuleType) -> None:  # noqa: N803
    dev = fake_camera(PySpin)
    before = snapshot(dev)
    with pytest.raises(autofocus.UsageError, match=r"outside the sensor's 160x120 pixels"):
        autofocus.FlirCamera(timeout_ms=200, roi=(100, 0, 100, 50))
    assert snapshot(dev) == before and not dev.initialized


@pytest.mark.parametrize("roi, sensor, steps, expected", [
    ((10, 11, 101, 51), (160, 120), ((4, 2), (4, 2), (16, 16)), (8, 10, 104, 52)),
    ((150, 0, 10, 10), (160, 120), ((4, 2), (4, 2), (16, 16)), (144, 0, 16, 16)),  # pushed back onto the sensor
    ((0, 0, 160, 120), (160, 120), ((4, 2), (4, 2), (16, 16)), (0, 0, 160, 120)),
    ((5, 5, 3, 3), (20, 20), ((1, 1), (1, 1), (1, 1)), (5, 5, 3, 3)),
    ((1, 1, 1, 1), (1920, 1200), ((2, 2), (32, 8), (64, 8)), (0, 0, 64, 8)),
])
def test_fit_roi(roi: tuple, sensor: tuple, steps: tuple, expected: tuple) -> None:
    off, size, least = steps
    fitted = autofocus.fit_roi(roi, sensor, offset_step_px=off, size_step_px=size, min_size_px=least)
    assert fitted == expected
    x, y, w, h = fitted
    assert x <= roi[0] and y <= roi[1] and x + w >= roi[0] + roi[2] and y + h >= roi[1] + roi[3]
    assert x % off[0] == 0 and y % off[1] == 0 and (w - least[0]) % size[0] == 0 and (h - least[1]) % size[1] == 0
    assert x + w <= sensor[0] and y + h <= sensor[1]


def test_restore_plan_turns_each_trigger_off_first_and_back_on_last_then_the_selector() -> None:
    triggers = {"FrameBurstStart": {"TriggerMode": "On", "TriggerSource": "Line2", "TriggerActivation": "RisingEdge"},
                "FrameStart": {"TriggerMode": "On", "TriggerSource": "Line1", "TriggerActivation": "FallingEdge"}}
    plan = autofocus.restore_plan({"TriggerSelector": "FrameBurstStart", "AcquisitionMode": "SingleFrame"}, triggers)
    assert plan[:4] == [("TriggerSelector", "FrameBurstStart"), ("TriggerMode", "Off"), ("TriggerSource", "Line2"),
                        ("TriggerActivation", "RisingEdge")]  # its source is only writable with it off
    assert plan[8] == ("AcquisitionMode", "SingleFrame")
    assert plan[9:] == [("TriggerSelector", "FrameBurstStart"), ("TriggerMode", "On"), ("TriggerSelector", "FrameStart"),
                        ("TriggerMode", "On"), ("TriggerSelector", "FrameBurstStart")]  # the user's selection last


def test_restore_plan_puts_trigger_and_roi_back_in_an_order_genicam_accepts() -> None:
    original = {"PixelFormat": "Mono12p", "OffsetX": 8, "Width": 120, "TriggerMode": "On", "TriggerSource": "Line1",
                "ExposureAuto": "Continuous", "ExposureTime": 900.0}
    plan = autofocus.restore_plan(original)
    assert plan[0] == ("TriggerMode", "Off") and plan[-1] == ("TriggerMode", "On")
    names = [n for n, _ in plan]
    assert plan.index(("OffsetX", 0)) < names.index("Width") < plan.index(("OffsetX", 8))
    assert names.index("ExposureTime") < names.index("ExposureAuto")
    assert dict(plan[1:-1]) | {"OffsetX": 8} == {k: v for k, v in original.items() if k != "TriggerMode"}


# --- the simulated camera's ROI ------------------------------------------------------------------------

def test_sim_camera_roi_crops_the_frame_and_reads_out_faster() -> None:
    optics = autofocus.SimOptics(width=320, height=200)
    timing = autofocus.SimTiming(scale=0.0)
    frames, modeled = [], []
    for roi in (None, (40, 50, 120, 50)):
        clock = autofocus.SimClock(0.0)
        stage = autofocus.SimStage(position_mm=optics.focus_mm, timing=timing, clock=clock)
        frames.append(autofocus.SimCamera(stage, optics, timing, clock, roi=roi).capture())
        modeled.append(clock.modeled_s)
    assert np.array_equal(frames[1], frames[0][50:100, 40:160])
    saved = modeled[0] - modeled[1]
    assert saved == pytest.approx(timing.readout_s * (1 - 50 / 200))  # read-out in proportion to the rows


@pytest.mark.parametrize("argv, message", [
    (["--simulate", "--camera-roi", "300,0,100,100"], "outside the sensor's 320x200 pixels"),
    (["--simulate", "--camera-roi", "0,0,0,10"], "W and H at least 8 pixels"),
    (["--simulate", "--camera-roi", "1,2,3"], "is not X,Y,W,H"),
])
def test_camera_roi_bad_input_is_one_line_and_exit_2(argv: list[str], message: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code = autofocus.main(["10", "11", "0.1", "--sim-time-scale", "0", "--sim-size", "320x200", *argv])
    err = capsys.readouterr().err
    assert code == autofocus.EXIT_USAGE and message in err and err.count("\n") == 1


def test_camera_roi_with_replay_is_refused(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code = autofocus.main(["10", "11", "0.1", "--replay", str(tmp_path), "--camera-roi", "0,0,10,10"])
    assert code == autofocus.EXIT_USAGE and "--camera-roi needs a live camera" in capsys.readouterr().err


def test_sim_run_with_camera_roi_focuses(capsys: pytest.CaptureFixture[str]) -> None:
    code = autofocus.main(["12", "12.7", "0.05", "--simulate", "--sim-time-scale", "0", "--sim-size", "320x200",
                           "--camera-roi", "80,50,160,100"])
    out = capsys.readouterr().out
    assert code == autofocus.EXIT_OK and "best focus at 12.3" in out


# --- streaming, exposure, faults ---------------------------------------------------------------

def test_streams_with_one_acquisition_and_a_trigger_per_frame(PySpin: ModuleType, sp: ModuleType) -> None:  # noqa: N803
    z = {"mm": 0.0}
    dev = camera(PySpin, render=lambda t: np.full((120, 160), 10 + 20 * z["mm"]))
    cam = autofocus.FlirCamera(timeout_ms=500)
    try:
        for step in range(5):
            z["mm"] = float(step)  # "the stage moved"
            t_settled = time.monotonic()
            frame = cam.capture()
            assert frame[0, 0] == 10 + 20 * step  # shows the new position, never the previous one
            assert dev.delivered[-1]["exposure_started"] >= t_settled
            assert dev.buffers_in_use() == 0  # every buffer released
    finally:
        cam.close()
    assert dev.acquisitions_started == 1  # streaming: no start/stop per frame
    assert dev.triggers == 5
    assert dev.value("TriggerMode") == "Off" and not dev.streaming


def test_a_frame_exposed_before_the_capture_is_discarded(PySpin: ModuleType, sp: ModuleType) -> None:  # noqa: N803
    dev = camera(PySpin)
    cam = autofocus.FlirCamera(timeout_ms=500)
    try:
        cam._cam.TriggerSoftware()  # a frame exposed "during the move"
        time.sleep(0.01)
        t_call = time.monotonic()
        cam.capture()
        assert dev.delivered[-1]["exposure_started"] >= t_call
        assert dev.frames_delivered == 2 and dev.buffers_in_use() == 0
    finally:
        cam.close()


def test_exposure_is_set_with_auto_exposure_off(PySpin: ModuleType, sp: ModuleType) -> None:  # noqa: N803
    dev = camera(PySpin, exposure_auto="Continuous")
    cam = autofocus.FlirCamera(exposure_ms=2.5, timeout_ms=500)
    try:
        assert dev.value("ExposureAuto") == "Off" and dev.value("ExposureTime") == pytest.approx(2500.0)
    finally:
        cam.close()


def test_sixteen_bit_frames_stay_sixteen_bit(PySpin: ModuleType, sp: ModuleType) -> None:  # noqa: N803
    camera(PySpin, pixel_format="Mono16")
    cam = autofocus.FlirCamera(timeout_ms=500)
    try:
        assert cam.capture().dtype == np.uint16
    finally:
        cam.close()


@pytest.mark.parametrize("fault, message", [
    # 501 ms: the timeout is never below the exposure (1 ms) + CAMERA_TIMEOUT_MARGIN_MS
    ({"timeout_from_frame": 1}, "no frame from the FLIR camera within 501 ms"),
    ({"error_at_frame": 1}, "no frame from the FLIR camera"),
    ({"incomplete_at_frame": 1}, "incomplete frame"),
    ({"disconnect_at_frame": 1}, "no frame from the FLIR camera"),
])
def test_camera_faults_are_one_clear_camera_error(PySpin: ModuleType, sp: ModuleType,  # noqa: N803
                                                  fault: dict, message: str) -> None:
    dev = camera(PySpin, **fault)
    cam = autofocus.FlirCamera(timeout_ms=100)
    try:
        cam.capture()
        t0 = time.monotonic()
        with pytest.raises(autofocus.CameraError, match=message) as info:
            cam.capture()
        assert time.monotonic() - t0 < 2.0  # never blocks forever
        assert "\n" not in str(info.value)
    finally:
        cam.close()  # must not raise, even after a disconnect
    assert dev.buffers_in_use() == 0


def test_no_camera_is_a_camera_error(PySpin: ModuleType, sp: ModuleType) -> None:  # noqa: N803
    PySpin.fake.reset(cameras=[])
    with pytest.raises(autofocus.CameraError, match="cannot open the FLIR camera"):
        autofocus.FlirCamera()


def test_missing_sdk_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_pyspin(name: str, *args: object, **kw: object) -> object:
        if name == "PySpin":
            raise ImportError("No module named 'PySpin'")
        return real_import(name, *args, **kw)

    monkeypatch.delitem(sys.modules, "PySpin", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_pyspin)
    with pytest.raises(autofocus.UsageError, match="Spinnaker SDK") as info:
        autofocus.FlirCamera()
    assert "simulated_microscope()" in str(info.value)  # its own terms; the command line names its options
    assert "--simulate" in str(info.value.relabel(autofocus.option_labels(autofocus.build_parser())))


def test_flir_from_camera_refuses_bad_settings_and_changes_nothing(PySpin: ModuleType, sp: ModuleType) -> None:  # noqa: N803
    PySpin.fake.reset(cameras=[PySpin.FakeCameraSpec(serial="4242", width=160, height=120)])
    dev = PySpin.fake.camera("4242")
    with sp.Camera() as cam:
        before = dict(dev.values)
        for keywords, named in CAMERA_BAD:
            with pytest.raises(autofocus.BadValue) as caught:
                autofocus.FlirCamera.from_camera(cam, **keywords)
            assert str(caught.value).startswith(named) and dict(dev.values) == before
            with pytest.raises(autofocus.BadValue):
                autofocus.FlirCamera(**keywords)  # checked before the camera is opened
