"""Focus maps through the REAL Zaber Motion Library against tests/fake_zaber.py: a focus device
(3, one axis) and an XY plate (device 2, two axes: x = axis 2, y = axis 1, native unit 156.25 nm),
the simulated slide rendered at the fake stages' positions (--camera sim).  In-process main()
calls; the fake's command log says what moved, where and in which order.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import autofocus as af
from fake_zaber import MOTION_PREFIXES, DeviceConfig, FakeZaber

PART = "zaber.microscope.part"  # the storage key ZML's Microscope.find reads
XY_UNIT_NM = 156.25


def devices(*, storage: bool = False, homed: bool = True) -> list[DeviceConfig]:
    plate = DeviceConfig(address=2, device_id=50819, axes=2, limit_max=640_000, position=320_000, homed=homed,
                         storage=((2, PART, "x"), (1, PART, "y")) if storage else ())
    focus = DeviceConfig(address=3, homed=True, position=12_300_000,
                         storage=((1, PART, "focus"),) if storage else ())
    return [plate, focus]


@pytest.fixture
def fake() -> Iterator[FakeZaber]:
    with FakeZaber(devices=devices()) as f:
        yield f


def argv(fake: FakeZaber, *extra: Any, xy_device: bool = True) -> list[str]:
    base = ["12.26", "12.42", "0.004", f"tcp://127.0.0.1:{fake.port}", "--camera", "sim", "--native-unit-nm", "1",
            "--xy-native-unit-nm", str(XY_UNIT_NM), "--sim-objective", "20x", "--sim-size", "320x200",
            "--sim-time-scale", "0"]
    return [*base, *(["--xy-device", "2"] if xy_device else []), *map(str, extra)]


def call_main(capfd: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, str, str]:
    code = af.main(args)
    cap = capfd.readouterr()
    return code, cap.out, cap.err


def native(mm: float) -> int:
    return round(mm * 1e6 / XY_UNIT_NM)


def test_map_on_a_zaber_microscope_found_by_zml(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Microscope.find identifies the plate (x = axis 2, y = axis 1 here) from the axes' storage
    keys; the map visits a snake with verified plate moves, and Z stays inside START..END."""
    with FakeZaber(devices=devices(storage=True)) as fake:
        csv_path = tmp_path / "map.csv"
        code, out, err = call_main(capfd, argv(fake, "--map", "2x2", "--map-area", "46,35,49,37",
                                               "--map-out", csv_path, xy_device=False))
        assert code == 0, err
        assert "plate: device 2 axis 2 (x), device 2 axis 1 (y)" in out
        assert "156.25 nm from --xy-native-unit-nm" in out and "focus map 2x2" in out
        assert fake.move_targets(2, 2) == [native(x) for x, _ in af.snake_path((46, 35, 49, 37), (2, 2))]
        assert fake.move_targets(2, 1) == [native(y) for _, y in af.snake_path((46, 35, 49, 37), (2, 2))]
        z = fake.move_targets(3, 1)
        assert z and all(12_260_000 <= t <= 12_420_000 for t in z)
        assert len(csv_path.read_text().splitlines()) == 5


@pytest.mark.parametrize(("move", "device"), [(51, 2), (40, 3)])  # the 4th point's x move; a focus move
def test_a_fault_mid_map_writes_the_partial_map_and_nothing_moves_after_it(
        fake: FakeZaber, capfd: pytest.CaptureFixture[str], tmp_path: Path, move: int, device: int) -> None:
    """An encoder fault (FQ) latches in the middle of the map, at a plate move or a focus move:
    exit 5, one line, the points so far in the CSV and JSON, and not one motion command after
    the faulted move."""
    out_csv, out_json = tmp_path / "map.csv", tmp_path / "map.json"
    fake.inject(fault_at_move=move)
    code, _, err = call_main(capfd, argv(fake, "--map", "3x3", "--map-area", "44,33,50,39", "--map-out", out_csv,
                                         "--map-json", out_json))
    assert code == 5, err
    assert fake.move_targets(2, 2)[:2] == [native(44), native(47)]  # --xy-device: x is axis 2 ...
    assert fake.move_targets(2, 1)[0] == native(33)  # ... and y axis 1
    lines = [line for line in err.splitlines() if line.startswith("autofocus.py:")]
    assert len(lines) == 1 and "fault FQ" in lines[0] and "nothing more was moved" in lines[0]
    moves = [i for i, r in enumerate(fake.log) if r.text.startswith("move abs")]
    faulted = moves[move - 1]
    assert fake.log[faulted].device == device  # (the move numbers follow the map's deterministic path)
    assert not [r.text for r in fake.log[faulted + 1:] if r.text.startswith(MOTION_PREFIXES)]
    doc = json.loads(out_json.read_text())
    assert not doc["complete"] and doc["points"][-1]["status"] == "failed"
    rows = out_csv.read_text().splitlines()
    assert len(rows) == 1 + len(doc["points"]) and 2 <= len(doc["points"]) <= 9
    assert all(p["status"] == "used" for p in doc["points"][:-1])


@pytest.mark.parametrize(("extra", "message"), [
    (["--map", "3x3", "--map-area", "44,33,101,39"], "leaves the allowed 0..100 mm"),  # beyond the plate's travel
    (["--map", "3x3", "--map-area", "44,33,50,39", "--xy-limits", "45,0,100,100"], "leaves the allowed 45..100"),
    (["--map", "1x3", "--map-area", "44,33,50,39"], "each side needs 2 to 30 points"),
    (["--map", "3x3", "--map-area", "44,33,44,39"], "has no width"),
    (["--map", "3x3", "--map-area", "44,33,50,39", "--z-max", "12.40"], "leaves the allowed interval"),
])
def test_bad_maps_and_areas_outside_the_travel_move_nothing(fake: FakeZaber, capfd: pytest.CaptureFixture[str],
                                                            extra: list[str], message: str) -> None:
    code, out, err = call_main(capfd, argv(fake, *extra))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert fake.motion_commands() == []


def test_no_plate_found_names_xy_device(capfd: pytest.CaptureFixture[str]) -> None:
    with FakeZaber(devices=devices(storage=False)) as fake:
        code, _, err = call_main(capfd, argv(fake, "--map", "2x2", "--map-area", "44,33,50,39", xy_device=False))
        assert code == 2 and "--xy-device N" in err and fake.motion_commands() == []


def test_an_unhomed_plate_with_xy_limits_needs_consent(capfd: pytest.CaptureFixture[str]) -> None:
    with FakeZaber(devices=devices(homed=False)) as fake:
        code, _, err = call_main(capfd, argv(fake, "--map", "2x2", "--map-area", "44,33,50,39",
                                             "--xy-limits", "0,0,100,100"))
        assert code == 2 and "--home" in err and fake.motion_commands() == []
