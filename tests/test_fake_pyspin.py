"""Tests for the fake PySpin module (tests/fake_pyspin/PySpin.py), driven
through the real, unmodified simple_pyspin package where possible."""

import importlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from conftest import FAKE_PYSPIN_DIR as FAKE_DIR

# Fast camera for trigger tests: manual 1 ms exposure.
FAST = dict(exposure_auto="Off", exposure_us=1000.0, readout_s=0.0005)


def spec(PySpin, **kw):
    return PySpin.FakeCameraSpec(**kw)


def software_trigger_setup(cam, exposure_us=None):
    """What the autofocus adapter does before cam.start()."""
    cam.AcquisitionMode = "Continuous"
    cam.TriggerMode = "Off"
    cam.TriggerSelector = "FrameStart"
    cam.TriggerSource = "Software"
    cam.TriggerMode = "On"
    if exposure_us is not None:
        cam.ExposureAuto = "Off"
        cam.ExposureTime = exposure_us


# ---------------------------------------------------------------------------
# Discovery, init/close
# ---------------------------------------------------------------------------

def test_no_cameras_raises_camera_error(PySpin, sp):
    PySpin.fake.reset(cameras=[])
    with pytest.raises(sp.CameraError, match=r"^No cameras detected\.$"):
        sp.Camera()


def test_with_camera_inits_and_closes(PySpin, sp):
    PySpin.fake.reset(cameras=[spec(PySpin, serial="12345", width=640, height=480)])
    dev = PySpin.fake.camera("12345")
    with sp.Camera() as cam:
        assert cam.initialized and dev.initialized
        assert cam.DeviceModelName == "BFLY-U3-23S6M"
        assert cam.DeviceSerialNumber == "12345"
        assert (cam.Width, cam.Height, cam.PixelFormat) == (640, 480, "Mono8")
        assert cam.camera_node_types["PixelFormat"] == "enum"
        assert cam.camera_node_types["ExposureTime"] == "float"
        assert cam.camera_node_types["TriggerSoftware"] == "command"
        assert "TriggerSoftware" in cam.camera_methods
        assert cam.get_info("ExposureTime")["unit"] == "us"
        assert "Mono16" in cam.get_info("PixelFormat")["entries"]
        assert cam.document().startswith("FLIR BFLY-U3-23S6M")
    assert not cam.initialized
    assert not hasattr(cam, "cam")
    assert PySpin.fake.acquisitions_started == 0


def test_camera_by_serial_and_index(PySpin, sp):
    PySpin.fake.reset(cameras=[spec(PySpin, serial="111"), spec(PySpin, serial="222")])
    with sp.Camera("222") as cam:
        assert cam.DeviceSerialNumber == "222"
        cam.cam.DeInit()  # simple_pyspin's close() does not: without this the next Init fails
    with sp.Camera(1) as cam:
        assert cam.DeviceSerialNumber == "222"
    with pytest.raises(PySpin.SpinnakerException) as ei:  # ... like this: -1004, resource in use
        sp.Camera(1).init()
    assert ei.value.errorcode == PySpin.SPINNAKER_ERR_RESOURCE_IN_USE
    bad = sp.Camera("999")  # like real PySpin, a bad serial only fails when used
    assert not bad.cam.IsValid()
    with pytest.raises(PySpin.SpinnakerException) as ei:
        bad.init()
    assert ei.value.errorcode == PySpin.SPINNAKER_ERR_INVALID_HANDLE
    with pytest.raises(PySpin.SpinnakerException):
        sp.Camera(5)


# ---------------------------------------------------------------------------
# Attributes through simple_pyspin
# ---------------------------------------------------------------------------

