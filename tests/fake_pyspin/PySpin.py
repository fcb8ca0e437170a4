"""A fake ``PySpin`` module (Teledyne FLIR Spinnaker SDK binding) for tests.

Put the directory holding this file first on ``sys.path`` / ``PYTHONPATH`` and
``import PySpin`` finds it.  It is faithful enough for the real, unmodified
``simple_pyspin`` package to run on top of it, and it models the parts of a
Blackfly camera (default model ``BFLY-U3-23S6M``) that matter to code that
grabs frames: the node map and its access rules, acquisition modes, software
triggering, the host-side buffer pool and its handling modes, timeouts, and
image lifetime (``Release``).

Nothing here talks to hardware.  Time is the host's real ``time.monotonic()``;
frames are produced lazily (there is no background thread), which keeps tests
deterministic: a frame "exists" once its exposure and read-out would have
finished, and it is materialised the next time any API call looks.

Test-facing API (not part of real PySpin)
-----------------------------------------
``PySpin.fake`` is the control object::

    import PySpin
    PySpin.fake.reset(cameras=[PySpin.FakeCameraSpec(serial="12345", width=640,
                                                     height=480, render=fn)],
                      timeout_from_frame=None, error_at_frame=None,
                      incomplete_at_frame=None, disconnect_at_frame=None)
    cam = PySpin.fake.camera("12345")   # -> FakeCamera (the simulated device)
    cam.frames_delivered, cam.buffers_in_use(), cam.acquisitions_started,
    cam.triggers, cam.last_release_times, cam.value("TriggerMode"), ...

Configuration from the environment (for subprocess runs): if the environment
variable ``FAKE_PYSPIN_CONFIG`` holds a JSON object (or the path of a file
holding one) it is passed to ``fake.configure()`` at import, e.g.::

    FAKE_PYSPIN_CONFIG='{"cameras": [{"serial": "123", "width": 320,
                          "height": 240}], "timeout_from_frame": 5}'

Without it the fake starts with one default camera (serial ``"12345678"``).

Frame numbering used by the fault options: "frame N" is the N-th (0-based)
image that ``GetNextImage`` hands out on that camera since the last
``reset()``, counting every image it hands out (including ones a caller
drains and throws away) and counting a frame lost to ``error_at_frame``.

Deliberate differences from real PySpin are listed in ``DIFFERENCES`` below.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import inspect
import json
import math
import os
import threading
import time
import weakref
from typing import Any, Iterable, Optional, Sequence

import numpy as np

__fake_pyspin__ = True

DIFFERENCES = """
* Frames are produced lazily from host time; there is no camera clock.
  Image.GetTimeStamp() is the host time.monotonic() of exposure start in ns.
* GetNDArray() returns a view of the stream buffer (worst case). On Release()
  the buffer is overwritten with a marker (0xDE / 0xDEAD) so code that keeps
  using an array after releasing its image, without .copy(), sees garbage at
  once instead of now and then.  (fake.reset(scribble_released_buffers=False)
  turns that off.)  Calling GetNDArray()/GetData() on a released image raises
  SpinnakerException(-1013).  Releasing twice raises too.
* An image that is never Release()d keeps its buffer forever, even when the
  Python object is garbage collected (strict; FLIR says to always release).
  fake.reset(release_on_gc=True) releases on garbage collection instead.
  Note simple_pyspin.Camera.get_array() never releases, so on the fake it
  leaks one buffer per call.
* EVENT_TIMEOUT_INFINITE waits at most fake.infinite_timeout_guard_s (default
  10 s) and then raises FakePySpinHang (a RuntimeError, not a
  SpinnakerException) so a test that would hang forever fails instead.
* A camera that went away raises on every CameraPtr call (error -1002,
  "Camera has been removed from the list and is no longer valid."), and its
  nodes become NA (so pointer reads/writes raise AccessException -2006).
  Images already handed out stay usable and releasable.
* GetBySerial() with an unknown serial returns a CameraPtr whose IsValid() is
  False; every other call on it raises SpinnakerException(-1006).
* Enumeration entry integer values (PixelFormat_Mono8, TriggerMode_On, ...)
  are the entry's index in the fake's entry list, not FLIR's numbers.
* SWIG-style argument checks: GetNextImage(timeout) and integer node
  SetValue() need a Python int (a float or numpy integer raises TypeError);
  float nodes take int or float.
* The node map is a small subset of a real Blackfly's, with plausible but
  not datasheet-exact ranges and increments.
* Init() on a camera still initialised through another CameraPtr (one that
  was never DeInit()ed, even if it was dropped) raises
  SpinnakerException(-1004): stricter than the SDK may be within one process
  (see CameraPtr.Init).  Init() twice through the same handle is a no-op.
* Packed pixel formats (Mono12p, Mono10p, Mono12Packed, Bayer*12p): the buffer
  holds the packed bytes and GetNDArray() returns them as uint8, shape
  Height x (Width * bits / 8): the worst case for code that forgets to
  unpack (we do not know what every PySpin version returns there).
* ExposureAuto/GainAuto "Continuous" re-adjust after every frame
  (ExposureTime x1.1 or /1.1, Gain +-0.5 dB, alternately), so code that does
  not turn them off sees the exposure and gain change between frames.
  "Once" converges at once and turns itself Off.
* Enumeration entries a camera does not offer (PixelFormat, AdcBitDepth) are
  NA; setting one raises an AccessException (-2006).
