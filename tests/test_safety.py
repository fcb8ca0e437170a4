"""Safety: no command ever leaves the allowed interval; camera faults leave the stage safe."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import autofocus
from fake_zaber import DeviceConfig, FakeZaber

NM = 1_000_000
TINY_SIM = ["--camera", "sim", "--native-unit-nm", "1", "--sim-time-scale", "0", "--sim-size", "64x48"]


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    travel_mm=st.floats(3, 25),
    start_frac=st.floats(-0.2, 1.2),
    end_frac=st.floats(-0.2, 1.2),
    steps=st.integers(1, 60),
    soft=st.tuples(st.one_of(st.none(), st.floats(-1, 26)), st.one_of(st.none(), st.floats(-1, 26))),
    search=st.sampled_from(["sweep", "fast"]),
    backlash=st.sampled_from([0.0, 0.05, 0.3]),
    position_frac=st.floats(0, 1),
    focus_frac=st.floats(-0.2, 1.2),
)
def test_no_command_ever_leaves_the_allowed_interval(travel_mm: float, start_frac: float, end_frac: float,
                                                     steps: int, soft: tuple, search: str, backlash: float,
                                                     position_frac: float, focus_frac: float) -> None:
    start, end = round(start_frac * travel_mm, 3), round(end_frac * travel_mm, 3)
    assume(abs(end - start) >= 0.01)
    step = round(abs(end - start) / steps, 6)
    assume(step > 0)
    z_min, z_max = soft
    assume(z_min is None or z_max is None or z_min < z_max)
    position = round(position_frac * travel_mm * NM)
    argv = [str(start), str(end), str(step), "", *TINY_SIM, "--search", search, "--backlash-mm", str(backlash),
            "--sim-focus-mm", str(round(focus_frac * travel_mm, 3))]
    argv += ["--z-min", str(z_min)] if z_min is not None else []
    argv += ["--z-max", str(z_max)] if z_max is not None else []
    with FakeZaber(devices=[DeviceConfig(homed=True, limit_max=round(travel_mm * NM), position=position)]) as fake:
        argv[3] = f"tcp://127.0.0.1:{fake.port}"
        code = autofocus.main(argv)
        lo = max(0.0, z_min if z_min is not None else -np.inf)
        hi = min(travel_mm, z_max if z_max is not None else np.inf)
        # Every move the fake received, the ones it rejected included.
        targets = [int(r.text.split()[2]) for r in fake.log if r.text.startswith("move abs")]
        # Nothing outside the limits is ever commanded, not even the return to a start outside them.
        outside = [t for t in targets if not (lo * NM - 1 <= t <= hi * NM + 1)]
        assert outside == [], (argv, outside)
        if code == autofocus.EXIT_USAGE:
            assert fake.motion_commands() == []
        else:
            assert code in (0, 3, 4)
            assert all(r.accepted for r in fake.log if r.text.startswith("move"))


# --- camera faults ---------------------------------------------------------------------------------------

@pytest.fixture
def zaber() -> Iterator[FakeZaber]:
    with FakeZaber(devices=[DeviceConfig(homed=True, position=5 * NM)]) as f:
        yield f


def flir_render(fake: FakeZaber) -> object:
    """A FLIR frame showing what the simulated optics would see at the fake stage's position."""
    optics = autofocus.SimOptics(width=160, height=120)
    stage = autofocus.SimStage(travel_mm=(0, 25), timing=autofocus.SimTiming(scale=0.0))
    sim = autofocus.SimCamera(stage, optics, autofocus.SimTiming(scale=0.0))
    return lambda t: sim.render(fake.position() / NM)