def test_attribute_get_set(PySpin, sp):
    with sp.Camera() as cam:
        # Like a Blackfly out of the box, ExposureAuto is Continuous, which
        # makes ExposureTime read-only.
        assert cam.ExposureAuto == "Continuous"
        with pytest.raises(sp.CameraError, match="not currently writable"):
            cam.ExposureTime = 5000
        cam.ExposureAuto = "Off"
        cam.ExposureTime = 5000
        assert cam.ExposureTime == 5000.0
        cam.AcquisitionMode = "SingleFrame"
        assert cam.AcquisitionMode == "SingleFrame"
        cam.AcquisitionMode = "Continuous"
        assert cam.AcquisitionMode == "Continuous"
        cam.GainAuto = "Off"
        cam.Gain = 6.0
        assert cam.Gain == 6.0
        cam.Width = 320
        cam.OffsetX = 16
        assert (cam.Width, cam.OffsetX) == (320, 16)

        with pytest.raises(sp.CameraError, match=r"Unknown property 'Bogus'\."):
            cam.Bogus = 1
        with pytest.raises(AttributeError):
            cam.Bogus
        with pytest.raises(sp.CameraError, match="is a function"):
            cam.TriggerSoftware = 1
        with pytest.raises(PySpin.SpinnakerException) as ei:
            cam.AcquisitionMode = "Sometimes"
        assert ei.value.errorcode == PySpin.GENICAM_ERR_INVALID_ARGUMENT
        assert "cannot convert value 'Sometimes'" in str(ei.value)
        assert cam.AcquisitionMode == "Continuous"
        with pytest.raises(PySpin.SpinnakerException) as ei:
            cam.ExposureTime = 1e9
        assert ei.value.errorcode == PySpin.GENICAM_ERR_OUT_OF_RANGE
        with pytest.raises(PySpin.SpinnakerException):
            cam.Width = 321  # not a multiple of the increment
        with pytest.raises(TypeError):
            cam.Width = 320.0  # SWIG int64_t wants an int
        with pytest.raises(sp.CameraError):
            cam.DeviceModelName = "x"  # read-only


def test_trigger_source_not_writable_while_trigger_mode_on(PySpin, sp):
    with sp.Camera() as cam:
        cam.TriggerMode = "On"
        with pytest.raises(sp.CameraError, match="not currently writable"):
            cam.TriggerSource = "Software"
        node = PySpin.CEnumerationPtr(cam.cam.GetNodeMap().GetNode("TriggerSource"))
        assert node.GetAccessMode() == PySpin.RO
        with pytest.raises(PySpin.SpinnakerException) as ei:
            node.FromString("Software")
        assert ei.value.errorcode == PySpin.GENICAM_ERR_ACCESS
        assert "Node is not writable" in str(ei.value)
        # TriggerSoftware is only available when the source is Software
        with pytest.raises(PySpin.SpinnakerException):
            cam.TriggerSoftware()
        cam.TriggerMode = "Off"
        cam.TriggerSource = "Software"
        cam.TriggerMode = "On"
        assert (cam.TriggerSource, cam.TriggerMode) == ("Software", "On")


def test_trigger_nodes_belong_to_the_selected_trigger_selector_entry(PySpin, sp):
    dev = PySpin.fake.camera(0)
    with sp.Camera() as cam:
        cam.TriggerSource = "Line1"
        cam.TriggerMode = "On"  # FrameStart
        cam.TriggerSelector = "FrameBurstStart"  # writable while FrameStart is On (as on pylon's emulator)
        assert (cam.TriggerMode, cam.TriggerSource) == ("Off", "Line0")  # the burst trigger's own nodes
        cam.TriggerSource = "Line2"  # writable: the SELECTED trigger is off
        cam.TriggerSelector = "FrameStart"
        assert (cam.TriggerMode, cam.TriggerSource) == ("On", "Line1")
        with pytest.raises(sp.CameraError, match="not currently writable"):
            cam.TriggerSource = "Line3"  # the selected trigger is on
        assert dev.trigger_value("FrameBurstStart", "TriggerSource") == "Line2"


def test_an_acquisition_start_trigger_left_on_gates_every_frame(PySpin, sp):
    with sp.Camera() as cam:
        cam.TriggerSelector = "AcquisitionStart"
        cam.TriggerSource = "Line2"
        cam.TriggerMode = "On"
        cam.TriggerSelector = "FrameStart"
        cam.TriggerSource = "Software"
        cam.TriggerMode = "On"
        cam.start()
        cam.TriggerSoftware()  # no frame: the acquisition waits for Line2
        with pytest.raises(PySpin.SpinnakerException):
            cam.cam.GetNextImage(200)
        PySpin.fake.camera(0).fire_line_trigger("Line2")
        cam.TriggerSoftware()
        cam.cam.GetNextImage(1000).Release()
        cam.stop()


def test_image_format_locked_while_acquiring(PySpin, sp):
    with sp.Camera() as cam:
        cam.start()
        with pytest.raises(sp.CameraError):
            cam.PixelFormat = "Mono16"
        with pytest.raises(PySpin.SpinnakerException) as ei:
            PySpin.CIntegerPtr(cam.cam.GetNodeMap().GetNode("Width")).SetValue(320)
        assert ei.value.errorcode == PySpin.GENICAM_ERR_ACCESS
        cam.stop()
        cam.PixelFormat = "Mono16"
        cam.Width = 320


# ---------------------------------------------------------------------------
# Acquisition
# ---------------------------------------------------------------------------