* Triggers: TriggerMode, TriggerSource and TriggerActivation belong to the
  selected TriggerSelector entry (FrameStart, AcquisitionStart, FrameBurstStart,
  as on a Blackfly S; GenICam SFNC: "TriggerMode: Controls if the selected
  trigger is active").  A trigger's source and activation are writable only
  while THAT trigger is Off; the selector is writable at any time (as on
  pylon's camera emulator: a camera can be left with FrameStart On and
  another entry selected).  TriggerSoftware fires the selected trigger.  An
  AcquisitionStart or FrameBurstStart trigger that is On gates every frame
  until it fires (Basler's manuals, "Acquisition Start Trigger On" use case:
  the camera waits "for acquisition start trigger"); once fired the gate stays
  open until the acquisition ends (a real camera re-arms it after a frame or
  burst count: the fake is laxer there).  fake.camera().trigger_value(entry,
  node) reads one entry's node; value(node) reads the selected entry's.
"""

# ---------------------------------------------------------------------------
# Constants (names and values as in Spinnaker / GenApi)
# ---------------------------------------------------------------------------

EVENT_TIMEOUT_NONE = 0
EVENT_TIMEOUT_INFINITE = 0xFFFFFFFFFFFFFFFF

# GenApi EAccessMode
NI, NA, WO, RO, RW, _UndefinedAccesMode, _CycleDetectAccesMode = range(7)

# GenApi EInterfaceType
(intfIValue, intfIBase, intfIInteger, intfIBoolean, intfICommand, intfIFloat,
 intfIString, intfIRegister, intfICategory, intfIEnumeration, intfIEnumEntry,
 intfIPort) = range(12)

# Spinnaker error codes
SPINNAKER_ERR_SUCCESS = 0
SPINNAKER_ERR_ERROR = -1001
SPINNAKER_ERR_NOT_INITIALIZED = -1002
SPINNAKER_ERR_NOT_IMPLEMENTED = -1003
SPINNAKER_ERR_RESOURCE_IN_USE = -1004
SPINNAKER_ERR_ACCESS_DENIED = -1005
SPINNAKER_ERR_INVALID_HANDLE = -1006
SPINNAKER_ERR_INVALID_ID = -1007
SPINNAKER_ERR_NO_DATA = -1008
SPINNAKER_ERR_INVALID_PARAMETER = -1009
SPINNAKER_ERR_IO = -1010
SPINNAKER_ERR_TIMEOUT = -1011
SPINNAKER_ERR_ABORT = -1012
SPINNAKER_ERR_INVALID_BUFFER = -1013
SPINNAKER_ERR_NOT_AVAILABLE = -1014
SPINNAKER_ERR_INVALID_ADDRESS = -1015
SPINNAKER_ERR_BUFFER_TOO_SMALL = -1016
SPINNAKER_ERR_INVALID_INDEX = -1017
SPINNAKER_ERR_PARSING_CHUNK_DATA = -1018
SPINNAKER_ERR_INVALID_VALUE = -1019
SPINNAKER_ERR_RESOURCE_EXHAUSTED = -1020
SPINNAKER_ERR_OUT_OF_MEMORY = -1021
SPINNAKER_ERR_BUSY = -1022
GENICAM_ERR_INVALID_ARGUMENT = -2001
GENICAM_ERR_OUT_OF_RANGE = -2002
GENICAM_ERR_PROPERTY = -2003
GENICAM_ERR_RUN_TIME = -2004
GENICAM_ERR_LOGICAL = -2005
GENICAM_ERR_ACCESS = -2006
GENICAM_ERR_TIMEOUT = -2007
GENICAM_ERR_DYNAMIC_CAST = -2008
GENICAM_ERR_GENERIC = -2009
GENICAM_ERR_BAD_ALLOCATION = -2010
SPINNAKER_ERR_GENICAM_INVALID_ARGUMENT = GENICAM_ERR_INVALID_ARGUMENT
SPINNAKER_ERR_GENICAM_OUT_OF_RANGE = GENICAM_ERR_OUT_OF_RANGE
SPINNAKER_ERR_GENICAM_PROPERTY = GENICAM_ERR_PROPERTY
SPINNAKER_ERR_GENICAM_RUN_TIME = GENICAM_ERR_RUN_TIME
SPINNAKER_ERR_GENICAM_LOGICAL = GENICAM_ERR_LOGICAL
SPINNAKER_ERR_GENICAM_ACCESS = GENICAM_ERR_ACCESS
SPINNAKER_ERR_GENICAM_TIMEOUT = GENICAM_ERR_TIMEOUT
SPINNAKER_ERR_GENICAM_DYNAMIC_CAST = GENICAM_ERR_DYNAMIC_CAST
SPINNAKER_ERR_GENICAM_GENERIC = GENICAM_ERR_GENERIC
SPINNAKER_ERR_GENICAM_BAD_ALLOCATION = GENICAM_ERR_BAD_ALLOCATION

# Spinnaker ImageStatus
IMAGE_UNKNOWN_ERROR = -1
IMAGE_NO_ERROR = 0
IMAGE_CRC_CHECK_FAILED = 1
IMAGE_DATA_OVERFLOW = 2
IMAGE_MISSING_PACKETS = 3
IMAGE_LEADER_BUFFER_SIZE_INCONSISTENT = 4
IMAGE_TRAILER_BUFFER_SIZE_INCONSISTENT = 5
IMAGE_PACKETID_INCONSISTENT = 6
IMAGE_MISSING_LEADER = 7
IMAGE_MISSING_TRAILER = 8
IMAGE_DATA_INCOMPLETE = 9
IMAGE_INFO_INCONSISTENT = 10
IMAGE_CHUNK_DATA_INVALID = 11
IMAGE_NO_SYSTEM_RESOURCES = 12

_IMAGE_STATUS_TEXT = {
    IMAGE_UNKNOWN_ERROR: "Image has an unknown error.",
    IMAGE_NO_ERROR: "Image is returned from GetNextImage() call without any errors.",
    IMAGE_CRC_CHECK_FAILED: "Image failed CRC check.",
    IMAGE_DATA_OVERFLOW: "Received more data than the size of the image.",
    IMAGE_MISSING_PACKETS: "Image has missing packets.",
    IMAGE_LEADER_BUFFER_SIZE_INCONSISTENT: "Image leader is incomplete.",
    IMAGE_TRAILER_BUFFER_SIZE_INCONSISTENT: "Image trailer is incomplete.",
    IMAGE_PACKETID_INCONSISTENT: "Image has an inconsistent packet id.",
    IMAGE_MISSING_LEADER: "Image leader is missing.",
    IMAGE_MISSING_TRAILER: "Image trailer is missing.",
    IMAGE_DATA_INCOMPLETE: "Image data is incomplete.",
    IMAGE_INFO_INCONSISTENT: "Image info is corrupted.",
    IMAGE_CHUNK_DATA_INVALID: "Image chunk data is invalid.",
    IMAGE_NO_SYSTEM_RESOURCES: "Image cannot be processed due to lack of system resources.",
}

# Enumerations of the fake node map: name -> entries.  The integer value of an
# entry (and of the module constant <Enum>_<Entry>) is its index here.
_ENUM_ENTRIES = {
    "AcquisitionMode": ["Continuous", "SingleFrame", "MultiFrame"],
    "TriggerSelector": ["FrameStart", "AcquisitionStart", "FrameBurstStart"],
    "TriggerMode": ["Off", "On"],
    "TriggerSource": ["Software", "Line0", "Line1", "Line2", "Line3"],
    "TriggerActivation": ["RisingEdge", "FallingEdge"],
    "ExposureAuto": ["Off", "Once", "Continuous"],
    "GainAuto": ["Off", "Once", "Continuous"],
    # Mono8 and Mono16 keep indexes 0 and 1; the packed and Bayer formats follow.
    "PixelFormat": ["Mono8", "Mono16", "Mono10p", "Mono12p", "Mono12Packed",
                    "BayerRG8", "BayerGB8", "BayerGR8", "BayerBG8",
                    "BayerRG16", "BayerGB16", "BayerGR16", "BayerBG16",
                    "BayerRG12p", "BayerGB12p", "BayerGR12p", "BayerBG12p"],
    "PixelColorFilter": ["None", "BayerRG", "BayerGB", "BayerGR", "BayerBG"],
    "AdcBitDepth": ["Bit8", "Bit10", "Bit12"],
    "StreamBufferHandlingMode": ["OldestFirst", "OldestFirstOverwrite",
                                 "NewestFirst", "NewestOnly"],
    "StreamBufferCountMode": ["Manual", "Auto"],
}
for _enum_name, _entries in _ENUM_ENTRIES.items():
    for _i, _entry in enumerate(_entries):
        globals()["%s_%s" % (_enum_name, _entry)] = _i
del _enum_name, _entries, _i, _entry

# The nodes that belong to the selected TriggerSelector entry (each entry has its own), and the
# entries that gate frames: while one of them is On, no frame starts until it has fired.
TRIGGER_NODES = ("TriggerMode", "TriggerSource", "TriggerActivation")
_GATING_TRIGGERS = ("AcquisitionStart", "FrameBurstStart")


class _SelectedStore:
    """A node store for TRIGGER_NODES: reads and writes go to the selected TriggerSelector entry."""

    def __init__(self, dev):
        self._dev = dev

    def _entry(self):
        return self._dev.trigger_entries[self._dev.values["TriggerSelector"]]

    def __getitem__(self, name):
        return self._entry()[name]

    def __setitem__(self, name, value):
        self._entry()[name] = value

    def setdefault(self, name, value):
        for entry in self._dev.trigger_entries.values():
            entry.setdefault(name, value)
        return self[name]



@dataclasses.dataclass(frozen=True)
class _PixelFormat:
    """What a pixel format puts in a buffer.  ``bits``: significant bits per pixel; ``packing``:
    None (one uint8/uint16 per pixel), "p" (PFNC lsb-first, e.g. Mono12p: 2 pixels in 3 bytes)
    or "gige" (the GigE Vision legacy Mono12Packed: byte 1 holds the low nibbles).  ``cfa``:
    the Bayer tile, top-left first ("RGGB" for BayerRG*), None for mono."""

    bits: int
    packing: Optional[str] = None
    cfa: Optional[str] = None

    @property
    def dtype(self):
        return np.uint8 if self.packing or self.bits <= 8 else np.uint16

    def row_items(self, width):
        """Items (bytes for packed formats) per row of ``width`` pixels."""
        return width * self.bits // 8 if self.packing else width


_CFA_OF_FILTER = {"BayerRG": "RGGB", "BayerGB": "GBRG", "BayerGR": "GRBG", "BayerBG": "BGGR"}
_PIXEL_FORMATS = {"Mono8": _PixelFormat(8), "Mono16": _PixelFormat(16), "Mono10p": _PixelFormat(10, "p"),
                  "Mono12p": _PixelFormat(12, "p"), "Mono12Packed": _PixelFormat(12, "gige")}
for _filter, _cfa in _CFA_OF_FILTER.items():
    _PIXEL_FORMATS[_filter + "8"] = _PixelFormat(8, cfa=_cfa)
    _PIXEL_FORMATS[_filter + "16"] = _PixelFormat(16, cfa=_cfa)
    _PIXEL_FORMATS[_filter + "12p"] = _PixelFormat(12, "p", cfa=_cfa)
del _filter, _cfa
_SCRIBBLE = {name: (0xDE if f.dtype == np.uint8 else 0xDEAD) for name, f in _PIXEL_FORMATS.items()}
# What a camera offers when its spec does not say: a Blackfly-like mono camera with a 12-bit ADC
# offers Mono8, Mono16 and packed 12-bit; a colour one only its own Bayer formats.
_MONO_FORMATS = ("Mono8", "Mono16", "Mono12p", "Mono12Packed")


def _color_formats(color_filter):
    return tuple(color_filter + suffix for suffix in ("8", "16", "12p"))

_clock = time.monotonic
_lock = threading.RLock()
_cv = threading.Condition(_lock)


# ---------------------------------------------------------------------------
# Exceptions
# ---------------------------------------------------------------------------

class SpinnakerException(Exception):
    """Raised by every fake Spinnaker call that fails.

    Like the real one: ``str(ex)`` is ``"Spinnaker: <message> [<code>]"``;
    ``ex.errorcode`` is the numeric code, ``ex.message`` the bare message and
    ``ex.fullmessage`` the full text.
    """

    def __init__(self, message: str = "", errorcode: int = SPINNAKER_ERR_ERROR):
        self.errorcode = int(errorcode)
        self.message = message
        self.fullmessage = "Spinnaker: %s [%d]" % (message, self.errorcode)
        super().__init__(self.fullmessage)

    def __str__(self):
        return self.fullmessage

    def __reduce__(self):
        return (type(self), (self.message, self.errorcode))


class FakePySpinHang(RuntimeError):
    """EVENT_TIMEOUT_INFINITE would have blocked forever on a real camera."""


def _genicam_error(kind: str, code: int, text: str, node: str, func: str):
    return SpinnakerException(
        "GenICam::%s= %s : %s thrown in node '%s' while calling '%s.%s()' "
        "(file 'fake PySpin')" % (kind, text, kind, node, node, func), code)


def _access_error(node, func, what="writable"):
    return _genicam_error("AccessException", GENICAM_ERR_ACCESS,
                          "Node is not %s." % what, node, func)


def _timeout_error():
    return SpinnakerException(
        "Failed waiting for EventData on NEW_BUFFER_DATA event.", SPINNAKER_ERR_TIMEOUT)


def _removed_error():
    return SpinnakerException(
        "Camera has been removed from the list and is no longer valid.",
        SPINNAKER_ERR_NOT_INITIALIZED)


# ---------------------------------------------------------------------------
# Camera specification (test-facing)
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class FakeCameraSpec:
    """Describes one simulated camera.  All fields have defaults.

    width/height: sensor size (WidthMax/HeightMax); the ROI starts at full size.
    render: ``render(exposure_started_s)`` or ``render(exposure_started_s, info)``
        returning a 2-D array, either ROI-sized (Height x Width) or
        sensor-sized (cropped with OffsetX/OffsetY).  ``exposure_started_s`` is
        host ``time.monotonic()``.  Software-triggered frames are rendered inside
        TriggerSoftware() (i.e. at exposure start); free-running frames are
        rendered later, when handed out, so derive the content from the time
        argument, not from "now".  ``info`` is a dict with serial, frame_id,
        exposure_us, gain_db, width, height, offset_x, offset_y, pixel_format,
        sensor_width, sensor_height.  Output dtype conversion to the format's
        significant bits (8, 10, 12 or 16): uint8 and uint16 are shifted (uint16
        >> 8 for Mono8, uint8 << 8 for Mono16, ...), floats/other ints clipped
        to 0..2**bits-1.  A colour camera (``color_filter`` set) may return an
        H x W x 3 RGB array: the fake applies its colour filter array (the
        mosaic, in sensor coordinates) for Bayer formats and takes the
        luminance for Mono formats; a 2-D array is taken as the raw sensor
        values.  Packed formats (Mono12p, Mono12Packed, BayerRG12p, ...) are
        packed into the buffer, so GetNDArray() gives uint8 bytes of shape
        Height x (Width * bits / 8), not pixels (see DIFFERENCES).
        A string "package.module:function" is imported (handy in JSON config).
        None: a deterministic gradient + noise pattern whose brightness scales
        with ExposureTime and Gain.
    Faults (None = inherit the reset()-level value; for the *_at_frame options
    an int or a list of ints): see fake.reset().
    """

    serial: str = "12345678"
    model: str = "BFLY-U3-23S6M"
    vendor: str = "FLIR"
    firmware: str = "1.0.0.0 (fake)"
    width: int = 640
    height: int = 480
    pixel_format: Optional[str] = None  # None: the first of pixel_formats
    # The PixelFormat entries this camera offers (the others are not available, as on a real
    # camera); None: Mono8, Mono16, Mono12p, Mono12Packed for a mono camera, <filter>8, 16 and
    # 12p for a colour one.
    pixel_formats: Optional[Sequence[str]] = None
    color_filter: str = "None"  # PixelColorFilter of a colour sensor: BayerRG, BayerGB, BayerGR, BayerBG
    adc_bits: int = 12  # AdcBitDepth (Bit8, Bit10, Bit12)
    # Nodes that are read-only on this camera whatever their usual rule (e.g. auto modes locked
    # by the firmware or a user set): ("ExposureAuto", "GainAuto").
    locked_nodes: Sequence[str] = ()
    render: Any = None
    exposure_us: float = 10000.0
    exposure_auto: str = "Continuous"
    gain_db: float = 0.0
    gain_auto: str = "Continuous"
    frame_rate: float = 30.0
    max_frame_rate: float = 41.0
    readout_s: float = 0.001
    buffer_count: int = 10
    buffer_handling: str = "OldestFirst"
    seed: int = 0
    timeout_from_frame: Optional[int] = None
    error_at_frame: Any = None
    incomplete_at_frame: Any = None
    disconnect_at_frame: Optional[int] = None


def _frame_set(value) -> frozenset:
    if value is None:
        return frozenset()
    if isinstance(value, (int, np.integer)):
        return frozenset([int(value)])
    return frozenset(int(v) for v in value)


def _resolve_render(render):
    if render is None:
        return None, False
    if isinstance(render, str):
        mod_name, _, attr = render.partition(":")
        if not attr:
            raise ValueError("fake PySpin: render string must be 'module:function', got %r" % render)
        render = getattr(importlib.import_module(mod_name), attr)
    if not callable(render):
        raise TypeError("fake PySpin: render must be callable, got %r" % (render,))
    wants_info = False
    try:
        params = list(inspect.signature(render).parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        wants_info = len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)
    except (TypeError, ValueError):
        pass
    return render, wants_info


# ---------------------------------------------------------------------------
# Nodes
# ---------------------------------------------------------------------------

class INode:
    """A node of a node map (what NodeMap.GetNodes()/GetNode() return)."""

    _intf = intfIBase

    def __init__(self, dev, name, *, access=None, description="", unit="", display_name=None):
        self._dev = dev
        self._name = name
        self._access_fn = access or (lambda d: RO)
        self._description = description
        self._unit = unit
        self._display_name = display_name or name

    # -- INode interface
    def GetName(self, FullQualified=False):
        return self._name

    def GetPrincipalInterfaceType(self):
        return self._intf

    def GetAccessMode(self):
        with _lock:
            dev = self._dev
            if dev is not None and not dev.connected:
                return NA
            return self._access_fn(dev)

    def GetDescription(self):
        return self._description

    def GetDisplayName(self):
        return self._display_name

    def GetToolTip(self):
        return self._description

    def IsFeature(self):
        return True

    def __repr__(self):
        return "<fake PySpin node %s>" % self._name

    # -- helpers used by the pointer classes
    def _check_read(self, func):
        if self.GetAccessMode() not in (RO, RW):
            raise _access_error(self._name, func, "readable")

    def _check_write(self, func):
        if self.GetAccessMode() not in (WO, RW):
            raise _access_error(self._name, func, "writable")

    def _before_write(self):
        dev = self._dev
        if dev is not None and dev.streaming:
            dev._advance(_clock())

    def _log_set(self, value):
        if self._dev is not None:
            self._dev._log("set", "%s=%r" % (self._name, value))


class _ValueNode(INode):
    """Value stored in the device's ``values`` dict (or in the node)."""

    def __init__(self, dev, name, value=None, *, store=None, on_set=None, **kw):
        super().__init__(dev, name, **kw)
        self._store = store if store is not None else {}
        self._store.setdefault(name, value)
        self._on_set = on_set

    def _get(self):
        return self._store[self._name]

    def _put(self, value):
        old = self._store[self._name]
        self._store[self._name] = value
        if self._on_set is not None and old != value:
            self._on_set(old, value)
        if self._dev is not None:
            self._dev._refresh_derived()


class _FloatNode(_ValueNode):
    _intf = intfIFloat

    def __init__(self, dev, name, value, *, vmin, vmax, **kw):
        super().__init__(dev, name, float(value), **kw)
        self._vmin, self._vmax = vmin, vmax

    def _min(self):
        return float(self._vmin(self._dev) if callable(self._vmin) else self._vmin)

    def _max(self):
        return float(self._vmax(self._dev) if callable(self._vmax) else self._vmax)

    def _set_checked(self, value, func="SetValue"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError("in method 'IFloat_SetValue', argument 2 of type 'double'")
        value = float(value)
        with _lock:
            self._check_write(func)
            lo, hi = self._min(), self._max()
            if not (lo <= value <= hi) or math.isnan(value):
                raise _genicam_error(
                    "OutOfRangeException", GENICAM_ERR_OUT_OF_RANGE,
                    "Value %s must be between %s and %s." % (value, lo, hi), self._name, func)
            self._before_write()
            self._put(value)
            self._log_set(value)

    def _to_string(self):
        return repr(self._get())

    def _from_string(self, text):
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise _genicam_error("InvalidArgumentException", GENICAM_ERR_INVALID_ARGUMENT,
                                 "Feature '%s' : cannot convert value '%s', the value is invalid."
                                 % (self._name, text), self._name, "FromString")
        self._set_checked(value, "FromString")


class _IntNode(_ValueNode):
    _intf = intfIInteger

    def __init__(self, dev, name, value, *, vmin, vmax, inc=1, **kw):
        super().__init__(dev, name, int(value), **kw)
        self._vmin, self._vmax, self._inc = vmin, vmax, inc

    def _min(self):
        return int(self._vmin(self._dev) if callable(self._vmin) else self._vmin)

    def _max(self):
        return int(self._vmax(self._dev) if callable(self._vmax) else self._vmax)

    def _set_checked(self, value, func="SetValue"):
        if not isinstance(value, int):  # SWIG int64_t: Python int only (bool is an int)
            raise TypeError("in method 'IInteger_SetValue', argument 2 of type 'int64_t'")
        value = int(value)
        with _lock:
            self._check_write(func)
            lo, hi = self._min(), self._max()
            if not lo <= value <= hi:
                raise _genicam_error(
                    "OutOfRangeException", GENICAM_ERR_OUT_OF_RANGE,
                    "Value = %d must be between %d and %d." % (value, lo, hi), self._name, func)
            if (value - lo) % self._inc:
                raise _genicam_error(
                    "OutOfRangeException", GENICAM_ERR_OUT_OF_RANGE,
                    "Value = %d must be equal to %d + N * %d." % (value, lo, self._inc),
                    self._name, func)
            self._before_write()
            self._put(value)
            self._log_set(value)

    def _to_string(self):
        return str(self._get())

    def _from_string(self, text):
        try:
            value = int(str(text), 0)
        except (TypeError, ValueError):
            raise _genicam_error("InvalidArgumentException", GENICAM_ERR_INVALID_ARGUMENT,
                                 "Feature '%s' : cannot convert value '%s', the value is invalid."
                                 % (self._name, text), self._name, "FromString")
        self._set_checked(value, "FromString")


class _BoolNode(_ValueNode):
    _intf = intfIBoolean

    def _set_checked(self, value, func="SetValue"):
        if not isinstance(value, (bool, int, np.bool_)):
            raise TypeError("in method 'IBoolean_SetValue', argument 2 of type 'bool'")
        with _lock:
            self._check_write(func)
            self._before_write()
            self._put(bool(value))
            self._log_set(bool(value))

    def _to_string(self):
        return "1" if self._get() else "0"

    def _from_string(self, text):
        t = str(text).strip().lower()
        if t in ("1", "true"):
            self._set_checked(True, "FromString")
        elif t in ("0", "false"):
            self._set_checked(False, "FromString")
        else:
            raise _genicam_error("InvalidArgumentException", GENICAM_ERR_INVALID_ARGUMENT,
                                 "Feature '%s' : cannot convert value '%s', the value is invalid."
                                 % (self._name, text), self._name, "FromString")


class _StringNode(_ValueNode):
    _intf = intfIString

    def __init__(self, dev, name, value, *, max_length=64, **kw):
        super().__init__(dev, name, str(value), **kw)
        self._max_length = max_length

    def _set_checked(self, value, func="SetValue"):
        if not isinstance(value, str):
            raise TypeError("in method 'IString_SetValue', argument 2 of type 'Spinnaker::GenICam::gcstring const &'")
        with _lock:
            self._check_write(func)
            if len(value) > self._max_length:
                raise _genicam_error("OutOfRangeException", GENICAM_ERR_OUT_OF_RANGE,
                                     "String too long.", self._name, func)
            self._before_write()
            self._put(value)
            self._log_set(value)

    def _to_string(self):
        return self._get()

    def _from_string(self, text):
        self._set_checked(str(text), "FromString")


class _EnumEntryNode(INode):
    _intf = intfIEnumEntry

    def __init__(self, dev, enum_name, symbolic, value, description="", available=True):
        # An entry the camera does not offer is NA, as GenApi reports it (code filters
        # GetEntries() with IsAvailable()).
        super().__init__(dev, "EnumEntry_%s_%s" % (enum_name, symbolic),
                         access=lambda d: RO if available else NA, description=description,
                         display_name=symbolic)
        self._available = available
        self._symbolic = symbolic
        self._value = value

    # An entry node answers the IEnumEntry calls too (GetEntries() items are
    # often used directly).
    def GetValue(self):
        return self._value

    def GetSymbolic(self):
        return self._symbolic

    def GetNumericValue(self):
        return float(self._value)

    def ToString(self, Verify=False, IgnoreCache=False):
        return self._symbolic


class _EnumNode(_ValueNode):
    _intf = intfIEnumeration

    def __init__(self, dev, name, value, *, available=None, **kw):
        super().__init__(dev, name, value, **kw)
        self._entries = [_EnumEntryNode(dev, name, sym, i, available=available is None or sym in available)
                         for i, sym in enumerate(_ENUM_ENTRIES[name])]
        if value not in _ENUM_ENTRIES[name]:
            raise ValueError("fake PySpin: %s has no entry %r" % (name, value))

    def _entry(self, symbolic):
        for e in self._entries:
            if e._symbolic == symbolic:
                return e
        return None

    def _set_symbolic(self, symbolic, func):
        with _lock:
            self._check_write(func)
            if not isinstance(symbolic, str) or self._entry(symbolic) is None:
                raise _genicam_error(
                    "InvalidArgumentException", GENICAM_ERR_INVALID_ARGUMENT,
                    "Feature '%s' : cannot convert value '%s', the value is invalid."
                    % (self._name, symbolic), self._name, func)
            if not self._entry(symbolic)._available:
                raise _genicam_error(
                    "AccessException", GENICAM_ERR_ACCESS,
                    "Feature '%s' : entry '%s' is not available on this camera."
                    % (self._name, symbolic), self._name, func)
            self._before_write()
            self._put(symbolic)
            self._log_set(symbolic)

    def _set_int(self, value, func):
        if not isinstance(value, int):
            raise TypeError("in method 'IEnumeration_SetIntValue', argument 2 of type 'int64_t'")
        with _lock:
            self._check_write(func)
            for e in self._entries:
                if e._value == value:
                    return self._set_symbolic(e._symbolic, func)
            raise _genicam_error("InvalidArgumentException", GENICAM_ERR_INVALID_ARGUMENT,
                                 "Feature '%s' : value %d is not a valid entry."
                                 % (self._name, value), self._name, func)

    def _to_string(self):
        return self._get()

    def _from_string(self, text):
        self._set_symbolic(text, "FromString")


class _CommandNode(INode):
    _intf = intfICommand

    def __init__(self, dev, name, action, **kw):
        super().__init__(dev, name, **kw)
        self._action = action

    def _execute(self):
        with _lock:
            self._check_write("Execute")
            self._dev._log("execute", self._name)
            self._action()


class _CategoryNode(INode):
    _intf = intfICategory

    def __init__(self, dev, name, features, **kw):
        super().__init__(dev, name, access=lambda d: RO, **kw)
        self._features = features


class NodeMap:
    """INodeMap: GetNode(name) -> node or None, GetNodes() -> list."""

    def __init__(self, nodes: list, device_name: str = "Device"):
        self._nodes = list(nodes)
        self._by_name = {n.GetName(): n for n in self._nodes}
        self._device_name = device_name

    def GetNode(self, name):
        return self._by_name.get(name)

    def GetNodes(self):
        return list(self._nodes)

    def GetNumNodes(self):
        return len(self._nodes)

    def GetDeviceName(self):
        return self._device_name

    def InvalidateNodes(self):
        pass

    def Poll(self, ElapsedTime=0):
        pass


# ---------------------------------------------------------------------------
# Node pointers (CFloatPtr & co.)
# ---------------------------------------------------------------------------

class _Ptr:
    _accepts: tuple = ()

    def __init__(self, node=None):
        if isinstance(node, _Ptr):
            node = node._node
        if node is not None and not isinstance(node, INode):
            raise TypeError("fake PySpin: %s() needs a node, got %r" % (type(self).__name__, node))
        if node is not None and self._accepts and node._intf not in self._accepts:
            node = None  # a failed dynamic cast gives a NULL pointer, as in GenApi
        self._node = node

    def _n(self):
        if self._node is None:
            raise _genicam_error("LogicalErrorException", GENICAM_ERR_LOGICAL,
                                 "Node pointer is NULL.", "?", type(self).__name__)
        return self._node

    def IsValid(self):
        return self._node is not None

    def GetNode(self):
        return self._node

    def GetAccessMode(self):
        return NI if self._node is None else self._node.GetAccessMode()

    def GetName(self, FullQualified=False):
        return self._n().GetName()

    def GetDisplayName(self):
        return self._n().GetDisplayName()

    def GetDescription(self):
        return self._n().GetDescription()

    def GetToolTip(self):
        return self._n().GetToolTip()

    def GetPrincipalInterfaceType(self):
        return self._n().GetPrincipalInterfaceType()

    def __repr__(self):
        return "<fake PySpin %s -> %s>" % (type(self).__name__,
                                           self._node.GetName() if self._node else "NULL")


class CNodePtr(_Ptr):
    pass


class CValuePtr(_Ptr):
    _accepts = (intfIInteger, intfIBoolean, intfICommand, intfIFloat, intfIString,
                intfIEnumeration, intfIEnumEntry)

    def ToString(self, Verify=False, IgnoreCache=False):
        n = self._n()
        with _lock:
            n._check_read("ToString")
            if isinstance(n, _EnumEntryNode):
                return n._symbolic
            if isinstance(n, _CommandNode):
                return ""
            return n._to_string()

    def FromString(self, ValueStr, Verify=True):
        n = self._n()
        if isinstance(n, (_EnumEntryNode, _CommandNode)):
            raise _access_error(n.GetName(), "FromString")
        n._from_string(ValueStr)


class _TypedValuePtr(CValuePtr):
    """GetValue/SetValue, shared by the float, integer, boolean and string pointers."""

    def GetValue(self, Verify=False, IgnoreCache=False):
        n = self._n()
        with _lock:
            n._check_read("GetValue")
            return n._get()

    def SetValue(self, Value, Verify=True):
        self._n()._set_checked(Value)


class _NumberPtr(_TypedValuePtr):
    def GetMin(self):
        return self._n()._min()

    def GetMax(self):
        return self._n()._max()

    def GetUnit(self):
        return self._n()._unit


class CFloatPtr(_NumberPtr):
    _accepts = (intfIFloat,)

    def HasInc(self):
        return False


class CIntegerPtr(_NumberPtr):
    _accepts = (intfIInteger,)

    def GetInc(self):
        return self._n()._inc


class CBooleanPtr(_TypedValuePtr):
    _accepts = (intfIBoolean,)


class CStringPtr(_TypedValuePtr):
    _accepts = (intfIString,)

    def GetMaxLength(self):
        return self._n()._max_length


class CEnumEntryPtr(CValuePtr):
    _accepts = (intfIEnumEntry,)

    def GetValue(self):
        return self._n()._value

    def GetSymbolic(self):
        return self._n()._symbolic

    def GetNumericValue(self):
        return float(self._n()._value)


class CEnumerationPtr(CValuePtr):
    """No GetValue/SetValue, like GenApi's IEnumeration (simple_pyspin relies
    on that to use ToString/FromString)."""

    _accepts = (intfIEnumeration,)

    def GetIntValue(self, Verify=False, IgnoreCache=False):
        n = self._n()
        with _lock:
            n._check_read("GetIntValue")
            return n._entry(n._get())._value

    def SetIntValue(self, Value, Verify=True):
        self._n()._set_int(Value, "SetIntValue")

    def GetEntries(self):
        return list(self._n()._entries)

    def GetEntryByName(self, Symbolic):
        e = self._n()._entry(Symbolic)
        return None if e is None else CEnumEntryPtr(e)

    def GetEntry(self, IntValue):
        for e in self._n()._entries:
            if e._value == IntValue:
                return CEnumEntryPtr(e)
        return None

    def GetCurrentEntry(self, Verify=False, IgnoreCache=False):
        n = self._n()
        with _lock:
            n._check_read("GetCurrentEntry")
            return CEnumEntryPtr(n._entry(n._get()))

    def GetSymbolics(self):
        return [e._symbolic for e in self._n()._entries]


class _QuickSpinEnum(CEnumerationPtr):
    """QuickSpin-style enum (``cam.TriggerMode``): adds GetValue/SetValue(int)."""

    def GetValue(self, Verify=False, IgnoreCache=False):
        return self.GetIntValue()

    def SetValue(self, Value, Verify=True):
        self.SetIntValue(Value)


class CCommandPtr(CValuePtr):
    _accepts = (intfICommand,)

    def Execute(self, Verify=True):
        self._n()._execute()

    def IsDone(self, Verify=True):
        self._n()
        return True


class CCategoryPtr(_Ptr):
    _accepts = (intfICategory,)

    def GetFeatures(self):
        return list(self._n()._features)


def _mode_of(thing):
    if thing is None:
        return NI
    if isinstance(thing, bool):
        return NI
    if isinstance(thing, int):
        return thing
    return thing.GetAccessMode()


def IsReadable(node):
    return _mode_of(node) in (RO, RW)


def IsWritable(node):
    return _mode_of(node) in (WO, RW)


def IsAvailable(node):
    return _mode_of(node) not in (NI, NA)


def IsImplemented(node):
    return _mode_of(node) != NI


# ---------------------------------------------------------------------------
# The simulated device
# ---------------------------------------------------------------------------

class _Frame:
    __slots__ = ("frame_id", "exposure_start", "ready_at", "pixels", "exposure_us",
                 "gain_db", "width", "height", "offset_x", "offset_y", "pixel_format",
                 "triggered")


class _Buffer:
    __slots__ = ("index", "array", "state", "frame", "rendered")

    def __init__(self, index, array):
        self.index = index
        self.array = array
        self.state = "free"  # free | queued | user
        self.frame = None
        self.rendered = False


class FakeCamera:
    """One simulated camera (test-facing; reach it with ``fake.camera()``).

    Counters: frames_delivered (images returned by GetNextImage), frames_handed
    (the frame index the faults count: delivered + lost to error_at_frame),
    acquisitions_started, triggers (TriggerSoftware executions),
    triggers_accepted, triggers_ignored, exposures, frames_dropped,
    last_release_times (host monotonic time of each Release), delivered (list of
    dicts describing each delivered image).  buffers_in_use() counts images
    handed out and not yet released in the current acquisition.
    """

    def __init__(self, control, spec: FakeCameraSpec, defaults: dict):
        self._control = control
        self.spec = spec
        self.serial = str(spec.serial)
        if spec.color_filter not in _ENUM_ENTRIES["PixelColorFilter"]:
            raise ValueError("fake PySpin: color_filter must be one of %s" % _ENUM_ENTRIES["PixelColorFilter"])
        colour = spec.color_filter != "None"
        self.pixel_formats = tuple(spec.pixel_formats or (
            _color_formats(spec.color_filter) if colour else _MONO_FORMATS))
        for name in self.pixel_formats:
            if name not in _PIXEL_FORMATS:
                raise ValueError("fake PySpin: pixel format %r is not one of %s" % (name, list(_PIXEL_FORMATS)))
            cfa = _PIXEL_FORMATS[name].cfa
            if cfa is not None and cfa != _CFA_OF_FILTER.get(spec.color_filter):
                raise ValueError("fake PySpin: %s needs color_filter %r" % (
                    name, {v: k for k, v in _CFA_OF_FILTER.items()}[cfa]))
        self.initial_pixel_format = spec.pixel_format or self.pixel_formats[0]
        if self.initial_pixel_format not in self.pixel_formats:
            raise ValueError("fake PySpin: pixel_format %r is not among pixel_formats %s"
                             % (self.initial_pixel_format, list(self.pixel_formats)))
        if "Bit%d" % spec.adc_bits not in _ENUM_ENTRIES["AdcBitDepth"]:
            raise ValueError("fake PySpin: adc_bits must be 8, 10 or 12")
        if spec.buffer_handling not in _ENUM_ENTRIES["StreamBufferHandlingMode"]:
            raise ValueError("fake PySpin: buffer_handling must be one of %s"
                             % _ENUM_ENTRIES["StreamBufferHandlingMode"])

        def pick(name):
            v = getattr(spec, name)
            return defaults.get(name) if v is None else v

        self.timeout_from_frame = pick("timeout_from_frame")
        self.error_at_frames = _frame_set(pick("error_at_frame"))
        self.incomplete_at_frames = _frame_set(pick("incomplete_at_frame"))
        self.disconnect_at_frame = pick("disconnect_at_frame")
        self.error_code = defaults.get("error_code", SPINNAKER_ERR_IO)
        self._render_fn, self._render_wants_info = _resolve_render(spec.render)

        self.connected = True
        self.epoch = 0
        self.initialized = False
        self.init_owner = None  # weakref to the CameraPtr that Init()ed the camera
        self.streaming = False
        # counters
        self.frames_delivered = 0
        self.frames_handed = 0
        self.frames_errored = 0
        self.acquisitions_started = 0
        self.triggers = 0
        self.triggers_accepted = 0
        self.triggers_ignored = 0
        self.exposures = 0
        self.frames_dropped = 0
        self.last_release_times: list = []
        self.delivered: list = []
        # stream state
        self._buffers: list = []
        self._free = collections.deque()
        self._queue = collections.deque()
        self._inflight = collections.deque()
        self._next_start = None
        self._gate_open = False
        self._busy_until = 0.0
        self._frames_remaining = None
        self._frame_id = 0
        self._generation = 0
        self._build_nodes()

    # ----- node map --------------------------------------------------------
    def _build_nodes(self):
        s = self.spec
        self.values: dict = {}
        self.tl_values: dict = {}
        v = self.values
        # Each TriggerSelector entry has its own TriggerMode, TriggerSource and TriggerActivation.
        self.trigger_entries: dict = {e: {} for e in _ENUM_ENTRIES["TriggerSelector"]}
        sel = _SelectedStore(self)

        def when_init(mode):
            return lambda d: mode if d.initialized else NA

        def unlocked(d):
            if not d.initialized:
                return NA
            return RO if d.streaming else RW

        def trig_cfg(d):  # source and activation of the selected trigger: writable only with it off
            if not d.initialized:
                return NA
            return RW if d._selected_trigger()["TriggerMode"] == "Off" else RO

        def auto_gated(auto):
            def f(d):
                if not d.initialized:
                    return NA
                return RW if d.values[auto] == "Off" else RO
            return f

        def trig_sw(d):
            if not d.initialized:
                return NA
            return WO if d._selected_trigger()["TriggerSource"] == "Software" else NA

        def roi_max_w(d):
            return s.width - d.values["OffsetX"]

        def roi_max_h(d):
            return s.height - d.values["OffsetY"]

        nodes = []

        def add(node):
            nodes.append(node)
            return node

        dev = self
        rw = when_init(RW)
        ro = when_init(RO)
        device_ctl = [
            add(_StringNode(dev, "DeviceVendorName", s.vendor, store=v, access=ro,
                            description="Name of the manufacturer of the device.")),
            add(_StringNode(dev, "DeviceModelName", s.model, store=v, access=ro,
                            description="Model of the device.")),
            add(_StringNode(dev, "DeviceSerialNumber", self.serial, store=v, access=ro,
                            description="Device's serial number.")),
            add(_StringNode(dev, "DeviceVersion", s.firmware, store=v, access=ro,
                            description="Version of the device.")),
            add(_StringNode(dev, "DeviceUserID", "", store=v, access=rw,
                            description="User-programmable device identifier.")),
            add(_FloatNode(dev, "DeviceTemperature", 40.0, vmin=-40.0, vmax=125.0, store=v,
                           access=ro, unit="C", description="Device temperature.")),
        ]
        image_fmt = [
            add(_IntNode(dev, "SensorWidth", s.width, vmin=s.width, vmax=s.width, store=v,
                         access=ro, description="Effective width of the sensor in pixels.")),
            add(_IntNode(dev, "SensorHeight", s.height, vmin=s.height, vmax=s.height, store=v,
                         access=ro, description="Effective height of the sensor in pixels.")),
            add(_IntNode(dev, "WidthMax", s.width, vmin=s.width, vmax=s.width, store=v,
                         access=ro, description="Maximum width of the image.")),
            add(_IntNode(dev, "HeightMax", s.height, vmin=s.height, vmax=s.height, store=v,
                         access=ro, description="Maximum height of the image.")),
            add(_IntNode(dev, "Width", s.width, vmin=16, vmax=roi_max_w, inc=4, store=v,
                         access=unlocked, description="Width of the image provided by the device (in pixels).")),
            add(_IntNode(dev, "Height", s.height, vmin=16, vmax=roi_max_h, inc=2, store=v,
                         access=unlocked, description="Height of the image provided by the device (in pixels).")),
            add(_IntNode(dev, "OffsetX", 0, vmin=0, vmax=lambda d: s.width - d.values["Width"],
                         inc=4, store=v, access=unlocked,
                         description="Horizontal offset from the origin to the region of interest (in pixels).")),
            add(_IntNode(dev, "OffsetY", 0, vmin=0, vmax=lambda d: s.height - d.values["Height"],
                         inc=2, store=v, access=unlocked,
                         description="Vertical offset from the origin to the region of interest (in pixels).")),
            add(_EnumNode(dev, "PixelFormat", self.initial_pixel_format, store=v, access=unlocked,
                          available=self.pixel_formats,
                          description="Format of the pixels provided by the device.")),
            add(_EnumNode(dev, "PixelColorFilter", "None", store=v, access=ro,
                          description="Type of color filter that is applied to the image.")),
            add(_EnumNode(dev, "AdcBitDepth", "Bit%d" % s.adc_bits, store=v, access=unlocked,
                          available=["Bit%d" % b for b in (8, 10, 12) if b <= s.adc_bits],
                          description="Selects which ADC bit depth to use.")),
            add(_BoolNode(dev, "ReverseX", False, store=v, access=unlocked,
                          description="Flip horizontally the image sent by the device.")),
            add(_IntNode(dev, "PayloadSize", 0, vmin=0, vmax=2**40, store=v, access=ro,
                         description="Number of bytes transferred for each image.")),
        ]
        acq_ctl = [
            add(_EnumNode(dev, "AcquisitionMode", "Continuous", store=v, access=unlocked,
                          description="Sets the acquisition mode of the device.")),
            add(_IntNode(dev, "AcquisitionFrameCount", 2, vmin=1, vmax=10000, store=v,
                         access=unlocked,
                         description="Number of frames to acquire in MultiFrame Acquisition mode.")),
            add(_FloatNode(dev, "AcquisitionFrameRate", s.frame_rate, vmin=1.0,
                           vmax=s.max_frame_rate, store=v, access=rw, unit="Hz",
                           description="Frame rate (Hz) of free-running acquisition.")),
            add(_FloatNode(dev, "AcquisitionResultingFrameRate", s.frame_rate, vmin=0.0,
                           vmax=1e6, store=v, access=ro, unit="Hz",
                           description="Resulting frame rate in Hz.")),
            add(_EnumNode(dev, "ExposureAuto", s.exposure_auto, store=v, access=rw,
                          on_set=self._on_auto("ExposureAuto"),
                          description="Sets the automatic exposure mode.")),
            add(_FloatNode(dev, "ExposureTime", s.exposure_us, vmin=10.0, vmax=30_000_000.0,
                           store=v, access=auto_gated("ExposureAuto"), unit="us",
                           description="Exposure time in microseconds when Exposure Mode is Timed.")),
            add(_EnumNode(dev, "TriggerSelector", "FrameStart", store=v, access=rw,
                          description="Selects the type of trigger to configure.")),
            add(_EnumNode(dev, "TriggerMode", "Off", store=sel, access=rw,
                          on_set=self._on_trigger_mode,
                          description="Controls whether or not the selected trigger is active.")),
            add(_EnumNode(dev, "TriggerSource", "Line0", store=sel, access=trig_cfg,
                          description="Specifies the internal signal or physical input line to use as the trigger source.")),
            add(_EnumNode(dev, "TriggerActivation", "RisingEdge", store=sel, access=trig_cfg,
                          description="Specifies the activation mode of the trigger.")),
            add(_CommandNode(dev, "TriggerSoftware", lambda: self._trigger("Software", software=True),
                             access=trig_sw,
                             description="Generates an internal trigger if Trigger Source is set to Software.")),
        ]
        analog_ctl = [
            add(_EnumNode(dev, "GainAuto", s.gain_auto, store=v, access=rw,
                          on_set=self._on_auto("GainAuto"),
                          description="Sets the automatic gain control (AGC) mode.")),
            add(_FloatNode(dev, "Gain", s.gain_db, vmin=0.0, vmax=47.99, store=v,
                           access=auto_gated("GainAuto"), unit="dB",
                           description="Controls the amplification of the video signal in dB.")),
        ]
        for n in nodes:
            if n.GetName() in s.locked_nodes:  # read-only on this camera, whatever the usual rule
                n._access_fn = (lambda f: lambda d: RO if f(d) in (RW, WO) else f(d))(n._access_fn)
        cats = [
            _CategoryNode(dev, "DeviceControl", device_ctl),
            _CategoryNode(dev, "ImageFormatControl", image_fmt),
            _CategoryNode(dev, "AcquisitionControl", acq_ctl),
            _CategoryNode(dev, "AnalogControl", analog_ctl),
        ]
        root = _CategoryNode(dev, "Root", cats)
        all_nodes = [root] + cats + nodes
        for n in nodes:
            if isinstance(n, _EnumNode):
                all_nodes.extend(n._entries)
        self._nodemap = NodeMap(all_nodes, "Device")

        # transport-layer device node map (readable without Init)
        tl = self.tl_values
        tl_ro = lambda d: RO  # noqa: E731
        tl_dev_nodes = [
            _StringNode(dev, "DeviceSerialNumber", self.serial, store=tl, access=tl_ro),
            _StringNode(dev, "DeviceModelName", s.model, store=tl, access=tl_ro),
            _StringNode(dev, "DeviceVendorName", s.vendor, store=tl, access=tl_ro),
            _StringNode(dev, "DeviceID", self.serial, store=tl, access=tl_ro),
            _StringNode(dev, "DeviceDisplayName", "%s %s" % (s.vendor, s.model), store=tl, access=tl_ro),
            _StringNode(dev, "DeviceVersion", s.firmware, store=tl, access=tl_ro),
        ]
        self._tl_device_nodemap = NodeMap(tl_dev_nodes, "TLDevice")

        stream_rw = lambda d: RO if d.streaming else RW  # noqa: E731
        sv = {}
        self.stream_values = sv
        stream_nodes = [
            _EnumNode(dev, "StreamBufferHandlingMode", s.buffer_handling, store=sv, access=stream_rw,
                      description="Available buffer handling modes of this data stream."),
            _EnumNode(dev, "StreamBufferCountMode", "Manual", store=sv, access=stream_rw,
                      description="Controls access to setting the number of buffers used for the stream."),
            _IntNode(dev, "StreamBufferCountManual", s.buffer_count, vmin=1, vmax=1000, store=sv,
                     access=stream_rw, description="Number of buffers to be used on this data stream."),
            _IntNode(dev, "StreamBufferCountResult", s.buffer_count, vmin=0, vmax=1000, store=sv,
                     access=lambda d: RO, description="Number of buffers in use on this data stream."),
        ]
        for n in list(stream_nodes):
            if isinstance(n, _EnumNode):
                stream_nodes.extend(n._entries)
        self._tl_stream_nodemap = NodeMap(stream_nodes, "TLStream")
        self._refresh_derived()

    def _refresh_derived(self):
        v = self.values
        fmt = _PIXEL_FORMATS[v["PixelFormat"]]
        v["PayloadSize"] = v["Height"] * fmt.row_items(v["Width"]) * np.dtype(fmt.dtype).itemsize
        # The filter of the pixels delivered: the sensor's for a Bayer format, None for mono.
        v["PixelColorFilter"] = self.spec.color_filter if fmt.cfa else "None"
        v["AcquisitionResultingFrameRate"] = 1.0 / self._period()

    def _on_auto(self, name):
        def hook(old, new):
            if new == "Once":  # the fake "converges" instantly, then turns auto off
                self.values[name] = "Off"
        return hook

    def _selected_trigger(self):
        return self.trigger_entries[self.values["TriggerSelector"]]

    def _frame_trigger(self):
        return self.trigger_entries["FrameStart"]

    def _gated(self):
        """A gating trigger (AcquisitionStart, FrameBurstStart) is On and has not fired yet."""
        return not self._gate_open and any(self.trigger_entries[e]["TriggerMode"] == "On" for e in _GATING_TRIGGERS)

    def trigger_value(self, entry, name):
        """A trigger node of one TriggerSelector entry, whichever is selected (test-facing)."""
        with _lock:
            return self.trigger_entries[entry][name]

    def _on_trigger_mode(self, old, new):
        if not self.streaming or self.values["TriggerSelector"] != "FrameStart":
            return
        now = _clock()
        if new == "Off":
            self._next_start = max(now, self._busy_until)
        else:
            self._next_start = None

    def value(self, name):
        """Current value of a camera (or TL stream) node, bypassing access rules."""
        with _lock:
            if name in TRIGGER_NODES:  # the selected TriggerSelector entry's
                return self._selected_trigger()[name]
            if name in self.values:
                self._refresh_derived()
                return self.values[name]
            if name in self.stream_values:
                return self.stream_values[name]
            return self.tl_values[name]

    # ----- bookkeeping -----------------------------------------------------
    def _log(self, event, detail=""):
        self._control._log_event(self.serial, event, detail)

    def buffers_in_use(self):
        with _lock:
            return sum(1 for b in self._buffers if b.state == "user")

    def buffers_queued(self):
        with _lock:
            self._advance(_clock())
            return len(self._queue)

    def _exposure_s(self):
        return self.values["ExposureTime"] / 1e6

    def _period(self):
        return max(1.0 / self.values["AcquisitionFrameRate"], self._exposure_s())

    def _handling(self):
        return self.stream_values["StreamBufferHandlingMode"]

    def _can_expose(self):
        return (self._frames_remaining is None or self._frames_remaining > 0) and not self._gated()

    # ----- connection ------------------------------------------------------
    def disconnect(self):
        """Simulate unplugging the camera now."""
        with _cv:
            if not self.connected:
                return
            self.connected = False
            self.streaming = False
            self.initialized = False
            self._queue.clear()
            self._inflight.clear()
            self._free.clear()
            self._log("disconnect")
            _cv.notify_all()

    def reconnect(self):
        """Plug the camera back in (like a power cycle: node values reset).
        CameraPtr objects from before the disconnect stay invalid."""
        with _cv:
            self.connected = True
            self.epoch += 1
            self.initialized = False
            self.streaming = False
            self._buffers = []
            self._build_nodes()
            self._log("reconnect")

    # ----- acquisition -----------------------------------------------------
    def _begin(self):
        now = _clock()
        n = (self.stream_values["StreamBufferCountManual"]
             if self.stream_values["StreamBufferCountMode"] == "Manual" else self.spec.buffer_count)
        self.stream_values["StreamBufferCountResult"] = n
        fmt = _PIXEL_FORMATS[self.values["PixelFormat"]]
        shape = (self.values["Height"], fmt.row_items(self.values["Width"]))
        self._buffers = [_Buffer(i, np.zeros(shape, fmt.dtype)) for i in range(n)]
        self._free = collections.deque(self._buffers)
        self._queue.clear()
        self._inflight.clear()
        self._busy_until = 0.0
        self._frame_id = 0
        mode = self.values["AcquisitionMode"]
        self._frames_remaining = {"Continuous": None, "SingleFrame": 1,
                                  "MultiFrame": self.values["AcquisitionFrameCount"]}[mode]
        self._next_start = now if self._frame_trigger()["TriggerMode"] == "Off" else None
        self._gate_open = False  # AcquisitionStart / FrameBurstStart (when On) must fire again
        self.streaming = True
        self._generation += 1
        self.acquisitions_started += 1
        self._log("BeginAcquisition")

    def _end(self):
        self.streaming = False
        self._queue.clear()
        self._inflight.clear()
        self._free.clear()
        self._buffers = []  # outstanding images are orphaned (their arrays stay valid)
        self._generation += 1
        self._log("EndAcquisition")
        _cv.notify_all()

    def _new_frame(self, start, triggered):
        v = self.values
        f = _Frame()
        f.frame_id = self._frame_id
        self._frame_id += 1
        self.exposures += 1
        if self._frames_remaining is not None:
            self._frames_remaining -= 1
        f.exposure_start = start
        f.exposure_us = v["ExposureTime"]
        f.ready_at = start + f.exposure_us / 1e6 + self.spec.readout_s
        f.gain_db = v["Gain"]
        f.width, f.height = v["Width"], v["Height"]
        f.offset_x, f.offset_y = v["OffsetX"], v["OffsetY"]
        f.pixel_format = v["PixelFormat"]
        f.triggered = triggered
        f.pixels = None
        self._hunt()
        return f

    def _hunt(self):
        """Auto exposure/gain left Continuous re-adjust after every frame, so consecutive frames
        differ in exposure and gain (a real camera's loop hunts around its target in the same
        way when the scene changes, e.g. while the focus moves)."""
        v, up = self.values, self._frame_id % 2 == 1
        if v["ExposureAuto"] == "Continuous":
            v["ExposureTime"] = min(max(v["ExposureTime"] * (1.1 if up else 1 / 1.1), 10.0), 30_000_000.0)
        if v["GainAuto"] == "Continuous":
            v["Gain"] = min(max(v["Gain"] + (0.5 if up else -0.5), 0.0), 47.99)

    def _land(self, frame):
        """A frame finished read-out: put it in a buffer (or drop it)."""
        mode = self._handling()
        if self._free:
            buf = self._free.popleft()
        elif mode != "OldestFirst" and self._queue:
            buf = self._queue.popleft()  # overwrite the oldest waiting image
            self.frames_dropped += 1
        else:
            self.frames_dropped += 1  # no buffer: the frame is lost
            return
        if mode == "NewestOnly":
            while self._queue:
                old = self._queue.popleft()
                old.state, old.frame = "free", None
                self._free.append(old)
                self.frames_dropped += 1
        buf.state, buf.frame = "queued", frame
        if frame.pixels is not None:
            np.copyto(buf.array, frame.pixels)
            frame.pixels = None
            buf.rendered = True
        else:
            buf.rendered = False
        self._queue.append(buf)
        _cv.notify_all()

    def _advance(self, now):
        """Materialise every frame that would have been read out by ``now``."""
        if not self.streaming or not self.connected:
            return
        while self._inflight and self._inflight[0].ready_at <= now:
            self._land(self._inflight.popleft())
        if self._frame_trigger()["TriggerMode"] != "Off" or self._next_start is None:
            return
        exp, ro, period = self._exposure_s(), self.spec.readout_s, self._period()
        nbuf = len(self._buffers)
        while self._can_expose():
            start = self._next_start
            if start + exp + ro > now:
                break
            n_ready = int((now - ro - exp - start) // period) + 1
            if self._frames_remaining is None and n_ready > 2 * nbuf + 4:
                # long gap: skip frames that could not matter, arithmetically
                if self._handling() == "OldestFirst":
                    skip = n_ready if not self._free else 0
                else:
                    skip = n_ready - nbuf
                if skip > 0:
                    self._frame_id += skip
                    self.exposures += skip
                    self.frames_dropped += skip
                    self._next_start = start + skip * period
                    continue
            self._next_start = start + period
            self._land(self._new_frame(start, triggered=False))

    def _next_ready_time(self):
        times = []
        if self._inflight:
            times.append(self._inflight[0].ready_at)
        if (self.streaming and self._frame_trigger()["TriggerMode"] == "Off"
                and self._next_start is not None and self._can_expose()):
            times.append(self._next_start + self._exposure_s() + self.spec.readout_s)
        return min(times) if times else None

    def _trigger(self, source, software=False):
        now = _clock()
        self._advance(now)
        if software:
            self.triggers += 1
        # A software trigger fires the selected entry; an edge on a line fires every entry On with that source.
        fired = [self.values["TriggerSelector"]] if software else [
            e for e, t in self.trigger_entries.items() if t["TriggerMode"] == "On" and t["TriggerSource"] == source]
        gates = [e for e in fired if e in _GATING_TRIGGERS]
        if gates and self.streaming and all(self.trigger_entries[e]["TriggerMode"] == "On" for e in gates):
            if not self._gate_open:
                self._gate_open = True
                if self._frame_trigger()["TriggerMode"] == "Off":
                    self._next_start = max(now, self._busy_until)  # free-running frames start now
            self._log("trigger", "%s fired" % ", ".join(gates))
            if "FrameStart" not in fired:
                return
        v = self._frame_trigger()
        reason = None
        if not self.streaming:
            reason = "not acquiring"
        elif software and self.values["TriggerSelector"] != "FrameStart":
            reason = "the selected trigger (%s) is Off" % self.values["TriggerSelector"]
        elif v["TriggerMode"] != "On":
            reason = "TriggerMode is Off"
        elif v["TriggerSource"] != source:
            reason = "TriggerSource is %s" % v["TriggerSource"]
        elif self._gated():
            reason = "waiting for the %s trigger" % " / ".join(
                e for e in _GATING_TRIGGERS if self.trigger_entries[e]["TriggerMode"] == "On")
        elif not self._can_expose():
            reason = "acquisition frame count reached"
        elif now < self._busy_until:
            reason = "camera busy with previous frame (trigger overlap off)"
        if reason:
            self.triggers_ignored += 1
            self._log("trigger ignored", reason)
            return
        frame = self._new_frame(now, triggered=True)
        frame.pixels = self._render(frame)
        self._busy_until = frame.ready_at
        self._inflight.append(frame)
        self.triggers_accepted += 1
        _cv.notify_all()

    def fire_line_trigger(self, line="Line0"):
        """Simulate a hardware trigger edge on an input line."""
        with _cv:
            if not self.connected:
                return
            self._trigger(line)

    # ----- rendering -------------------------------------------------------
    def _render(self, frame):
        """The frame's buffer contents: sensor values in the frame's pixel format (packed if it is)."""
        s = self.spec
        h, w = frame.height, frame.width
        fmt = _PIXEL_FORMATS[frame.pixel_format]
        if self._render_fn is None:
            arr = self._default_render(frame)
        else:
            if self._render_wants_info:
                info = dict(serial=self.serial, frame_id=frame.frame_id,
                            exposure_us=frame.exposure_us, gain_db=frame.gain_db,
                            width=w, height=h, offset_x=frame.offset_x,
                            offset_y=frame.offset_y, pixel_format=frame.pixel_format,
                            sensor_width=s.width, sensor_height=s.height)
                arr = self._render_fn(frame.exposure_start, info)
            else:
                arr = self._render_fn(frame.exposure_start)
            arr = np.asarray(arr)
            if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
                raise ValueError("fake PySpin: render() must return a 2-D array (or H x W x 3 RGB), got shape %s"
                                 % (arr.shape,))
        if arr.shape[:2] == (h, w):
            pass
        elif arr.shape[:2] == (s.height, s.width):
            arr = arr[frame.offset_y:frame.offset_y + h, frame.offset_x:frame.offset_x + w]
        else:
            raise ValueError("fake PySpin: render() returned shape %s; expected %s (ROI) or %s (sensor)"
                             % (arr.shape, (h, w), (s.height, s.width)))
        if arr.ndim == 3:
            arr = self._mosaic(arr, frame, fmt.cfa) if fmt.cfa else (
                arr.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))
        out = _convert_pixels(arr, frame.pixel_format)
        if self.values.get("ReverseX"):
            out = out[:, ::-1]
        return _pack(out, fmt)

    @staticmethod
    def _mosaic(rgb, frame, cfa):
        """The colour filter array: each pixel keeps one channel, fixed in sensor coordinates."""
        h, w = rgb.shape[:2]
        tile = (frame.offset_y + np.arange(h))[:, None] % 2 * 2 + (frame.offset_x + np.arange(w))[None, :] % 2
        channel = np.array(["RGB".index(c) for c in cfa])[tile]
        return np.take_along_axis(rgb, channel[..., None], axis=2)[..., 0]

    def _default_render(self, frame):
        s = self.spec
        h, w = frame.height, frame.width
        x = (frame.offset_x + np.arange(w)) / max(s.width - 1, 1)
        y = (frame.offset_y + np.arange(h)) / max(s.height - 1, 1)
        base = 0.1 + 0.5 * x[None, :] + 0.2 * y[:, None]
        scale = (frame.exposure_us / 10000.0) * 10 ** (frame.gain_db / 20.0)
        rng = np.random.default_rng([int(s.seed) & 0xFFFFFFFF, frame.frame_id])
        img = base * scale + rng.normal(0.0, 0.01, (h, w))
        maxval = 2 ** _PIXEL_FORMATS[frame.pixel_format].bits - 1
        if s.color_filter != "None":  # a warm-tinted scene: the channels differ
            img = img[..., None] * np.array([1.0, 0.7, 0.4])
        return np.clip(img * maxval, 0, maxval)

    # ----- image delivery --------------------------------------------------
    def _get_next_image(self, timeout):
        if isinstance(timeout, bool) or not isinstance(timeout, int):
            raise TypeError("in method 'CameraBase_GetNextImage', argument 2 of type 'uint64_t'")
        if timeout < 0 or timeout > EVENT_TIMEOUT_INFINITE:
            raise OverflowError("in method 'CameraBase_GetNextImage', argument 2 of type 'uint64_t'")
        with _cv:
            if not self.initialized:
                raise SpinnakerException("Camera is not initialized.", SPINNAKER_ERR_NOT_INITIALIZED)
            if not self.streaming:
                raise SpinnakerException("Camera is not started.", SPINNAKER_ERR_NOT_INITIALIZED)
            now = _clock()
            infinite = timeout == EVENT_TIMEOUT_INFINITE
            guard = self._control.infinite_timeout_guard_s
            deadline = now + (guard if infinite else timeout / 1000.0)
            if self.disconnect_at_frame is not None and self.frames_handed >= self.disconnect_at_frame:
                self._log("GetNextImage", "camera disconnected (fault at frame %d)" % self.frames_handed)
                self.disconnect()
                while True:  # like a real unplug: the wait just times out
                    left = deadline - _clock()
                    if left <= 0:
                        break
                    _cv.wait(left)
                if infinite:
                    raise FakePySpinHang(
                        "fake PySpin: GetNextImage(EVENT_TIMEOUT_INFINITE) on an unplugged camera; "
                        "a real camera would block forever here")
                raise _timeout_error()
            while True:
                now = _clock()
                if not self.connected:
                    raise _removed_error()
                if not self.streaming:
                    raise SpinnakerException("Camera is not started.", SPINNAKER_ERR_NOT_INITIALIZED)
                self._advance(now)
                stalled = (self.timeout_from_frame is not None
                           and self.frames_handed >= self.timeout_from_frame)
                if self._queue and not stalled:
                    return self._deliver()
                if now >= deadline:
                    self._log("GetNextImage", "timeout")
                    if infinite:
                        raise FakePySpinHang(
                            "fake PySpin: GetNextImage(EVENT_TIMEOUT_INFINITE) got no image in %g s; "
                            "a real camera would block forever here" % guard)
                    raise _timeout_error()
                wake = deadline
                nr = None if stalled else self._next_ready_time()
                if nr is not None:
                    wake = min(wake, nr)
                _cv.wait(max(0.0, wake - now) + 1e-4)

    def _deliver(self):
        buf = self._queue.pop() if self._handling() == "NewestFirst" else self._queue.popleft()
        slot = self.frames_handed
        self.frames_handed += 1
        frame = buf.frame
        if slot in self.error_at_frames:
            buf.state, buf.frame = "free", None
            self._free.append(buf)
            self.frames_errored += 1
            self._log("GetNextImage", "error (fault at frame %d)" % slot)
            raise SpinnakerException(
                "Failed to retrieve the next image from the stream (fake fault injected at frame %d)." % slot,
                self.error_code)
        if not buf.rendered:
            np.copyto(buf.array, self._render(frame))
            buf.rendered = True
        incomplete = slot in self.incomplete_at_frames
        if incomplete:
            buf.array[buf.array.shape[0] // 2:, :] = 0
        buf.state = "user"
        img = ImagePtr(self, buf, frame, slot, incomplete, self._generation)
        self.frames_delivered += 1
        self.delivered.append(dict(index=slot, frame_id=frame.frame_id,
                                   exposure_started=frame.exposure_start,
                                   exposure_us=frame.exposure_us, gain_db=frame.gain_db,
                                   pixel_format=frame.pixel_format,
                                   incomplete=incomplete, triggered=frame.triggered,
                                   delivered_at=_clock()))
        self._log("GetNextImage", "frame %d" % slot)
        return img

    def _release(self, img):
        with _cv:
            if img._released:
                raise SpinnakerException("Image has already been released.", SPINNAKER_ERR_INVALID_BUFFER)
            img._released = True
            self.last_release_times.append(_clock())
            self._log("Release", "frame %d" % img._index)
            buf = img._buffer
            if img._generation != self._generation or buf.state != "user":
                return  # acquisition ended since: nothing to give back
            if self._control.scribble_released_buffers:
                buf.array.fill(_SCRIBBLE[img._frame.pixel_format])
            buf.state, buf.frame, buf.rendered = "free", None, False
            self._free.append(buf)
            _cv.notify_all()


def _convert_pixels(arr, pixel_format):
    """Sensor values at the format's significant bits, one uint8/uint16 per pixel (unpacked)."""
    bits = _PIXEL_FORMATS[pixel_format].bits
    dtype = np.uint8 if bits <= 8 else np.uint16
    if arr.dtype == np.uint8:
        return arr.astype(dtype) << (bits - 8) if bits > 8 else arr
    if arr.dtype == np.uint16:
        return (arr >> (16 - bits)).astype(dtype) if bits < 16 else arr
    if arr.dtype.kind == "f":
        arr = np.rint(arr)
    return np.clip(arr, 0, 2 ** bits - 1).astype(dtype)


def _pack(pixels, fmt):
    """The bytes a packed format puts on the wire; unpacked formats pass through.

    "p" (PFNC, e.g. Mono12p, Mono10p): an lsb-first bit stream, 2 pixels in 3 bytes at 12 bits,
    4 in 5 at 10.  "gige" (GigE Vision Mono12Packed): byte 0 = pixel 0 bits 11..4, byte 1 = pixel
    1 bits 3..0 << 4 | pixel 0 bits 3..0, byte 2 = pixel 1 bits 11..4."""
    if not fmt.packing:
        return pixels
    h, w = pixels.shape
    v = pixels.astype(np.uint64)
    if fmt.packing == "gige":
        p0, p1 = v[:, 0::2], v[:, 1::2]
        out = np.stack([p0 >> 4, ((p1 & 0xF) << 4) | (p0 & 0xF), p1 >> 4], axis=-1)
        return out.astype(np.uint8).reshape(h, w * 3 // 2)
    n = 8 // math.gcd(fmt.bits, 8)  # pixels per whole number of bytes
    nbytes = n * fmt.bits // 8
    groups = v.reshape(h, w // n, n)
    word = sum(groups[..., k] << np.uint64(k * fmt.bits) for k in range(n))
    out = np.stack([(word >> np.uint64(8 * b)) & np.uint64(0xFF) for b in range(nbytes)], axis=-1)
    return out.astype(np.uint8).reshape(h, w // n * nbytes)


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------

class ChunkData:
    def __init__(self, frame):
        self._f = frame

    def GetFrameID(self):
        return self._f.frame_id

    def GetTimestamp(self):
        return int(self._f.exposure_start * 1e9)

    def GetExposureTime(self):
        return self._f.exposure_us

    def GetGain(self):
        return self._f.gain_db

    def GetWidth(self):
        return self._f.width

    def GetHeight(self):
        return self._f.height

    def GetOffsetX(self):
        return self._f.offset_x

    def GetOffsetY(self):
        return self._f.offset_y


class ImagePtr:
    """An image from GetNextImage().  Fake-only attributes:
    ``fake_exposure_started_s`` (host monotonic exposure start), ``fake_index``
    (the frame index used by fault injection), ``fake_serial``."""

    def __init__(self, dev, buf, frame, index, incomplete, generation):
        self._dev = dev
        self._buffer = buf
        self._frame = frame
        self._index = index
        self._incomplete = incomplete
        self._generation = generation
        self._released = False
        self.fake_exposure_started_s = frame.exposure_start
        self.fake_index = index
        self.fake_serial = dev.serial

    def __del__(self):
        try:
            if not self._released and self._dev._control.release_on_gc:
                self._dev._release(self)
        except Exception:
            pass

    def _check_live(self, func):
        if self._released:
            raise SpinnakerException("Image has been released; %s() is not allowed (fake PySpin)." % func,
                                     SPINNAKER_ERR_INVALID_BUFFER)

    def GetNDArray(self):
        self._check_live("GetNDArray")
        return self._buffer.array.view()

    def GetData(self):
        self._check_live("GetData")
        return self._buffer.array.reshape(-1).view()

    def Release(self):
        self._dev._release(self)

    def IsIncomplete(self):
        return self._incomplete

    def GetImageStatus(self):
        return IMAGE_DATA_INCOMPLETE if self._incomplete else IMAGE_NO_ERROR

    @staticmethod
    def GetImageStatusDescription(status):
        return _IMAGE_STATUS_TEXT.get(status, "Unknown image status.")

    def IsInUse(self):
        return not self._released

    def GetTimeStamp(self):
        return int(self._frame.exposure_start * 1e9)

    def GetFrameID(self):
        return self._frame.frame_id

    def GetID(self):
        return self._index

    def GetWidth(self):
        return self._frame.width

    def GetHeight(self):
        return self._frame.height

    def GetXOffset(self):
        return self._frame.offset_x

    def GetYOffset(self):
        return self._frame.offset_y

    def GetXPadding(self):
        return 0

    def GetYPadding(self):
        return 0

    def GetStride(self):
        fmt = _PIXEL_FORMATS[self._frame.pixel_format]
        return fmt.row_items(self._frame.width) * np.dtype(fmt.dtype).itemsize

    def GetBitsPerPixel(self):
        fmt = _PIXEL_FORMATS[self._frame.pixel_format]
        return fmt.bits if fmt.packing else 8 * np.dtype(fmt.dtype).itemsize

    def GetBufferSize(self):
        return self._frame.height * self.GetStride()

    GetImageSize = GetBufferSize

    def GetPixelFormat(self):
        return _ENUM_ENTRIES["PixelFormat"].index(self._frame.pixel_format)

    def GetPixelFormatName(self):
        return self._frame.pixel_format

    def GetChunkData(self):
        return ChunkData(self._frame)

    def HasCRC(self):
        return False

    def CheckCRC(self):
        return True

    def Convert(self, *args, **kwargs):
        raise SpinnakerException("Image conversion is not implemented in fake PySpin.",
                                 SPINNAKER_ERR_NOT_IMPLEMENTED)

    def __repr__(self):
        return "<fake PySpin ImagePtr frame %d of %s%s>" % (
            self._index, self._dev.serial, " released" if self._released else "")


Image = ImagePtr


def Image_GetImageStatusDescription(status):
    return ImagePtr.GetImageStatusDescription(status)


# ---------------------------------------------------------------------------
# Camera, camera list, system
# ---------------------------------------------------------------------------

class _QuickSpinNodes:
    def __init__(self, nodemap):
        self._nodemap = nodemap

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        node = self._nodemap.GetNode(name)
        if node is None:
            raise AttributeError(name)
        return _typed_ptr(node, quickspin=True)


def _typed_ptr(node, quickspin=False):
    cls = {intfIFloat: CFloatPtr, intfIInteger: CIntegerPtr, intfIBoolean: CBooleanPtr,
           intfIString: CStringPtr, intfICommand: CCommandPtr,
           intfIEnumeration: _QuickSpinEnum if quickspin else CEnumerationPtr,
           intfICategory: CCategoryPtr, intfIEnumEntry: CEnumEntryPtr}[node._intf]
    return cls(node)


_live_camera_ptrs: "weakref.WeakSet" = weakref.WeakSet()


class CameraPtr:
    """A camera handle (CameraList.GetByIndex/GetBySerial).  QuickSpin-style
    node attributes work too: ``cam.ExposureTime.GetValue()``,
    ``cam.TLDevice.DeviceSerialNumber``, ``cam.TLStream.StreamBufferHandlingMode``."""

    def __init__(self, dev: Optional[FakeCamera], missing: str = ""):
        self._dev = dev
        self._epoch = dev.epoch if dev is not None else -1
        self._missing = missing
        if dev is not None:
            _live_camera_ptrs.add(self)

    def _d(self, allow_removed=False) -> FakeCamera:
        d = self._dev
        if d is None:
            raise SpinnakerException("Invalid camera pointer (no camera%s)." % self._missing,
                                     SPINNAKER_ERR_INVALID_HANDLE)
        if not allow_removed and (not d.connected or d.epoch != self._epoch):
            raise _removed_error()
        return d

    def _alive(self):
        d = self._dev
        return d is not None and d.connected and d.epoch == self._epoch

    # -- lifecycle
    def Init(self):
        # Spinnaker's CameraBase::Init "connects to camera with read and write access" and DeInit
        # "resets camera back to read access" (Spinnaker C++ API reference): write access is
        # exclusive, so a camera initialised through a handle that was never DeInit()ed (a run
        # that dropped its handle, e.g. simple_pyspin's close(), which only deletes it) cannot
        # be initialised again.  The fake refuses that in every case, in the same process too,
        # with -1004 (SPINNAKER_ERR_RESOURCE_IN_USE), the code Spinnaker gives for "something
        # still holds the camera": stricter than a real SDK may be within one process.
        with _lock:
            d = self._d()
            if d.initialized:
                owner = d.init_owner() if d.init_owner is not None else None
                if owner is self:
                    return
                d._log("Init", "refused: still initialised through another handle")
                raise SpinnakerException(
                    "Unable to initialize the camera: it is still initialized through another camera handle "
                    "that was never de-initialized (call DeInit() before releasing it).",
                    SPINNAKER_ERR_RESOURCE_IN_USE)
            d.initialized = True
            d.init_owner = weakref.ref(self)
            d._log("Init")

    def DeInit(self):
        with _lock:
            d = self._d()
            if d.streaming:
                raise SpinnakerException("Can't de-initialize camera. Camera is still streaming.",
                                         SPINNAKER_ERR_RESOURCE_IN_USE)
            d.initialized = False
            d.init_owner = None
            d._log("DeInit")

    def IsInitialized(self):
        with _lock:
            return self._alive() and self._dev.initialized

    def IsValid(self):
        with _lock:
            return self._alive()

    def IsStreaming(self):
        with _lock:
            return self._alive() and self._dev.streaming

    def GetUniqueID(self):
        return "USB\\VID_1E10&PID_3300\\%s" % self._d().serial

    def GetDeviceID(self):
        return self._d().serial

    # -- node maps
    def GetNodeMap(self):
        with _lock:
            d = self._d()
            if not d.initialized:
                raise SpinnakerException("Camera is not initialized.", SPINNAKER_ERR_NOT_INITIALIZED)
            d._refresh_derived()
            return d._nodemap

    def GetTLDeviceNodeMap(self):
        return self._d()._tl_device_nodemap

    def GetTLStreamNodeMap(self):
        return self._d()._tl_stream_nodemap

    @property
    def TLDevice(self):
        return _QuickSpinNodes(self.GetTLDeviceNodeMap())

    @property
    def TLStream(self):
        return _QuickSpinNodes(self.GetTLStreamNodeMap())

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        d = self.__dict__.get("_dev")
        node = d._nodemap.GetNode(name) if d is not None else None
        if node is None or node._intf in (intfICategory, intfIEnumEntry):
            raise AttributeError("'CameraPtr' object has no attribute %r" % name)
        return _typed_ptr(node, quickspin=True)

    # -- acquisition
    def BeginAcquisition(self):
        with _cv:
            d = self._d()
            if not d.initialized:
                raise SpinnakerException("Camera is not initialized.", SPINNAKER_ERR_NOT_INITIALIZED)
            if d.streaming:
                raise SpinnakerException("Camera is already streaming.", SPINNAKER_ERR_RESOURCE_IN_USE)
            d._begin()

    def EndAcquisition(self):
        with _cv:
            d = self._d()
            if not d.streaming:
                raise SpinnakerException("Camera is not started.", SPINNAKER_ERR_NOT_INITIALIZED)
            d._end()

    def GetNextImage(self, grabTimeout=EVENT_TIMEOUT_INFINITE, streamID=0):
        with _lock:
            d = self._d()
        return d._get_next_image(grabTimeout)

    def GetNumImagesInUse(self):
        return self._d().buffers_in_use()

    def GetNumDataStreams(self):
        self._d()
        return 1

    def __repr__(self):
        d = self._dev
        return "<fake PySpin CameraPtr %s>" % (d.serial if d is not None else "NULL")


class CameraList:
    def __init__(self, ptrs: Iterable[CameraPtr] = ()):
        self._ptrs = list(ptrs)

    def GetSize(self):
        return len(self._ptrs)

    def GetByIndex(self, index):
        if not isinstance(index, int) or not 0 <= index < len(self._ptrs):
            raise SpinnakerException("Invalid camera index %r (list holds %d cameras)."
                                     % (index, len(self._ptrs)), SPINNAKER_ERR_INVALID_PARAMETER)
        return self._ptrs[index]

    def GetBySerial(self, serialNumber):
        for p in self._ptrs:
            if p._dev is not None and p._dev.serial == str(serialNumber):
                return p
        return CameraPtr(None, missing=" with serial %r" % (serialNumber,))

    def GetByDeviceID(self, deviceID):
        return self.GetBySerial(deviceID)

    def RemoveByIndex(self, index):
        self.GetByIndex(index)
        del self._ptrs[index]

    def RemoveBySerial(self, serialNumber):
        self._ptrs = [p for p in self._ptrs if p._dev is None or p._dev.serial != str(serialNumber)]

    def Append(self, other):
        self._ptrs.extend(other._ptrs)

    def Clear(self):
        self._ptrs = []

    def __len__(self):
        return len(self._ptrs)

    def __getitem__(self, index):
        return self.GetByIndex(index)

    def __iter__(self):
        return iter(list(self._ptrs))


class LibraryVersion:
    major, minor, type, build = 4, 0, 0, 0


class System:
    """Singleton: System.GetInstance() / ReleaseInstance().  The camera list is
    read from the fake's current configuration on every GetCameras() call, so a
    System object survives ``fake.reset()``."""

    _instance = None
    _refcount = 0

    def __init__(self):
        self._released = False

    @staticmethod
    def GetInstance():
        with _lock:
            if System._instance is None:
                System._instance = System()
            System._refcount += 1
            return System._instance

    def _check(self):
        if self._released:
            raise SpinnakerException("System has been released.", SPINNAKER_ERR_INVALID_HANDLE)

    def GetCameras(self, updateInterfaces=True, updateCameras=True):
        with _lock:
            self._check()
            return CameraList(CameraPtr(d) for d in fake.cameras if d.connected)

    def UpdateCameras(self, updateInterfaces=True):
        self._check()
        return False

    def IsInUse(self):
        with _lock:
            return any(d.initialized for d in fake.cameras)

    def GetLibraryVersion(self):
        return LibraryVersion()

    def ReleaseInstance(self):
        with _lock:
            self._check()
            System._refcount -= 1
            if System._refcount > 0:
                return
            if any(p._alive() for p in list(_live_camera_ptrs)):
                System._refcount += 1
                raise SpinnakerException(
                    "Can't clear a camera because something still holds a reference to the camera",
                    SPINNAKER_ERR_RESOURCE_IN_USE)
            self._released = True
            System._instance = None
            System._refcount = 0


# ---------------------------------------------------------------------------
# Test-facing control object
# ---------------------------------------------------------------------------

_DEFAULT = object()


class _FakeControl:
    """``PySpin.fake``: configure the simulated cameras, inject faults, inspect."""

    FakeCameraSpec = FakeCameraSpec
    FakeCamera = FakeCamera
    FakePySpinHang = FakePySpinHang

    def __init__(self):
        self._cameras: list = []
        self.log: list = []
        self.infinite_timeout_guard_s = 10.0
        self.scribble_released_buffers = True
        self.release_on_gc = False

    def reset(self, cameras=_DEFAULT, *, timeout_from_frame=None, error_at_frame=None,
              incomplete_at_frame=None, disconnect_at_frame=None, error_code=SPINNAKER_ERR_IO,
              infinite_timeout_guard_s=10.0, scribble_released_buffers=True,
              release_on_gc=False):
        """Replace all cameras and settings.

        cameras: list of FakeCameraSpec or dicts of its fields; omitted -> one
            default camera; [] -> no cameras.
        timeout_from_frame=N: frames 0..N-1 are delivered, then GetNextImage
            never gets another image (raises SpinnakerException -1011 after
            its timeout; immediately with EVENT_TIMEOUT_NONE).
        error_at_frame=N or [N, ...]: the GetNextImage that would return frame
            N raises SpinnakerException(error_code) at once and that frame is
            lost; the next call returns frame N+1.
        incomplete_at_frame=N or [...]: frame N comes back with
            IsIncomplete() True, GetImageStatus() IMAGE_DATA_INCOMPLETE and its
            bottom half zeroed.
        disconnect_at_frame=N: once N frames were handed out, the next
            GetNextImage finds the camera unplugged: it waits its timeout and
            raises -1011 (as a real unplug does); from then on every CameraPtr
            call raises -1002 ("Camera has been removed ...") and the camera
            is gone from GetCameras().
        These apply to every camera whose spec does not set its own value.
        """
        with _cv:
            for d in self._cameras:
                d.connected = False  # old handles die
            _cv.notify_all()
            self.infinite_timeout_guard_s = float(infinite_timeout_guard_s)
            self.scribble_released_buffers = bool(scribble_released_buffers)
            self.release_on_gc = bool(release_on_gc)
            self.log = []
            defaults = dict(timeout_from_frame=timeout_from_frame, error_at_frame=error_at_frame,
                            incomplete_at_frame=incomplete_at_frame,
                            disconnect_at_frame=disconnect_at_frame, error_code=int(error_code))
            if cameras is _DEFAULT:
                cameras = [FakeCameraSpec()]
            specs = []
            for c in cameras:
                if isinstance(c, dict):
                    unknown = set(c) - {f.name for f in dataclasses.fields(FakeCameraSpec)}
                    if unknown:
                        raise ValueError("fake PySpin: unknown camera option(s) %s" % sorted(unknown))
                    c = FakeCameraSpec(**c)
                elif not isinstance(c, FakeCameraSpec):
                    raise TypeError("fake PySpin: cameras must be FakeCameraSpec or dict, got %r" % (c,))
                specs.append(c)
            serials = [str(s.serial) for s in specs]
            if len(set(serials)) != len(serials):
                raise ValueError("fake PySpin: duplicate camera serials %s" % serials)
            self._cameras = [FakeCamera(self, s, defaults) for s in specs]
            System._instance = None
            System._refcount = 0
        return self

    def configure(self, config):
        """Apply a dict (or JSON text) with the keys of reset(); "cameras" is a
        list of dicts of FakeCameraSpec fields."""
        if isinstance(config, (str, bytes)):
            config = json.loads(config)
        if not isinstance(config, dict):
            raise TypeError("fake PySpin: config must be a JSON object")
        config = dict(config)
        cameras = config.pop("cameras", _DEFAULT)
        allowed = set(inspect.signature(self.reset).parameters) - {"cameras"}
        unknown = set(config) - allowed
        if unknown:
            raise ValueError("fake PySpin: unknown config key(s) %s" % sorted(unknown))
        return self.reset(cameras, **config)

    # -- inspection
    @property
    def cameras(self) -> list:
        return list(self._cameras)

    def camera(self, key=0) -> FakeCamera:
        """The simulated camera by index (int) or serial (str)."""
        if isinstance(key, int):
            return self._cameras[key]
        for d in self._cameras:
            if d.serial == str(key):
                return d
        raise KeyError(key)

    @property
    def frames_delivered(self):
        return sum(d.frames_delivered for d in self._cameras)

    def buffers_in_use(self):
        return sum(d.buffers_in_use() for d in self._cameras)

    @property
    def acquisitions_started(self):
        return sum(d.acquisitions_started for d in self._cameras)

    @property
    def triggers(self):
        return sum(d.triggers for d in self._cameras)

    @property
    def last_release_times(self):
        return sorted(t for d in self._cameras for t in d.last_release_times)

    def events(self, event=None, serial=None):
        """The call log: list of (time, serial, event, detail), filtered."""
        return [e for e in self.log
                if (event is None or e[2] == event) and (serial is None or e[1] == str(serial))]

    def _log_event(self, serial, event, detail):
        self.log.append((_clock(), serial, event, detail))


fake = _FakeControl()
fake.reset()

_env_config = os.environ.get("FAKE_PYSPIN_CONFIG", "").strip()
if _env_config:
    if not _env_config.startswith("{"):
        with open(_env_config, encoding="utf-8") as _fh:
            _env_config = _fh.read()
    try:
        fake.configure(json.loads(_env_config))
    except (ValueError, TypeError) as _exc:
        raise ImportError("fake PySpin: bad FAKE_PYSPIN_CONFIG: %s" % _exc) from _exc
del _env_config
