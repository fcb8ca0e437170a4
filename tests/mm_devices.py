"""Python devices for the real pymmcore-plus core (UniMMCore): a microscope that renders the simulator.

The camera renders what autofocus's simulated optics would show at the focus drive's position,
with the focal plane given by a function of the XY stage's position (a tilted slide), so the real
core, its MDA engine and this tool's Micro-Manager adapters run end to end without hardware.
Fault knobs stand for the outside world: ``nudges`` move the focus drive during an exposure (the
focus knob turned while the camera exposes), ``land_off_um`` makes moves end off their target
(someone holding the knob), ``blank_x_um`` makes part of the slide bare glass.

Used by tests/test_micromanager.py and tests/benchmark.py (section mm).
"""
from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
from pymmcore_plus import FocusDirection
from pymmcore_plus.experimental.unicore import (
    ShutterDevice,
    SimpleCameraDevice,
    StageDevice,
    UniMMCore,
    XYStageDevice,
)

import autofocus


class FocusDrive(StageDevice):
    """A focus drive in um; ``moves`` records every commanded position, ``land_off_um`` the error
    of the next moves (as if someone held the knob), ``move_s`` the time a move takes; ``travel_um``
    adds a Position property with limits, as C++ stage adapters report their travel."""

    def __init__(self, z_um: float = 12300.0, travel_um: tuple[float, float] | None = None) -> None:
        super().__init__()
        self.z_um = float(z_um)
        self.moves: list[float] = []
        self.stops = 0
        self.land_off_um = 0.0
        # Unknown (the default) keeps the MDA engine from restoring positions at the end of a run.
        self.focus_direction = FocusDirection.Unknown
        if travel_um is not None:
            self.register_property("Position", default_value=self.z_um, limits=travel_um,
                                   getter=lambda dev: dev.z_um)

    move_s = 0.0  # how long a move takes: busy() until then, and the position on the way meanwhile
    _motion: tuple[float, float, float] | None = None  # (from, to, start time) while moving

    def set_position_um(self, val: float) -> None:
        self.moves.append(float(val))
        target = float(val) + self.land_off_um
        if self.move_s > 0:
            self._motion = (self.get_position_um(), target, time.perf_counter())
        self.z_um = target

    def get_position_um(self) -> float:
        if self._motion is not None:
            start, end, t0 = self._motion
            done = (time.perf_counter() - t0) / self.move_s
            if done < 1:
                return start + (end - start) * done
            self._motion = None
        return self.z_um

    def busy(self) -> bool:
        self.get_position_um()  # ends the motion once its time is up
        return self._motion is not None

    def get_focus_direction(self) -> FocusDirection:
        return self.focus_direction

    def home(self) -> None:
        raise NotImplementedError("no homing here")

    def stop(self) -> None:
        self.stops += 1

    def set_origin(self) -> None:
        raise NotImplementedError("no origin here")