def test_start_get_array_stop(PySpin, sp):
    with sp.Camera() as cam:
        cam.AcquisitionFrameRate = 40.0
        cam.start()
        a = cam.get_array()
        b = cam.get_array()
        cam.stop()
        assert a.shape == (480, 640) and a.dtype == np.uint8
        assert not np.array_equal(a, b)  # per-frame noise
        assert 0 < a.mean() < 255
    dev = PySpin.fake.camera()
    assert PySpin.fake.acquisitions_started == 1
    assert PySpin.fake.frames_delivered == 2
    assert dev.buffers_in_use() == 0  # EndAcquisition discarded the pool


def test_begin_end_acquisition_state_errors(PySpin, sp):
    with sp.Camera() as cam:
        with pytest.raises(PySpin.SpinnakerException) as ei:
            cam.cam.EndAcquisition()
        assert ei.value.errorcode == PySpin.SPINNAKER_ERR_NOT_INITIALIZED
        with pytest.raises(PySpin.SpinnakerException):
            cam.cam.GetNextImage(10)
        cam.start()
        with pytest.raises(PySpin.SpinnakerException) as ei:
            cam.cam.BeginAcquisition()
        assert ei.value.errorcode == PySpin.SPINNAKER_ERR_RESOURCE_IN_USE
        with pytest.raises(PySpin.SpinnakerException, match="still streaming"):
            cam.cam.DeInit()
        with pytest.raises(TypeError):
            cam.cam.GetNextImage(100.0)  # SWIG uint64_t wants an int
        cam.stop()
        cam.cam.DeInit()
        assert not cam.cam.IsInitialized()


def test_software_trigger_gives_exactly_one_frame_after_the_trigger(PySpin, sp):
    PySpin.fake.reset(cameras=[spec(PySpin, **FAST)])
    dev = PySpin.fake.camera()
    with sp.Camera() as cam:
        software_trigger_setup(cam)
        cam.start()
        assert cam.cam.GetNumImagesInUse() == 0
        with pytest.raises(PySpin.SpinnakerException):  # nothing without a trigger
            cam.cam.GetNextImage(30)
        t_trigger = time.monotonic()
        cam.TriggerSoftware()
        img = cam.cam.GetNextImage(500)
        assert not img.IsIncomplete()
        assert img.GetImageStatus() == PySpin.IMAGE_NO_ERROR
        assert img.fake_exposure_started_s >= t_trigger
        assert img.GetTimeStamp() >= int(t_trigger * 1e9)
        arr = img.GetNDArray()
        assert arr.shape == (img.GetHeight(), img.GetWidth()) == (480, 640)
        assert dev.buffers_in_use() == 1
        with pytest.raises(PySpin.SpinnakerException) as ei:  # exactly one frame
            cam.cam.GetNextImage(PySpin.EVENT_TIMEOUT_NONE)
        assert ei.value.errorcode == PySpin.SPINNAKER_ERR_TIMEOUT
        t_release = time.monotonic()
        img.Release()
        assert dev.buffers_in_use() == 0
        assert dev.last_release_times[-1] >= t_release
        cam.stop()
    assert PySpin.fake.triggers == 1
    assert dev.triggers_accepted == 1


def test_trigger_while_exposing_is_ignored(PySpin, sp):
    PySpin.fake.reset(cameras=[spec(PySpin, width=160, height=120, exposure_auto="Off",
                                    exposure_us=100_000.0)])
    dev = PySpin.fake.camera()
    with sp.Camera() as cam:
        software_trigger_setup(cam)
        cam.start()
        cam.TriggerSoftware()
        cam.TriggerSoftware()  # camera still busy: ignored, no second frame
        cam.cam.GetNextImage(500).Release()
        with pytest.raises(PySpin.SpinnakerException):
            cam.cam.GetNextImage(PySpin.EVENT_TIMEOUT_NONE)
        cam.stop()
    assert (dev.triggers, dev.triggers_accepted, dev.triggers_ignored) == (2, 1, 1)


def test_not_releasing_stalls_and_release_frees_a_buffer(PySpin, sp):
    PySpin.fake.reset(cameras=[spec(PySpin, buffer_count=3, **FAST)])
    dev = PySpin.fake.camera()
    with sp.Camera() as cam:
        software_trigger_setup(cam)
        cam.start()
        held = []
        for _ in range(3):
            cam.TriggerSoftware()
            held.append(cam.cam.GetNextImage(500))
        assert dev.buffers_in_use() == 3
        cam.TriggerSoftware()  # exposure happens, but there is no buffer for it
        with pytest.raises(PySpin.SpinnakerException) as ei:
            cam.cam.GetNextImage(60)
        assert ei.value.errorcode == PySpin.SPINNAKER_ERR_TIMEOUT
        assert dev.frames_dropped == 1
        held.pop(0).Release()
        cam.TriggerSoftware()
        img = cam.cam.GetNextImage(500)
        img.Release()
        for h in held:
            h.Release()
        assert dev.buffers_in_use() == 0
        cam.stop()