def run_flir(PySpin: ModuleType, zaber: FakeZaber, tmp_path: Path, capsys: pytest.CaptureFixture[str],  # noqa: N803
             **fault: object) -> tuple[int, dict, str]:
    PySpin.fake.reset(cameras=[PySpin.FakeCameraSpec(serial="1", width=160, height=120, exposure_auto="Off",
                                                     exposure_us=1000.0, readout_s=0.0005,
                                                     render=flir_render(zaber), **fault)])
    code = autofocus.main(["12", "12.7", "0.05", f"tcp://127.0.0.1:{zaber.port}", "--native-unit-nm", "1",
                           "--camera-timeout-ms", "200", "--json", "--save-curve", str(tmp_path / "c.csv")])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def test_flir_and_zaber_together_find_focus(PySpin, sp, zaber, tmp_path, capsys) -> None:  # noqa: N803
    code, out, err = run_flir(PySpin, zaber, tmp_path, capsys)
    assert code == 0, err
    assert abs(out["best_mm"] - 12.34) <= 0.05 and zaber.position() == round(out["best_mm"] * NM)
    assert PySpin.fake.camera("1").acquisitions_started == 1 and PySpin.fake.buffers_in_use() == 0


@pytest.mark.parametrize("fault, message", [
    # 501 ms, not 200: the frame timeout is never below the exposure (1 ms) + CAMERA_TIMEOUT_MARGIN_MS.
    # Frame 0 is the look before the first move (check_camera): frames 1-5 are scored, frame 6 fails.
    ({"timeout_from_frame": 6}, "no frame from the FLIR camera within 501 ms"),
    ({"error_at_frame": 6}, "no frame from the FLIR camera"),
    ({"incomplete_at_frame": 6}, "incomplete frame"),
    ({"disconnect_at_frame": 6}, "no frame from the FLIR camera"),
])
def test_camera_fault_mid_sweep(PySpin, sp, zaber, tmp_path, capsys, fault, message) -> None:  # noqa: N803
    code, out, err = run_flir(PySpin, zaber, tmp_path, capsys, **fault)
    assert code == autofocus.EXIT_HARDWARE and message in err and err.count("\n") == 1
    assert "returned to its start, 5.0000 mm" in err and zaber.position() == 5 * NM
    assert out["frames"] == 5 == len((tmp_path / "c.csv").read_text().splitlines()) - 1


@pytest.mark.parametrize("value, message", [(0, "all black"), (255, "fully saturated")])
def test_black_or_saturated_frames_stop_the_run(monkeypatch, tmp_path, capsys, value, message) -> None:
    real_render = autofocus.SimCamera.render

    def render(self: autofocus.SimCamera, z_mm: float) -> np.ndarray:
        frame = real_render(self, z_mm)
        return np.full_like(frame, value) if z_mm >= 10.3 else frame

    monkeypatch.setattr(autofocus.SimCamera, "render", render)
    code = autofocus.main(["10", "11", "0.05", "--simulate", "--sim-time-scale", "0", "--sim-size", "64x48",
                           "--sim-start-mm", "2", "--json"])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert code == autofocus.EXIT_HARDWARE and message in captured.err
    assert out["frames"] == 6 and "returned to its start, 2.0000 mm" in captured.err


def test_disk_full_while_saving_images(monkeypatch, tmp_path, capsys) -> None:
    import errno

    real_replace = autofocus.os.replace
    written = []

    def replace(src: str, dst: str) -> None:  # the fifth frame finds the disk full
        written.append(dst)
        if len(written) > 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(autofocus.os, "replace", replace)
    code = autofocus.main(["10", "11", "0.05", "--simulate", "--sim-time-scale", "0", "--sim-size", "64x48",
                           "--sim-start-mm", "2", "--save-images", str(tmp_path), "--json"])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert code == autofocus.EXIT_HARDWARE and "No space left on device" in captured.err
    assert captured.err.count("\n") == 1
    assert "returned to its start, 2.0000 mm" in captured.err
    assert len((tmp_path / "stack.csv").read_text().splitlines()) == 1 + 4  # the frames saved before it failed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frame_00000.png", "frame_00001.png", "frame_00002.png",
                                                          "frame_00003.png", "stack.csv"]  # no partial file left
    assert out["error"] and out["frames"] >= 4