class Plate(XYStageDevice):
    """An XY stage in um; ``moves`` records every commanded position; ``land_off_um`` as above."""

    def __init__(self) -> None:
        super().__init__()
        self.xy_um = (0.0, 0.0)
        self.moves: list[tuple[float, float]] = []
        self.land_off_um = 0.0

    def set_position_um(self, x: float, y: float) -> None:
        self.moves.append((float(x), float(y)))
        self.xy_um = (float(x) + self.land_off_um, float(y))

    def get_position_um(self) -> tuple[float, float]:
        return self.xy_um

    def set_origin_x(self) -> None:
        raise NotImplementedError

    def set_origin_y(self) -> None:
        raise NotImplementedError

    def home(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        pass


class Shutter(ShutterDevice):
    """The lamp's shutter (an MDA opens and closes it around each frame)."""

    is_open = False

    def get_open(self) -> bool:
        return self.is_open

    def set_open(self, open: bool) -> None:  # noqa: A002 - the base class's name
        self.is_open = bool(open)


@dataclasses.dataclass
class Snap:
    """One exposure: where the stages stood, and when it began and ended (perf_counter)."""

    z_um: float
    xy_um: tuple[float, float]
    t0: float
    t1: float


class SimCamera(SimpleCameraDevice):
    """Renders autofocus's simulated optics at the focus drive's position, reading the drives'
    objects directly (calling the core from snap() deadlocks).  ``surface_mm(x_um, y_um)`` is the
    focal plane under the objective; where ``x_um >= blank_x_um`` the slide is bare glass.
    ``exposure_s`` is slept per frame (the modelled exposure; 0 in tests)."""

    def __init__(self, focus: FocusDrive, plate: Plate | None, optics: autofocus.SimOptics,
                 surface_mm: Callable[[float, float], float] | None = None, blank_x_um: float = float("inf"),
                 dtype: Any = np.uint8) -> None:
        super().__init__()
        self.focus, self.plate, self.optics = focus, plate, optics
        self.surface_mm = surface_mm or (lambda x_um, y_um: optics.focus_mm)
        self.blank_x_um = blank_x_um
        self.exposure_ms = 10.0
        self.exposure_s = 0.0
        self._dtype = np.dtype(dtype)
        timing = autofocus.SimTiming(scale=0.0)
        self._sim = {kind: autofocus.SimCamera(autofocus.SimStage(), dataclasses.replace(optics, specimen=kind),
                                               timing) for kind in (optics.specimen, "blank")}
        self.snaps: list[Snap] = []
        self.nudges: dict[int, float] = {}  # snap number -> um the focus drive moves during that exposure

    def sensor_shape(self) -> tuple[int, int]:
        return self.optics.height, self.optics.width

    def dtype(self) -> Any:
        return self._dtype

    def get_exposure(self) -> float:
        return self.exposure_ms

    def set_exposure(self, exposure: float) -> None:
        self.exposure_ms = float(exposure)

    def snap(self, buffer: np.ndarray) -> Mapping:
        t0 = time.perf_counter()
        z_um = self.focus.z_um
        xy = self.plate.xy_um if self.plate is not None else (0.0, 0.0)
        sim = self._sim["blank" if xy[0] >= self.blank_x_um else self.optics.specimen]
        sim.optics = dataclasses.replace(sim.optics, focus_mm=self.surface_mm(*xy))
        frame = sim.render(z_um / 1000.0)
        buffer[:] = frame if self._dtype == frame.dtype else frame.astype(self._dtype) * 16
        if self.exposure_s:
            time.sleep(self.exposure_s)
        number = len(self.snaps)
        if number in self.nudges:  # the knob turned while this frame exposed
            self.focus.z_um += self.nudges[number]
        self.snaps.append(Snap(z_um, xy, t0, time.perf_counter()))
        return {"exposure_start_s": f"{t0:.6f}", "z_um": f"{z_um:.4f}"}


@dataclasses.dataclass
class Scope:
    """A loaded core and its devices."""

    core: UniMMCore
    focus: FocusDrive
    plate: Plate | None
    camera: SimCamera
    shutter: Shutter


@contextmanager
def microscope(*, objective: str = "20x", focus_mm: float = 12.31, start_um: float = 12300.0,
               width: int = 320, height: int = 200, seed: int = 0, specimen: str = "cells",
               surface_mm: Callable[[float, float], float] | None = None, blank_x_um: float = float("inf"),
               xy: bool = True, travel_um: tuple[float, float] | None = None, core_class: type = UniMMCore,
               dtype: Any = np.uint8) -> Iterator[Scope]:
    """A UniMMCore with a focus drive "Z", an XY stage "XY" (``xy``), the camera "Camera" and a
    shutter "Shutter", all selected; unloaded (and the core dropped) at the end, without which the
    process can abort at exit (pymmcore-plus 0.18.1)."""
    optics = autofocus.SimOptics(**autofocus.objective_optics(objective), focus_mm=focus_mm, width=width,
                                 height=height, seed=seed, specimen=specimen)
    core = core_class()
    focus = FocusDrive(start_um, travel_um)
    plate = Plate() if xy else None
    camera = SimCamera(focus, plate, optics, surface_mm, blank_x_um, dtype)
    shutter = Shutter()
    try:
        for label, device in (("Z", focus), ("XY", plate), ("Camera", camera), ("Shutter", shutter)):
            if device is not None:
                core.loadPyDevice(label, device)
        core.initializeAllDevices()
        core.setFocusDevice("Z")
        if plate is not None:
            core.setXYStageDevice("XY")
        core.setCameraDevice("Camera")
        core.setShutterDevice("Shutter")
        yield Scope(core, focus, plate, camera, shutter)
    finally:
        core.unloadAllDevices()
        del core
        gc.collect()