def test_dropping_the_reference_does_not_release(PySpin, sp):
    PySpin.fake.reset(cameras=[spec(PySpin, buffer_count=2, **FAST)])
    with sp.Camera() as cam:
        software_trigger_setup(cam)
        cam.start()
        for _ in range(2):
            cam.TriggerSoftware()
            cam.cam.GetNextImage(500).GetNDArray().copy()  # image object dropped, never released
        assert PySpin.fake.buffers_in_use() == 2
        cam.TriggerSoftware()
        with pytest.raises(PySpin.SpinnakerException):
            cam.cam.GetNextImage(50)
        cam.stop()


def test_timeout_raises_spinnaker_exception(PySpin, sp):
    with sp.Camera() as cam:
        software_trigger_setup(cam)
        cam.start()
        t0 = time.monotonic()
        with pytest.raises(PySpin.SpinnakerException) as ei:
            cam.cam.GetNextImage(80)
        waited = time.monotonic() - t0
        cam.stop()
    assert 0.075 <= waited < 1.0
    assert ei.value.errorcode == PySpin.SPINNAKER_ERR_TIMEOUT == -1011
    assert str(ei.value) == ("Spinnaker: Failed waiting for EventData on NEW_BUFFER_DATA event. [-1011]")


def test_mono16_gives_uint16(PySpin, sp):
    PySpin.fake.reset(cameras=[spec(PySpin, **FAST)])
    with sp.Camera() as cam:
        cam.PixelFormat = "Mono16"
        software_trigger_setup(cam)
        cam.start()
        cam.TriggerSoftware()
        img = cam.cam.GetNextImage(500)
        arr = img.GetNDArray().copy()
        assert img.GetPixelFormatName() == "Mono16"
        assert img.GetBitsPerPixel() == 16
        img.Release()
        cam.stop()
    assert arr.dtype == np.uint16 and arr.shape == (480, 640)
    assert arr.max() > 255


def test_use_after_release_is_visible(PySpin, sp):
    PySpin.fake.reset(cameras=[spec(PySpin, **FAST)])
    with sp.Camera() as cam:
        software_trigger_setup(cam)
        cam.start()
        cam.TriggerSoftware()
        img = cam.cam.GetNextImage(500)
        view = img.GetNDArray()
        copy = view.copy()
        img.Release()
        assert (view == 0xDE).all()  # the buffer went back to the pool
        assert not (copy == 0xDE).all()
        with pytest.raises(PySpin.SpinnakerException):
            img.GetNDArray()
        with pytest.raises(PySpin.SpinnakerException):
            img.Release()
        cam.stop()


def test_render_callable_with_roi_and_dtype_conversion(PySpin, sp):
    calls = []

    def render(t, info):
        calls.append((t, info))
        img = np.zeros((info["sensor_height"], info["sensor_width"]))
        img[:, :] = np.arange(info["sensor_width"])[None, :] / 1000.0  # float 0..0.3
        return img * 1000  # sensor-sized float -> cropped and converted

    PySpin.fake.reset(cameras=[spec(PySpin, width=320, height=240, render=render, **FAST)])
    with sp.Camera() as cam:
        cam.Width, cam.Height, cam.OffsetX, cam.OffsetY = 64, 32, 100, 10
        software_trigger_setup(cam)
        cam.start()
        t0 = time.monotonic()
        cam.TriggerSoftware()
        img = cam.cam.GetNextImage(500)
        arr = img.GetNDArray().copy()
        img.Release()
        cam.stop()
    assert arr.shape == (32, 64) and arr.dtype == np.uint8
    assert arr[0, 0] == 100 and arr[5, 63] == 163
    (t, info), = calls
    assert t >= t0 and info["exposure_us"] == 1000.0 and info["offset_x"] == 100


def test_continuous_oldest_first_vs_newest_only(PySpin, sp):
    results = {}
    for mode in ("OldestFirst", "NewestOnly"):
        PySpin.fake.reset(cameras=[spec(PySpin, buffer_count=3, buffer_handling=mode, **FAST)])
        with sp.Camera() as cam:
            cam.AcquisitionFrameRate = 40.0
            cam.start()
            t_start = time.monotonic()
            time.sleep(0.2)  # ~8 frames exposed while nobody reads
            img = cam.cam.GetNextImage(PySpin.EVENT_TIMEOUT_NONE)
            results[mode] = img.fake_exposure_started_s - t_start
            img.Release()
            cam.stop()
        assert PySpin.fake.camera().frames_dropped >= 3
    assert results["OldestFirst"] < 0.03  # the stale first frame
    assert results["NewestOnly"] > 0.1    # the latest one


