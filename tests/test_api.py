"""The Python API (issue 13): focus(), simulated_microscope(), ZaberStage.from_axis, custom cameras.

The README's examples are extracted from README.md and executed, so the documented code is the
tested code: on the simulator, through the REAL ZML against tests/fake_zaber.py, and with a
custom camera class.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import autofocus
from conftest import ROOT, small_sim
from fake_zaber import DeviceConfig, FakeZaber, Faults

NM = 1_000_000  # the fake's native unit is 1 nm


def readme_block(marker: str) -> str:
    """The one ```python block of README.md that contains ``marker``."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"{len(found)} README python blocks contain {marker!r}"
    return found[0]


def substitute(code: str, *pairs: tuple[str, str]) -> str:
    """Replace each text, which must be there (so that a README edit cannot silently skip it)."""
    for old, new in pairs:
        assert old in code, old
        code = code.replace(old, new)
    return code


class RenderAtStage:
    """A simulated camera that renders what the optics would show at any stage's position."""

    def __init__(self, stage: autofocus.Stage, focus_mm: float) -> None:
        optics = autofocus.SimOptics(focus_mm=focus_mm, width=320, height=200)
        self.sim = autofocus.SimCamera(stage, optics, autofocus.SimTiming(scale=0.0))
        self.closed = False

    def capture(self) -> np.ndarray:
        return self.sim.capture()

    def close(self) -> None:
        self.closed = True


# --- the README's example ------------------------------------------------------------------------

def test_readme_api_example_runs_on_the_simulator(capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, Any] = {}
    exec(readme_block("def refocus"), namespace)  # noqa: S102 - the README's own code
    assert capsys.readouterr().out == "in focus at 12.340 mm\n"  # what the README says it prints
    stage = namespace["stage"]
    assert abs(stage.position_mm() - 12.34) < 0.01  # the stage was left at the focus


@pytest.fixture
def fake() -> Iterator[FakeZaber]:
    with FakeZaber(devices=[DeviceConfig(homed=True, position=round(12.3 * NM))]) as f:
        yield f


def test_readme_api_example_through_the_real_zml_on_a_callers_connection(fake: FakeZaber) -> None:
    from zaber_motion import Units
    from zaber_motion.ascii import Connection

    namespace: dict[str, Any] = {}
    exec(readme_block("def refocus"), namespace)  # noqa: S102 - defines refocus (and runs the sim part)
    refocus = namespace["refocus"]
    connection = Connection.open_tcp("127.0.0.1", fake.port)  # the test's own connection
    try:
        axis = connection.get_device(3).get_axis(1)
        stage = autofocus.ZaberStage.from_axis(axis, native_unit_nm=1)  # the fake is offline: no device database
        camera = RenderAtStage(stage, focus_mm=12.34)
        first = refocus(stage, camera)
        assert abs(first - 12.34) <= 0.02 and fake.position() == round(first * NM)
        targets = fake.move_targets()
        # Relative: 12.3 +- 0.2 mm every 0.02 mm, then the final move to the focus.
        assert targets[:-1] == [round(z * NM) for z in autofocus.plan_positions(12.1, 12.5, 0.02)]
        # The script moves the axis itself (as a tiling loop would), then focuses again on the same axis.
        axis.move_absolute(12.25 * NM, Units.NATIVE)
        second = refocus(stage, camera)
        assert abs(second - 12.34) <= 0.02
        assert fake.move_targets()[len(targets) + 1:-1] == [round(z * NM) for z in
                                                            autofocus.plan_positions(12.05, 12.45, 0.02)]
        stage.close()  # a stage over the caller's axis never closes the caller's connection
        assert axis.get_position(Units.NATIVE) == round(second * NM)  # still open and usable
        assert connection.get_device(3).get_axis(1).is_busy() is False
    finally:
        connection.close()


def test_readme_hardware_block_runs_against_the_fake(fake: FakeZaber, capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, Any] = {}
    exec(readme_block("def refocus"), namespace)  # noqa: S102
    capsys.readouterr()
    cameras: list[RenderAtStage] = []

    def make_camera(stage: autofocus.Stage) -> RenderAtStage:
        cameras.append(RenderAtStage(stage, focus_mm=12.36))
        return cameras[-1]

    namespace["make_camera"] = make_camera
    code = substitute(readme_block("from_axis(axis)"),
                      ('Connection.open_serial_port("COM3")', f'Connection.open_tcp("127.0.0.1", {fake.port})'),
                      ("from_axis(axis)", "from_axis(axis, native_unit_nm=1)"),
                      ("autofocus.FlirCamera()", "make_camera(stage)"))
    exec(code, namespace)  # noqa: S102
    printed = float(capsys.readouterr().out)
    assert abs(printed - 12.36) <= 0.02 and fake.position() == round(printed * NM)
    assert cameras[0].closed  # the block's finally: ran


# --- faults inside focus() ---------------------------------------------------------------------------

def test_stage_fault_raises_the_tools_exception_with_the_partial_curve(fake: FakeZaber) -> None:
    from zaber_motion.ascii import Connection

    fake.inject(reject_move=6)
    with Connection.open_tcp("127.0.0.1", fake.port) as connection:
        stage = autofocus.ZaberStage.from_axis(connection.get_device(3).get_axis(1), native_unit_nm=1)
        with pytest.raises(autofocus.StageError, match="rejected the move to 12.2000 mm") as caught:
            autofocus.focus(stage, RenderAtStage(stage, 12.34), 12.1, 12.5, 0.02)
        partial = caught.value.partial
        assert isinstance(partial, autofocus.FocusResult) and partial.frames == 5
        assert [s.z_mm for s in partial.samples] == autofocus.plan_positions(12.1, 12.5, 0.02)[:5]
        # A rejected move is an event the tool did not cause: nothing more moves (issue 18).
        assert caught.value.stage_state == "nothing more was moved; the stage is at 12.1800 mm"
        assert fake.position() == round(12.18 * NM) and "stop" not in fake.commands()
        assert connection.get_device(3).get_axis(1).get_position() is not None  # still usable


class FailingCamera:
    """Delivers ``good`` frames, then raises a vendor error (not one of the tool's)."""

    def __init__(self, stage: autofocus.Stage, good: int, error: BaseException) -> None:
        self.inner, self.good, self.error = RenderAtStage(stage, 12.34), good, error

    def capture(self) -> np.ndarray:
        if self.good == 0:
            raise self.error
        self.good -= 1
        return self.inner.capture()


@pytest.mark.parametrize("error", [autofocus.CameraError("camera unplugged"), KeyboardInterrupt(),
                                   RuntimeError("vendor SDK error")])
def test_any_fault_leaves_the_stage_at_its_start_with_the_partial_curve(error: BaseException) -> None:
    stage, _ = small_sim(start_mm=12.3)
    with pytest.raises((type(error), autofocus.RunFailed)) as caught:  # `except KeyboardInterrupt` still works
        autofocus.focus(stage, FailingCamera(stage, 8, error), 12.0, 12.6, 0.02, search="fast")  # 1 look + 7
    # the tool's own exception: the original itself, or carrying it as its cause
    assert isinstance(caught.value, (autofocus.AutofocusError, autofocus.Interrupted))
    if isinstance(error, autofocus.AutofocusError):
        assert caught.value is error
    else:  # nothing set on an exception that is not the tool's
        assert caught.value.__cause__ is error and not hasattr(error, "stage_state")
    assert caught.value.partial.frames == 7 and caught.value.partial.verdict.reason == "run did not finish"
    assert caught.value.stage_state == "stage returned to its start, 12.3000 mm"
    assert stage.position_mm() == 12.3


class StopRaises(autofocus.SimStage):
    """A user's own Stage whose stop() raises its own exception (not one of the tool's)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(position_mm=12.3, timing=autofocus.SimTiming(scale=0.0))
        self.error, self.targets = error, []

    def move_to(self, z_mm: float) -> None:
        self.targets.append(z_mm)
        super().move_to(z_mm)

    def stop(self) -> None:
        raise self.error


@pytest.mark.parametrize("stop_error", [RuntimeError("serial write failed"), autofocus.CameraError("odd")])
def test_a_custom_stop_that_raises_does_not_end_the_clean_up(stop_error: BaseException) -> None:
    # Issue 19's item in make_safe: the camera's fault is what is raised, and the return is still tried.
    stage = StopRaises(stop_error)
    fault = autofocus.CameraError("camera unplugged")
    with pytest.raises(autofocus.CameraError, match="camera unplugged") as caught:
        autofocus.focus(stage, FailingCamera(stage, 5, fault), 12.0, 12.6, 0.02)  # the look before moving + 4
    assert caught.value is fault and caught.value.partial.frames == 4
    assert caught.value.stage_state == (f"stopping it failed ({stop_error}); stage returned to its start, 12.3000 mm")
    assert stage.targets[-1] == 12.3 and stage.position_mm() == 12.3


# --- a custom camera (the README's example) ---------------------------------------------------------

class FakeVideoCapture:
    """cv2.VideoCapture's grab/read, showing the simulated optics at the stage's position."""

    stage: autofocus.Stage
    fail_after: int | None = None

    def __init__(self, index: int) -> None:
        self.index, self.grabs, self.reads = index, 0, 0
        self.render = RenderAtStage(self.stage, 12.34)
        FakeVideoCapture.last = self  # type: ignore[attr-defined]

    def grab(self) -> bool:
        self.grabs += 1
        return True

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self.fail_after is not None and self.reads >= self.fail_after:
            return False, None
        self.reads += 1
        gray = self.render.capture()
        return True, np.dstack([gray, gray, gray])  # OpenCV delivers BGR


def test_readme_custom_camera_example(monkeypatch: pytest.MonkeyPatch) -> None:
    import cv2

    stage, _ = small_sim(start_mm=12.3)
    monkeypatch.setattr(FakeVideoCapture, "stage", stage, raising=False)
    monkeypatch.setattr(cv2, "VideoCapture", FakeVideoCapture)
    namespace: dict[str, Any] = {}
    exec(readme_block("class UsbCamera"), namespace)  # noqa: S102
    camera = namespace["UsbCamera"](0)
    result = autofocus.focus(stage, camera, 12.0, 12.6, 0.02)
    assert result.verdict.kind == "focused" and abs(result.best_mm - 12.34) <= 0.02
    cap = FakeVideoCapture.last  # type: ignore[attr-defined]
    looks = 1  # the frame focus() captures before the first move (check_camera)
    assert cap.reads == result.frames + looks and cap.grabs == 2 * cap.reads  # stale frames dropped first
    # Its error is the tool's CameraError: the run stops with the stage back at its start.
    monkeypatch.setattr(FakeVideoCapture, "fail_after", 3 + looks)
    camera = namespace["UsbCamera"](0)
    with pytest.raises(autofocus.CameraError, match="no frame from the USB camera") as caught:
        autofocus.focus(stage, camera, 12.0, 12.6, 0.02)
    assert caught.value.partial.frames == 3 and stage.position_mm() == pytest.approx(result.best_mm)


# --- requests refused before anything moves ----------------------------------------------------------

class CountingStage(autofocus.SimStage):
    def __init__(self) -> None:
        super().__init__(position_mm=12.3, timing=autofocus.SimTiming(scale=0.0))
        self.moves = 0

    def move_to(self, z_mm: float) -> None:
        self.moves += 1
        super().move_to(z_mm)


@pytest.mark.parametrize("args, keywords, message", [
    ((12, 13, 0), {}, "step_mm: 0 is out of range: must be from 1e-06 to 2000 mm"),
    ((float("nan"), 13, 0.1), {}, "start_mm: nan is not a finite number"),
    ((12, "13", 0.1), {}, "end_mm: '13' is not a number"),
    ((12, 12, 0.1), {}, "start_mm equals end_mm"),
    ((0, 25, 1e-3), {}, "confirm with allow_many"),
    ((0, 25, 1e-6), {"allow_many": True}, "more than 1,000,000, even with allow_many"),
    ((12, 13, 5e-324), {}, "step_mm: 5e-324 is out of range: must be from 1e-06"),
    ((1e300, 13, 0.1), {}, "start_mm: 1e+300 is out of range: must be from -1000 to 1000 mm"),
    ((12, 13, 0.1), {"settle_ms": 1e308}, "settle_ms: 1e+308 is out of range: must be from 0 to 60000 ms"),
    ((12, 13, 0.1), {"search": "quick"}, "search: 'quick' is unknown; choose one of sweep, fast"),
    ((12, 13, 0.1), {"metric": "sobel"}, "metric: 'sobel' is unknown"),
    ((12, 13, 0.1), {"blur": 4}, "blur: 4 must be odd, from 3 to 99"),
    ((12, 13, 0.1), {"settle_ms": -1}, "settle_ms: -1 is out of range: must be from 0 to 60000 ms"),
    ((12, 13, 0.1), {"z_min": 13, "z_max": 12}, "z_min 13 must be below z_max 12"),
    ((12, 13, 0.1), {"z_max": 12.5}, "leaves the allowed interval 0..12.5"),
    ((12, 13, 0.1), {"roi": (0, 0, 100)}, "must be (x, y, width, height)"),
    ((12, 13, 0.1), {"roi": (0, 0, 0, 10)}, "must not be empty"),
    ((12, 13, 0.1), {"roi": (0, 0, 7, 10)}, "W and H at least 8 pixels"),
    ((12, 13, 0.1), {"roi": (-1, 0, 50, 50)}, "X and Y must be 0 or more"),
    ((-0.2, 0.2, 0.02), {"relative": True, "z_min": 12.2}, "the range 12.1..12.5 mm leaves"),
])
def test_bad_requests_raise_usage_error_and_never_move(args: tuple, keywords: dict, message: str) -> None:
    stage = CountingStage()
    with pytest.raises(autofocus.UsageError, match=re.escape(message)) as caught:
        autofocus.focus(stage, RenderAtStage(stage, 12.34), *args, **keywords)
    assert stage.moves == 0 and caught.value.partial is None and caught.value.stage_state is None


def test_relative_refuses_an_axis_without_a_reference_position() -> None:
    stage = CountingStage()
    stage.homed = False  # type: ignore[attr-defined]  # as ZaberStage.homed says before homing
    with pytest.raises(autofocus.UsageError, match="no reference position"):
        autofocus.focus(stage, RenderAtStage(stage, 12.34), -0.1, 0.1, 0.02, relative=True)
    assert stage.moves == 0


@pytest.mark.parametrize("home, z_limits, refused", [
    (None, {"z_min": 12.0}, "pass --home"),  # a soft limit: homing needs consent
    (False, {}, "--no-home forbids homing"),  # never home
    (True, {"z_min": 12.0}, None),  # consent given: homes, then focuses
    (None, {}, None),  # no soft limit: homes as the CLI does
])
def test_homing_through_the_api_needs_the_same_consent_as_the_cli(home: bool | None, z_limits: dict,
                                                                  refused: str | None) -> None:
    from zaber_motion.ascii import Connection

    with FakeZaber(devices=[DeviceConfig(homed=False, position=round(12.3 * NM))]) as unhomed:
        connection = Connection.open_tcp("127.0.0.1", unhomed.port)
        try:
            stage = autofocus.ZaberStage.from_axis(connection.get_device(3).get_axis(1), native_unit_nm=1)
            assert stage.homed is False
            camera = RenderAtStage(stage, focus_mm=12.34)
            if refused:
                with pytest.raises(autofocus.UsageError, match=refused):
                    autofocus.focus(stage, camera, 12.2, 12.5, 0.02, home=home, **z_limits)
                assert unhomed.motion_commands() == []  # nothing moved, not even homing
            else:
                result = autofocus.focus(stage, camera, 12.2, 12.5, 0.02, home=home, **z_limits)
                assert unhomed.motion_commands()[0].startswith("home") and stage.homed
                assert result.verdict.kind == "focused" and abs(result.best_mm - 12.34) <= 0.01
        finally:
            connection.close()


def test_from_axis_refuses_a_latched_fault_unless_told_to_clear_it() -> None:
    from zaber_motion.ascii import Connection

    with FakeZaber(devices=[DeviceConfig(homed=True, position=round(12.3 * NM), flags=("FS",))]) as stalled:
        connection = Connection.open_tcp("127.0.0.1", stalled.port)
        try:
            axis = connection.get_device(3).get_axis(1)
            with pytest.raises(autofocus.StageError, match="FS"):
                autofocus.ZaberStage.from_axis(axis, native_unit_nm=1)
            stage = autofocus.ZaberStage.from_axis(axis, native_unit_nm=1, clear_faults=True)
            result = autofocus.focus(stage, RenderAtStage(stage, 12.34), 12.2, 12.5, 0.02)
            assert result.verdict.kind == "focused"
            assert stalled.commands().count("warnings clear") >= 1
        finally:
            connection.close()


def test_focus_keywords_are_the_cli_options() -> None:
    # Every keyword of focus() (but the callback) is an option of the command line, by the same name.
    args = autofocus.build_parser().parse_args(["1", "2", "0.1", "--simulate"])
    assert set(autofocus.focus_keywords(args)) == set(autofocus.focus.__kwdefaults__) - {"on_frame"}


# --- simulated_microscope ---------------------------------------------------------------------------

def test_simulated_microscope_takes_the_simulators_options() -> None:
    stage, camera = autofocus.simulated_microscope(focus_mm=3.0, photons=200, seed=4, width=64, height=48,
                                                   start_mm=2.5, time_scale=0, bit_depth=16, exposure_s=0.5)
    assert stage.position_mm() == 2.5 and stage.limits_mm() == (0.0, 25.0)
    frame = camera.capture()
    assert frame.shape == (48, 64) and frame.dtype == np.uint16
    assert camera.optics.photons == 200 and camera.optics.seed == 4 and camera.timing.exposure_s == 0.5
    assert camera.clock.modeled_s > 0.5 and camera.clock is stage.clock  # one modelled clock, no sleeping
    _, cropped = autofocus.simulated_microscope(width=64, height=48, time_scale=0, camera_roi=(8, 4, 32, 24))
    assert cropped.capture().shape == (24, 32)  # --camera-roi: only that sensor region is read out
    default_stage, default_camera = autofocus.simulated_microscope()
    assert default_camera.timing.scale == 1.0 and default_camera.optics.width == 1920  # the CLI's defaults


@pytest.mark.parametrize("options, message", [
    ({"focus": 12}, "unknown option focus"),
    ({"specimen": "dots"}, "choose one of cells, blank, dusty"),
    ({"width": 4}, "16 to 10000 pixels"),
    ({"seed": -1}, "seed: -1 is out of range: must be from 0 to 4294967295"),
    ({"time_scale": 1e300}, r"time_scale: 1e\+300 is out of range: must be from 0 to 100"),
    ({"photons": 1e308}, r"photons: 1e\+308 is out of range: must be from 0.01 to 1e\+07"),
])
def test_simulated_microscope_rejects_bad_options(options: dict, message: str) -> None:
    with pytest.raises(autofocus.UsageError, match=message):
        autofocus.simulated_microscope(**options)


# --- importing opens nothing ------------------------------------------------------------------------

def test_import_loads_no_hardware_library_and_opens_nothing(tmp_path: Any) -> None:
    # cv2 and numpy are imported first: what they open is theirs; autofocus itself must add nothing.
    probe = (
        "import json, os, sys, threading, cv2, numpy\n"
        "fds = lambda: set(os.listdir('/proc/self/fd')) if os.path.isdir('/proc/self/fd') else set()\n"
        "before = fds()\n"
        "import autofocus\n"
        "heavy = [m for m in ('zaber_motion', 'PySpin', 'simple_pyspin', 'pypylon', 'matplotlib', 'tqdm')"
        " if m in sys.modules]\n"
        "print(json.dumps([heavy, threading.active_count(), sorted(fds() - before)]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    heavy, threads, new_fds = json.loads(proc.stdout)
    assert heavy == [] and threads == 1 and new_fds == [], proc.stdout


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


def test_the_request_defaults_are_focus_defaults() -> None:
    defaults = {f.name: f.default for f in autofocus.dataclasses.fields(autofocus.Request)[3:]}
    assert defaults == {k: v for k, v in autofocus.focus.__kwdefaults__.items() if k != "on_frame"}
    assert autofocus.InterruptSignals.NAMES == autofocus.EARLY_SIGNALS


class DeclaringStage(autofocus.SimStage):
    """A stage that declares StageExtras: no reference position, a 1 um native grid, a run scope."""

    native_unit_mm = 0.001
    axis_name = "my Z drive"

    def __init__(self) -> None:
        super().__init__(position_mm=12.3, timing=autofocus.SimTiming(scale=0.0))
        self.homed, self.homings, self.scopes = False, 0, []

    def home_if_needed(self) -> bool:
        self.homings += 1
        self.homed, self.z = True, 0.0
        return True

    @contextlib.contextmanager
    def run_scope(self, allowed_mm: Any) -> Iterator[None]:
        self.scopes.append(allowed_mm)
        yield
        self.scopes.append("ended")


def test_a_stage_declares_its_extras_and_the_run_uses_them() -> None:
    stage = DeclaringStage()
    with pytest.raises(autofocus.BadValue, match="at least 3 units"):  # its native grid, not Zaber's only
        autofocus.focus(stage, RenderAtStage(stage, 12.34), 12.2, 12.5, 0.0015)
    with pytest.raises(autofocus.UsageError, match="my Z drive has no reference position"):
        autofocus.focus(stage, RenderAtStage(stage, 12.34), 12.2, 12.5, 0.02, z_max=20)  # consent needed
    result = autofocus.focus(stage, RenderAtStage(stage, 12.34), 12.2, 12.5, 0.02, z_max=20, home=True)
    assert stage.homings == 1 and result.verdict.kind == "focused"
    assert stage.scopes[-2:] == [(0.0, 20), "ended"]  # travel and soft limits, for the run only
    autofocus.focus(stage, RenderAtStage(stage, 12.34), 12.2, 12.5, 0.02)
    assert stage.homings == 1  # homed now: never again


def test_a_backend_speaks_in_its_own_terms_not_in_options() -> None:
    from zaber_motion.ascii import Connection

    with FakeZaber() as fake:
        connection = Connection.open_tcp("127.0.0.1", fake.port)
        try:
            with pytest.raises(autofocus.UsageError, match=r"no Zaber device 5 .*device number \(device N\)") as caught:
                autofocus.ZaberStage.from_axis(connection.get_device(5).get_axis(1), native_unit_nm=1)
        finally:
            connection.close()
    assert "--" not in str(caught.value)  # a script has no --device option


def test_the_public_api_is_all_and_documented() -> None:
    import inspect

    missing = [name for name in autofocus.__all__ if not hasattr(autofocus, name)]
    assert not missing and len(set(autofocus.__all__)) == len(autofocus.__all__)
    for name in autofocus.__all__:
        value = getattr(autofocus, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            own = value.__dict__.get("__doc__") if inspect.isclass(value) else value.__doc__
            assert own and own.strip(), f"{name} has no docstring"
        else:  # a Literal type: named in the module docstring's table
            assert re.search(rf"\b{name}\b", autofocus.__doc__ or ""), name
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    api = readme[readme.index("## Python API"):]
    api = api[:api.index("\n## ", 5)]
    used = set(re.findall(r"autofocus\.([A-Za-z_]\w*)", readme)) | set(re.findall(r"`([A-Za-z_]\w*)", api))
    public = {n for n in used if hasattr(autofocus, n) and not n.startswith("_")
              and (inspect.isclass(getattr(autofocus, n)) or inspect.isfunction(getattr(autofocus, n)))}
    assert public - set(autofocus.__all__) == set()  # every name the README's API uses is public
    assert "check_request" not in autofocus.__all__ and "first_line" not in autofocus.__all__
