"""The FLIR adapter through the REAL simple-pyspin package over a fake PySpin module (no SDK, no camera)."""
from __future__ import annotations

import builtins
import sys
import time
from types import ModuleType

import numpy as np
import pytest

import autofocus

FAST = dict(exposure_auto="Off", exposure_us=1000.0, readout_s=0.0005)


def camera(PySpin: ModuleType, **spec: object) -> object:  # noqa: N803
    PySpin.fake.reset(cameras=[PySpin.FakeCameraSpec(serial="4242", width=160, height=120, **{**FAST, **spec})])
    return PySpin.fake.camera("4242")


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