def test_buffer_handling_set_through_tl_stream_node_map(PySpin, sp):
    PySpin.fake.reset(cameras=[spec(PySpin, width=160, height=120, **FAST)])
    with sp.Camera() as cam:
        s_map = cam.cam.GetTLStreamNodeMap()
        handling = PySpin.CEnumerationPtr(s_map.GetNode("StreamBufferHandlingMode"))
        assert handling.ToString() == "OldestFirst"  # Spinnaker's default
        handling.SetIntValue(handling.GetEntryByName("NewestOnly").GetValue())
        software_trigger_setup(cam)
        cam.start()
        assert not PySpin.IsWritable(handling)  # locked while streaming
        for _ in range(3):
            cam.TriggerSoftware()
            time.sleep(0.005)
        time.sleep(0.01)
        img = cam.cam.GetNextImage(PySpin.EVENT_TIMEOUT_NONE)
        assert img.GetFrameID() == 2  # only the newest survived
        img.Release()
        cam.stop()


def test_infinite_wait_is_guarded_and_wakes_on_trigger_from_another_thread(PySpin, sp):
    PySpin.fake.reset(cameras=[spec(PySpin, width=160, height=120, **FAST)],
                      infinite_timeout_guard_s=0.1)
    with sp.Camera() as cam:
        software_trigger_setup(cam)
        cam.start()
        with pytest.raises(PySpin.FakePySpinHang):
            cam.get_array()  # EVENT_TIMEOUT_INFINITE with no trigger: would hang
        timer = threading.Timer(0.03, cam.TriggerSoftware)
        timer.start()
        img = cam.cam.GetNextImage(PySpin.EVENT_TIMEOUT_INFINITE)
        timer.join()
        img.Release()
        cam.stop()


def test_single_frame_mode(PySpin, sp):
    PySpin.fake.reset(cameras=[spec(PySpin, **FAST)])
    with sp.Camera() as cam:
        cam.AcquisitionMode = "SingleFrame"
        cam.start()
        cam.cam.GetNextImage(500).Release()
        with pytest.raises(PySpin.SpinnakerException):
            cam.cam.GetNextImage(60)
        cam.stop()


def test_raw_pyspin_api_and_release_instance(PySpin):
    system = PySpin.System.GetInstance()
    cams = system.GetCameras()
    assert cams.GetSize() == len(cams) == 1
    cam = cams[0]
    assert PySpin.CStringPtr(cam.GetTLDeviceNodeMap().GetNode("DeviceSerialNumber")).GetValue() == "12345678"
    cam.Init()
    nodemap = cam.GetNodeMap()
    mode = PySpin.CEnumerationPtr(nodemap.GetNode("AcquisitionMode"))
    mode.SetIntValue(mode.GetEntryByName("Continuous").GetValue())
    assert cam.TriggerMode.GetValue() == PySpin.TriggerMode_Off  # QuickSpin style
    assert PySpin.IsAvailable(nodemap.GetNode("ExposureTime"))
    assert nodemap.GetNode("NoSuchNode") is None
    assert not PySpin.IsReadable(PySpin.CFloatPtr(nodemap.GetNode("NoSuchNode")))
    assert not PySpin.CFloatPtr(nodemap.GetNode("Width")).IsValid()  # wrong type -> NULL
    cam.BeginAcquisition()
    img = cam.GetNextImage(1000)
    img.Release()
    cam.EndAcquisition()
    cam.DeInit()
    with pytest.raises(PySpin.SpinnakerException) as ei:
        system.ReleaseInstance()  # `cam` and `cams` still hold the camera
    assert ei.value.errorcode == PySpin.SPINNAKER_ERR_RESOURCE_IN_USE
    del cam, img
    cams.Clear()
    system.ReleaseInstance()


# ---------------------------------------------------------------------------
# Fault injection
# ---------------------------------------------------------------------------

def grab(PySpin, cam, timeout_ms=200):
    cam.TriggerSoftware()
    img = cam.cam.GetNextImage(timeout_ms)
    try:
        return img.GetNDArray().copy(), img.IsIncomplete()
    finally:
        img.Release()


def test_fault_timeout_from_frame(PySpin, sp):
    PySpin.fake.reset(cameras=[spec(PySpin, **FAST)], timeout_from_frame=2)
    with sp.Camera() as cam:
        software_trigger_setup(cam)
        cam.start()
        grab(PySpin, cam)
        grab(PySpin, cam)
        for _ in range(2):
            with pytest.raises(PySpin.SpinnakerException) as ei:
                grab(PySpin, cam, timeout_ms=40)
            assert ei.value.errorcode == PySpin.SPINNAKER_ERR_TIMEOUT
        cam.stop()
    assert PySpin.fake.frames_delivered == 2


def test_fault_error_at_frame(PySpin, sp):
    PySpin.fake.reset(cameras=[spec(PySpin, **FAST)], error_at_frame=1)
    with sp.Camera() as cam:
        software_trigger_setup(cam)
        cam.start()
        grab(PySpin, cam)
        with pytest.raises(PySpin.SpinnakerException) as ei:
            grab(PySpin, cam)
        assert ei.value.errorcode == PySpin.SPINNAKER_ERR_IO
        assert "frame 1" in str(ei.value)
        grab(PySpin, cam)  # recovers
        assert PySpin.fake.buffers_in_use() == 0
        cam.stop()
    dev = PySpin.fake.camera()
    assert (dev.frames_delivered, dev.frames_errored) == (2, 1)


def test_fault_incomplete_at_frame(PySpin, sp):
    PySpin.fake.reset(cameras=[spec(PySpin, incomplete_at_frame=[0, 2], **FAST)])
    with sp.Camera() as cam:
        software_trigger_setup(cam)
        cam.start()
        cam.TriggerSoftware()
        img = cam.cam.GetNextImage(200)
        assert img.IsIncomplete()
        assert img.GetImageStatus() == PySpin.IMAGE_DATA_INCOMPLETE
        assert PySpin.Image.GetImageStatusDescription(img.GetImageStatus()) == "Image data is incomplete."
        assert (img.GetNDArray()[240:] == 0).all()
        img.Release()
        assert grab(PySpin, cam)[1] is False
        assert grab(PySpin, cam)[1] is True
        cam.stop()


def test_fault_disconnect_at_frame(PySpin, sp):
    PySpin.fake.reset(cameras=[spec(PySpin, **FAST)], disconnect_at_frame=1)
    cam = sp.Camera()
    cam.init()
    software_trigger_setup(cam)
    cam.start()
    grab(PySpin, cam)
    with pytest.raises(PySpin.SpinnakerException) as ei:
        grab(PySpin, cam, timeout_ms=40)  # the unplug shows up as a timeout...
    assert ei.value.errorcode == PySpin.SPINNAKER_ERR_TIMEOUT
    with pytest.raises(PySpin.SpinnakerException) as ei:
        cam.cam.GetNextImage(40)  # ...then every camera call fails
    assert ei.value.errorcode == PySpin.SPINNAKER_ERR_NOT_INITIALIZED
    assert "removed" in str(ei.value)
    with pytest.raises(PySpin.SpinnakerException):
        cam.TriggerSoftware()
    with pytest.raises(sp.CameraError):
        cam.ExposureTime  # nodes are no longer readable
    with pytest.raises(PySpin.SpinnakerException):
        cam.close()  # simple_pyspin's close() -> stop() -> EndAcquisition raises
    with pytest.raises(sp.CameraError, match="No cameras detected"):
        sp.Camera()


# ---------------------------------------------------------------------------
# The autofocus adapter's flow, verbatim (without autofocus.py)
# ---------------------------------------------------------------------------

def adapter_open(sp, serial_or_index, exposure_us=None):
    cam = sp.Camera(serial_or_index)
    cam.init()
    software_trigger_setup(cam, exposure_us)  # ExposureAuto Off first: ExposureTime is read-only under auto
    cam.start()
    return cam


def adapter_grab(PySpin, cam, timeout_ms):
    drained = 0
    while True:
        try:
            stale = cam.cam.GetNextImage(PySpin.EVENT_TIMEOUT_NONE)
        except PySpin.SpinnakerException:
            break
        stale.Release()
        drained += 1
    cam.TriggerSoftware()
    img = cam.cam.GetNextImage(timeout_ms)
    try:
        if img.IsIncomplete():
            raise RuntimeError("incomplete image: status %d" % img.GetImageStatus())
        arr = img.GetNDArray().copy()
    finally:
        img.Release()
    return arr, drained, img.fake_exposure_started_s


def adapter_close(cam):
    cam.stop()
    cam.TriggerMode = "Off"
    cam.close()


def test_autofocus_adapter_flow(PySpin, sp):
    z = {"value": 0.0}

    def render(t):  # brightness encodes the "stage position" at exposure time
        return np.full((120, 160), 10 + 20 * z["value"], dtype=np.float64)

    PySpin.fake.reset(cameras=[spec(PySpin, serial="77", width=160, height=120, render=render,
                                    readout_s=0.0005)])
    dev = PySpin.fake.camera("77")
    cam = adapter_open(sp, "77", exposure_us=2000.0)
    try:
        for step in range(5):
            z["value"] = float(step)
            t_move_done = time.monotonic()
            arr, drained, started = adapter_grab(PySpin, cam, timeout_ms=500)
            assert drained == 0
            assert started >= t_move_done
            assert arr.dtype == np.uint8 and arr.shape == (120, 160)
            assert arr[0, 0] == 10 + 20 * step
            assert dev.buffers_in_use() == 0
    finally:
        adapter_close(cam)
    assert dev.value("TriggerMode") == "Off"
    assert not dev.streaming
    assert dev.acquisitions_started == 1
    assert dev.triggers == dev.frames_delivered == 5
    assert len(dev.last_release_times) == 5
    events = [e[2] for e in PySpin.fake.events()]
    assert events.index("BeginAcquisition") < events.index("execute") < events.index("EndAcquisition")


def test_autofocus_adapter_drains_a_stale_frame(PySpin, sp):
    PySpin.fake.reset(cameras=[spec(PySpin, width=160, height=120, readout_s=0.0005)])
    cam = adapter_open(sp, 0, exposure_us=100_000.0)
    try:
        cam.TriggerSoftware()
        with pytest.raises(PySpin.SpinnakerException):
            cam.cam.GetNextImage(PySpin.EVENT_TIMEOUT_NONE)  # gave up before the exposure ended
        time.sleep(0.15)  # ...so its frame is now waiting in the queue
        t_before = time.monotonic()
        arr, drained, started = adapter_grab(PySpin, cam, timeout_ms=500)
        assert drained == 1
        assert started >= t_before
    finally:
        adapter_close(cam)
    assert PySpin.fake.buffers_in_use() == 0


# ---------------------------------------------------------------------------
# Configuration from the environment
# ---------------------------------------------------------------------------

def test_env_config_in_process(PySpin, sp, monkeypatch):
    monkeypatch.setenv("FAKE_PYSPIN_CONFIG", json.dumps(
        {"cameras": [{"serial": "123", "width": 320, "height": 240, "exposure_auto": "Off",
                      "exposure_us": 1000.0}], "timeout_from_frame": 1}))
    sys.modules.pop("PySpin")
    sys.modules.pop("simple_pyspin")
    fresh = importlib.import_module("PySpin")
    sp2 = importlib.import_module("simple_pyspin")
    with sp2.Camera("123") as cam:
        assert (cam.Width, cam.Height) == (320, 240)
        software_trigger_setup(cam)
        cam.start()
        grab(fresh, cam)
        with pytest.raises(fresh.SpinnakerException):
            grab(fresh, cam, timeout_ms=20)
        cam.stop()


def test_env_config_bad_json_fails_import(PySpin, monkeypatch):
    monkeypatch.setenv("FAKE_PYSPIN_CONFIG", '{"cameras": [{"serial": "1", "colour": true}]}')
    sys.modules.pop("PySpin")
    with pytest.raises(ImportError, match="colour"):
        importlib.import_module("PySpin")


def test_env_config_subprocess(tmp_path):
    script = textwrap.dedent("""
        import json, PySpin, simple_pyspin
        out = {"fake": PySpin.__fake_pyspin__}
        with simple_pyspin.Camera("123") as cam:
            out["size"] = [cam.Width, cam.Height]
            cam.TriggerMode = "Off"; cam.TriggerSource = "Software"; cam.TriggerMode = "On"
            cam.start()
            codes = []
            for _ in range(3):
                cam.TriggerSoftware()
                try:
                    cam.cam.GetNextImage(100).Release()
                    codes.append(0)
                except PySpin.SpinnakerException as ex:
                    codes.append(ex.errorcode)
            cam.stop()
        out["codes"] = codes
        print(json.dumps(out))
    """)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(FAKE_DIR)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["FAKE_PYSPIN_CONFIG"] = json.dumps(
        {"cameras": [{"serial": "123", "width": 320, "height": 240}], "timeout_from_frame": 2})
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"fake": True, "size": [320, 240], "codes": [0, 0, -1011]}


# ---------------------------------------------------------------------------
# Colour, packed formats, auto modes, exclusive Init (as strict as a camera)
# ---------------------------------------------------------------------------

def unpack12(raw, packing):
    """Reference unpacking of two 12-bit pixels per 3 bytes (written from the format definitions)."""
    b = raw.reshape(raw.shape[0], -1, 3).astype(np.uint16)
    if packing == "p":  # PFNC Mono12p: lsb first
        p0 = b[..., 0] | ((b[..., 1] & 0xF) << 8)
        p1 = (b[..., 1] >> 4) | (b[..., 2] << 4)
    else:  # GigE Vision Mono12Packed
        p0 = (b[..., 0] << 4) | (b[..., 1] & 0xF)
        p1 = (b[..., 2] << 4) | (b[..., 1] >> 4)
    return np.stack([p0, p1], axis=-1).reshape(raw.shape[0], -1)


@pytest.mark.parametrize("fmt, packing", [("Mono12p", "p"), ("Mono12Packed", "gige")])
def test_packed_formats_deliver_packed_bytes(PySpin, sp, fmt, packing):
    values = (np.arange(16 * 32, dtype=np.uint16).reshape(16, 32) * 7) % 4096
    PySpin.fake.reset(cameras=[spec(PySpin, width=32, height=16, pixel_format=fmt,
                                    render=lambda t: values.astype(float), **FAST)])
    with sp.Camera() as cam:
        assert cam.PayloadSize == 16 * 32 * 3 // 2
        cam.start()
        img = cam.cam.GetNextImage(1000)
        raw = img.GetNDArray().copy()
        assert img.GetBitsPerPixel() == 12 and img.GetPixelFormatName() == fmt
        img.Release()
        cam.stop()
        cam.cam.DeInit()
    assert raw.dtype == np.uint8 and raw.shape == (16, 48)  # bytes, not pixels
    assert np.array_equal(unpack12(raw, packing), values)


def test_bayer_camera_mosaics_an_rgb_scene_and_offers_only_its_formats(PySpin, sp):
    rgb = np.zeros((8, 8, 3))
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    PySpin.fake.reset(cameras=[spec(PySpin, width=8, height=8, color_filter="BayerGR", render=lambda t: rgb, **FAST)])
    with sp.Camera() as cam:
        assert cam.PixelFormat == "BayerGR8" and cam.PixelColorFilter == "BayerGR"
        offered = [e.GetSymbolic() for e in cam.camera_attributes["PixelFormat"].GetEntries()
                   if PySpin.IsAvailable(PySpin.CEnumEntryPtr(e))]
        assert offered == ["BayerGR8", "BayerGR16", "BayerGR12p"]
        with pytest.raises(PySpin.SpinnakerException) as ei:
            cam.PixelFormat = "Mono8"  # a colour-only camera
        assert ei.value.errorcode == PySpin.GENICAM_ERR_ACCESS
        cam.start()
        img = cam.cam.GetNextImage(1000)
        raw = img.GetNDArray().copy()
        img.Release()
        cam.stop()
        cam.cam.DeInit()
    assert raw[0, 0] == 100 and raw[0, 1] == 200 and raw[1, 0] == 50 and raw[1, 1] == 100  # G R / B G


def test_auto_exposure_and_gain_hunt_between_frames_until_turned_off(PySpin, sp):
    PySpin.fake.reset(cameras=[spec(PySpin, exposure_auto="Continuous", gain_auto="Continuous",
                                    exposure_us=1000.0, readout_s=0.0005)])
    dev = PySpin.fake.camera()
    with sp.Camera() as cam:
        software_trigger_setup(cam)
        cam.start()
        for _ in range(3):
            grab(PySpin, cam)
        cam.stop()
        cam.ExposureAuto = cam.GainAuto = "Off"
        cam.start()
        for _ in range(3):
            grab(PySpin, cam)
        cam.stop()
        cam.cam.DeInit()
    hunting, frozen = dev.delivered[:3], dev.delivered[3:]
    assert len({d["exposure_us"] for d in hunting}) > 1 and len({d["gain_db"] for d in hunting}) > 1
    assert len({d["exposure_us"] for d in frozen}) == 1 and len({d["gain_db"] for d in frozen}) == 1


def test_locked_nodes_are_read_only(PySpin, sp):
    PySpin.fake.reset(cameras=[spec(PySpin, locked_nodes=("ExposureAuto",))])
    with sp.Camera() as cam:
        assert cam.ExposureAuto == "Continuous"
        with pytest.raises(sp.CameraError, match="not currently writable"):
            cam.ExposureAuto = "Off"
        cam.cam.DeInit()


def test_init_is_refused_while_another_handle_holds_the_camera(PySpin, sp):
    first = sp.Camera()
    first.init()
    first.close()  # simple_pyspin drops the handle without DeInit
    with pytest.raises(PySpin.SpinnakerException) as ei:
        sp.Camera().init()
    assert ei.value.errorcode == PySpin.SPINNAKER_ERR_RESOURCE_IN_USE
    PySpin.fake.camera().initialized = False  # what a power cycle would do
    again = sp.Camera()
    again.init()
    again.init()  # twice through the same handle: a no-op
    again.cam.DeInit()
