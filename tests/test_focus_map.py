"""Focus maps: the pure surface fitting and search-window rules, and focus_map() on the simulated
slide (a tilted, bowed slide on an XY plate, bare glass where asked, a field of view per position).

The real ZML against the fake plate is in tests/test_focus_map_zaber.py.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import autofocus as af
from conftest import ROOT

AREA = (44.0, 33.0, 56.0, 42.0)
RANGE = (12.26, 12.42, 0.004)  # 20x: STEP ~ one depth of field (4.2 um)
SIM = dict(objective="20x", width=320, height=200, time_scale=0.0, start_mm=12.3)


def grid_points(area: tuple[float, ...] = AREA, grid: tuple[int, int] = (5, 4)) -> tuple[np.ndarray, np.ndarray]:
    pts = af.snake_path(area, grid)
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def tilted(x: Any, y: Any) -> Any:
    return 12.34 + 0.004 * (np.asarray(x) - 50) - 0.0025 * (np.asarray(y) - 37.5)


def bowed(x: Any, y: Any) -> Any:
    return tilted(x, y) + 0.00015 * ((np.asarray(x) - 50) ** 2 + (np.asarray(y) - 37.5) ** 2)


def rippled(x: Any, y: Any) -> Any:
    return tilted(x, y) + 0.002 * np.sin(2 * np.pi * (np.asarray(x) + np.asarray(y)) / 12.0)


def dense(area: tuple[float, ...] = AREA) -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.linspace(area[0], area[2], 25), np.linspace(area[1], area[3], 19))


def fake_result(z: float | None, *, uncertainty_mm: float | None = None) -> af.FocusResult:
    """A FocusResult as a search would return it: focused at z, or no_peak (z None)."""
    kind = "no_peak" if z is None else "focused"
    zz = 12.0 if z is None else z
    return af.FocusResult("sweep", "laplacian", (af.Sample(zz, 1.0),), zz, 1.0, af.PeakFit(zz, True, "test"),
                          af.Verdict(kind, 1.0, 0.1, 0.5, "test"), 12.0 if z is None else z, 12.0, 1, 0.0,
                          af.Timing(), uncertainty_mm=uncertainty_mm)


# --- surfaces ------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["plane", "quadratic"])
def test_polynomial_fits_recover_their_surface_exactly(model: str) -> None:
    x, y = grid_points()
    truth = tilted if model == "plane" else bowed
    fit = af.fit_surface(x, y, truth(x, y), np.full(len(x), 1e-3), model, AREA)
    gx, gy = dense()
    assert np.max(np.abs(fit.surface.z_at(gx, gy) - truth(gx, gy))) < 1e-9
    assert fit.loo_rms_mm < 1e-9
    assert fit.surface.gradient_um_per_mm(50, 37.5) == pytest.approx((4.0, -2.5), abs=1e-6)


@pytest.mark.parametrize("model", af.MAP_MODELS)
def test_leave_one_out_residuals_equal_refitting_without_the_point(model: str) -> None:
    """The closed form r_i / (1 - H_ii) is what refitting without point i gives (the spline at its
    chosen smoothing; its weights equal, which its smoothing scale is normalised to)."""
    rng = np.random.default_rng(5)
    x, y = grid_points()
    x, y = x + rng.uniform(-0.4, 0.4, len(x)), y + rng.uniform(-0.4, 0.4, len(y))
    z = rippled(x, y) + rng.normal(0, 3e-4, len(x))
    sigma = np.full(len(x), 3e-4) if model == "spline" else rng.uniform(2e-4, 8e-4, len(x))
    fit = af.fit_surface(x, y, z, sigma, model, AREA)
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        other = af.fit_surface(x[keep], y[keep], z[keep], sigma[keep], model, AREA,
                               smoothing=fit.surface.smoothing if model == "spline" else None)
        assert fit.loo_mm[i] == pytest.approx(z[i] - other.surface.z_at(x[i], y[i]), abs=1e-7)  # 0.1 nm


def test_models_that_cannot_be_determined_are_not_fitted() -> None:
    assert af.fit_surface([1, 2, 3, 4], [1, 2, 3, 4], [0, 0, 0, 0], [1, 1, 1, 1], "plane", AREA) is None  # a line
    x, y = grid_points(grid=(2, 2))
    assert af.fit_surface(x, y, tilted(x, y), np.ones(4), "plane", AREA) is not None
    assert af.fit_surface(x, y, tilted(x, y), np.ones(4), "quadratic", AREA) is None  # 6 terms, 4 points
    assert af.fit_surface(x, y, tilted(x, y), np.ones(4), "spline", AREA) is None


@pytest.mark.parametrize(("truth", "expected"), [(tilted, "plane"), (bowed, "quadratic"), (rippled, "spline")])
def test_the_surface_is_chosen_by_leave_one_out_error(truth: Any, expected: str) -> None:
    rng = np.random.default_rng(1)
    x, y = grid_points(grid=(7, 6))
    z = truth(x, y) + rng.normal(0, 2e-4, len(x))
    choice = af.choose_surface(x, y, z, np.full(len(x), 2e-4), AREA, 0.002)
    assert choice.fit.surface.model == expected, choice.loo_by_model_mm
    gx, gy = dense()
    assert np.sqrt(np.mean((choice.fit.surface.z_at(gx, gy) - truth(gx, gy)) ** 2)) < 0.5e-3  # < 0.5 um
    assert choice.outliers == ()


def test_the_simplest_model_wins_unless_a_complex_one_is_clearly_better() -> None:
    fits = {m: af.SurfaceFit(None, np.zeros(1), np.zeros(1), v)  # type: ignore[arg-type]
            for m, v in (("plane", 1.05e-3), ("quadratic", 1.0e-3), ("spline", 0.98e-3))}
    assert af.select_model(fits) == "plane"  # within 10% of the best
    fits["plane"] = af.SurfaceFit(None, np.zeros(1), np.zeros(1), 1.2e-3)  # type: ignore[arg-type]
    assert af.select_model(fits) == "quadratic"


def test_each_point_is_weighted_by_its_error_bar() -> None:
    """A point 10 um off with a 50 um error bar barely moves the surface; with the same error bar
    as the others it moves it several times more."""
    x, y = grid_points()
    z = tilted(x, y)
    z[7] += 0.010
    loose = np.full(len(x), 5e-4)
    loose[7] = 0.05
    pull = {}
    for name, sigma in (("weighted", loose), ("equal", np.full(len(x), 5e-4))):
        fit = af.fit_surface(x, y, z, sigma, "plane", AREA)
        pull[name] = abs(fit.surface.z_at(x[7], y[7]) - tilted(x[7], y[7]))
    assert pull["weighted"] < 0.05e-3 and pull["equal"] > 5 * pull["weighted"]


def test_outliers_are_left_out_and_never_bend_the_surface() -> None:
    rng = np.random.default_rng(2)
    x, y = grid_points(grid=(6, 5))
    z = bowed(x, y) + rng.normal(0, 2e-4, len(x))
    z[8] += 0.040  # dust: 40 um above the slide
    z[9] += 0.025  # ... and its neighbour
    z[20] -= 0.006
    choice = af.choose_surface(x, y, z, np.full(len(x), 2e-4), AREA, 0.002)
    assert sorted(choice.outliers) == [8, 9, 20]
    assert not choice.used[[8, 9, 20]].any() and choice.used.sum() == len(x) - 3
    gx, gy = dense()
    assert np.max(np.abs(choice.fit.surface.z_at(gx, gy) - bowed(gx, gy))) < 0.6e-3


def test_points_within_half_a_depth_of_field_are_never_outliers() -> None:
    """Residuals below the floor (DOF/2) are in focus anyway: no point is rejected for them."""
    rng = np.random.default_rng(3)
    x, y = grid_points(grid=(6, 5))
    z = tilted(x, y) + rng.normal(0, 1e-5, len(x))
    z[11] += 0.0015  # far beyond the others' 0.01 um scatter, but within DOF/2 = 2 um
    assert af.choose_surface(x, y, z, np.full(len(x), 1e-5), AREA, 0.002).outliers == ()
    assert af.choose_surface(x, y, z, np.full(len(x), 1e-5), AREA, 0.001).outliers == (11,)


def test_an_assumed_error_bar_does_not_hide_an_outlier() -> None:
    """STEP/4 (1 um here) weights points without an error bar of their own, but the outlier test
    then rests on the points' scatter: a point 3.5 um off a surface the others follow to 0.2 um
    is an outlier -- unless its own error bar says it may be that far off."""
    rng = np.random.default_rng(8)
    x, y = grid_points()
    z = bowed(x, y) + rng.normal(0, 2e-4, len(x))
    z[6] += 0.0035
    assumed = np.full(len(x), 1e-3)
    assert af.choose_surface(x, y, z, assumed, AREA, 0.002, own_sigma_mm=np.zeros(len(x))).outliers == (6,)
    assert af.choose_surface(x, y, z, assumed, AREA, 0.002).outliers == ()
    pts = [af.MapPoint(float(a), float(b), fake_result(float(c))) for a, b, c in zip(x, y, z)]  # no error bars
    fmap = af.summarise_map(pts, area_mm=AREA, grid=(5, 4), depth_of_field_mm=0.004, range_mm=(12.26, 12.42),
                            step_mm=0.004)
    assert [p.status for p in fmap.points].count("outlier") == 1 and fmap.points[6].status == "outlier"


def test_surface_round_trips_through_json_and_refuses_points_outside_the_area() -> None:
    x, y = grid_points()
    fit = af.choose_surface(x, y, rippled(x, y), np.full(len(x), 3e-4), AREA, 0.002).fit
    again = af.Surface.from_json(json.loads(json.dumps(fit.surface.to_json())))
    gx, gy = dense()
    assert np.array_equal(again.z_at(gx, gy), fit.surface.z_at(gx, gy))
    assert isinstance(again.z_at(50.0, 37.0), float)
    assert again.z_at(56.5, 42.4) is not None  # within 5% of the span beyond the edge
    with pytest.raises(ValueError, match="outside the mapped area"):
        again.z_at(57.0, 37.0)
    with pytest.raises(ValueError, match="not a focus-map surface"):
        af.Surface.from_json({"model": "cubic", "area_mm": [0, 0, 1, 1], "coefficients": [1]})


# --- predicting the focus and the search window -------------------------------------------------

def test_prediction_uncertainty_follows_what_the_points_pin_down() -> None:
    one = af.predict_focus([44], [33], [12.3], [1e-3], (47, 33))
    assert one[0] == pytest.approx(12.3) and one[1] == pytest.approx(3 * af.PRIOR_TILT_MM_PER_MM, rel=0.1)
    row = ([44, 47, 50, 53], [33] * 4, list(tilted(np.array([44, 47, 50, 53]), 33)), [5e-4] * 4)
    along = af.predict_focus(*row, (56, 33))
    across = af.predict_focus(*row, (53, 36))  # the tilt across the row is still unknown
    assert along[0] == pytest.approx(tilted(56, 33), abs=1e-3) and along[1] < 0.005
    assert across[1] > 3 * along[1]
    x, y = grid_points()
    full = af.predict_focus(x, y, tilted(x, y), np.full(len(x), 5e-4), (48.5, 37.5))
    assert full[0] == pytest.approx(tilted(48.5, 37.5), abs=1e-4) and full[1] < 5e-4


def test_prediction_widens_when_the_points_scatter_more_than_their_error_bars() -> None:
    x, y = grid_points()
    rough = tilted(x, y) + np.where(np.arange(len(x)) % 2, 0.003, -0.003)  # 3 um scatter, 0.5 um error bars
    calm = af.predict_focus(x, y, tilted(x, y), np.full(len(x), 5e-4), (48.5, 37.5))[1]
    assert af.predict_focus(x, y, rough, np.full(len(x), 5e-4), (48.5, 37.5))[1] > 3 * calm


def test_window_covers_the_prediction_and_its_uncertainty_on_the_grid() -> None:
    positions = af.plan_positions(12.26, 12.42, 0.004)
    lo, hi = af.plan_window(12.3402, 0.0005, positions, 0.004, 14)
    assert (lo, hi) == (12.332, 12.348)  # 5 frames: the fewest a verdict is made from
    lo, hi = af.plan_window(12.3402, 0.002, positions, 0.004, 14)
    assert round((hi - lo) / 0.004) + 1 == 7 and lo < 12.3402 - 2.5 * 0.002 < 12.3402 + 2.5 * 0.002 < hi
    assert af.plan_window(12.262, 0.0005, positions, 0.004, 14) == (12.26, 12.276)  # shifted inside
    assert af.plan_window(12.4195, 0.0005, positions, 0.004, 14) == (12.404, 12.42)
    assert af.plan_window(12.3402, 0.01, positions, 0.004, 14) is None  # as dear as the whole range
    down = positions[::-1]
    assert af.plan_window(12.3402, 0.0005, down, 0.004, 14) == (12.348, 12.332)  # a downward range


def test_full_search_cost_estimate() -> None:
    assert af.full_search_frames(41, "sweep") == 41
    assert af.full_search_frames(20, "fast") == 20  # short grids are swept
    assert af.full_search_frames(41, "fast") == 15 and af.full_search_frames(81, "fast") == 15


def peak(z: np.ndarray, centre: float, level: float = 0.08, floor: float = 0.01) -> np.ndarray:
    return floor + level * np.exp(-0.5 * ((z - centre) / 0.0035) ** 2)


@pytest.mark.parametrize("offset_steps", [0.0, 0.5, 1.0])
def test_window_verdict_finds_the_focus_that_judge_misses_in_a_narrow_window(offset_steps: float) -> None:
    """The simulator at 20x, STEP ~ one depth of field: judge() takes its noise from the frames off
    the peak, and a 5-frame window around the focus has none, so it reads no_peak; judge_window,
    with the noise of repeated frames, finds the focus (and the fit lands within STEP/4)."""
    stage, camera = af.simulated_microscope(objective="20x", width=320, height=200, time_scale=0,
                                            focus_mm=12.34, start_mm=12.34, seed=3)
    scorer = af.Scorer()
    noise = af.relative_noise([scorer(camera.capture()) for _ in range(af.NOISE_REPEATS)])
    centre = 12.34 + offset_steps * 0.004
    result = af.focus(stage, camera, round(centre - 0.008, 6), round(centre + 0.008, 6), 0.004)
    assert result.frames == 5 and result.verdict.kind != "focused"
    assert af.judge_window(result.samples, noise).kind == "focused"
    assert result.fit.used and abs(result.fit.z_mm - 12.34) < 0.001


def test_window_verdict_rejects_noise_and_reports_an_edge() -> None:
    rng = np.random.default_rng(4)
    z = np.linspace(12.332, 12.348, 5)
    for seed in range(50):  # bare glass: scores flat within 1%
        rng = np.random.default_rng(seed)
        flat = [af.Sample(float(a), float(b)) for a, b in zip(z, 0.01 * (1 + rng.normal(0, 0.01, 5)))]
        assert af.judge_window(flat, 0.03).kind != "focused"
    rising = [af.Sample(float(a), float(b)) for a, b in zip(z, peak(z, 12.352))]
    assert af.judge_window(rising, 0.03).kind == "edge"
    small = [af.Sample(float(a), float(b)) for a, b in zip(z, peak(z, 12.34, level=0.002))]  # a 20% bump
    assert af.judge_window(small, 0.003).kind == "focused"
    assert af.judge_window(small, 0.03).kind == "no_peak"  # ... within a 3% noise
    assert af.judge_window(rising[:4], 0.03).kind == "no_peak"  # too few frames
    assert af.judge_window(small, float("nan")).kind == "no_peak"


def test_a_window_shows_a_weak_real_peak_but_not_noise() -> None:
    """A peak found by the whole-range search inside a window: a 15% rise there (a real, weak peak
    at 300 photons) is shown, a 1% ripple of noise is not (the noise is 3%)."""
    z = np.linspace(12.312, 12.328, 5)
    weak = [af.Sample(float(a), float(b)) for a, b in zip(z, (0.78, 0.85, 0.97, 1.0, 0.86))]
    flat = [af.Sample(float(a), float(b)) for a, b in zip(z, (0.993, 0.994, 1.0, 0.994, 0.988))]
    assert af.window_shows(weak, 12.324, 0.03) and not af.window_shows(flat, 12.320, 0.03)
    assert af.window_shows(flat, 12.312, 0.03)  # at the window's end: nothing to say


def test_relative_noise_of_repeated_frames() -> None:
    rng = np.random.default_rng(0)
    scores = 0.05 * (1 + rng.normal(0, 0.02, 400))
    assert af.relative_noise(scores) == pytest.approx(0.02 * (1 + 1.64 / math.sqrt(399)), rel=0.1)
    assert af.relative_noise([1.0, 1.0]) == 0.0
    assert math.isnan(af.relative_noise([1.0]))
    assert af.relative_noise([-0.2, -0.22, -0.2, -0.18]) > 0  # --transparent: negated scores


def test_snake_path_runs_rows_along_x_back_and_forth() -> None:
    path = af.snake_path((10, 5, 14, 7), (3, 2))
    assert path == [(10, 5), (12, 5), (14, 5), (14, 7), (12, 7), (10, 7)]
    assert af.snake_path((14, 7, 10, 5), (2, 2))[0] == (14, 7)  # the snake starts at X0,Y0


def test_suggestions_go_where_the_surface_is_least_certain() -> None:
    x, y = grid_points()
    loo = np.full(len(x), 1e-4)
    worst = int(np.argmin(np.hypot(x - 53, y - 39)))
    loo[worst] = 5e-3
    got = af.suggest_points(x, y, loo, list(zip(x, y)), AREA, (5, 4), 3)
    assert len(got) == 3 and all((gx, gy) not in set(zip(x, y)) for gx, gy in got)
    assert math.hypot(got[0][0] - 53, got[0][1] - 39) < 2.2  # next to the worst point
    spacing = 3.0
    assert all(math.hypot(a[0] - b[0], a[1] - b[1]) >= 0.99 * spacing for i, a in enumerate(got) for b in got[i + 1:])


# --- the map's summary ---------------------------------------------------------------------------

def test_summary_reports_bare_glass_outliers_and_uncertainty() -> None:
    x, y = grid_points()
    z = list(bowed(x, y) + np.random.default_rng(7).normal(0, 3e-4, len(x)))
    z[3] = None  # bare glass
    z[12] += 0.05  # dust
    pts = [af.MapPoint(float(a), float(b), fake_result(c), (fake_result(c),)) for a, b, c in zip(x, y, z)]
    fmap = af.summarise_map(pts, area_mm=AREA, grid=(5, 4), depth_of_field_mm=0.004, range_mm=(12.26, 12.42),
                            step_mm=0.004)
    status = [p.status for p in fmap.points]
    assert status[3] == "not_focused" and status[12] == "outlier" and status.count("used") == 18
    assert re.search(r"\+(49\.|50\.)\d um off the surface", fmap.points[12].note)
    assert any("without a focus" in w and "(53, 33) mm" in w for w in fmap.warnings)
    assert any("outlier" in w for w in fmap.warnings)
    assert fmap.model == "quadratic" and fmap.trusted and fmap.exit_code == 0
    assert fmap.tilt_um_per_mm == pytest.approx((4.0, -2.5), abs=0.05)  # the best plane, at the area's centre
    assert fmap.frames == 20 and fmap.points[0].loo_um is not None
    coarse = af.summarise_map(pts, area_mm=AREA, grid=(5, 4), depth_of_field_mm=0.0001, range_mm=(12.26, 12.42),
                              step_mm=0.004)  # the same points judged against a tiny depth of field
    assert not coarse.trusted and coarse.exit_code == af.EXIT_EDGE and coarse.suggestions_mm
    assert any("leave-one-out error" in w and "points are missing near" in w for w in coarse.warnings)
    none = af.summarise_map(pts[:3], area_mm=AREA, grid=(5, 4), depth_of_field_mm=0.004, range_mm=(12.26, 12.42),
                            step_mm=0.004, complete=False)
    assert none.surface is None and none.exit_code == af.EXIT_NO_PEAK
    assert any("no surface" in w for w in none.warnings) and any("cut short" in w for w in none.warnings)
    with pytest.raises(ValueError, match="no surface"):
        none.z_at(50, 37)


def test_uncertainty_mm_weights_the_fit() -> None:
    """FocusResult.uncertainty_mm (a ~90% half-width) is each point's error bar."""
    x, y = grid_points(grid=(4, 4))
    z = list(tilted(x, y))
    z[5] += 0.010
    sure = [af.MapPoint(float(a), float(b), fake_result(c, uncertainty_mm=4e-4)) for a, b, c in zip(x, y, z)]
    loose = list(sure)
    loose[5] = af.MapPoint(float(x[5]), float(y[5]), fake_result(z[5], uncertainty_mm=0.5))
    kw = dict(area_mm=AREA, grid=(4, 4), depth_of_field_mm=0.1, range_mm=(12.0, 12.6), step_mm=0.004)
    bent = abs(af.summarise_map(sure, **kw).z_at(x[5], y[5]) - tilted(x[5], y[5]))
    kept = abs(af.summarise_map(loose, **kw).z_at(x[5], y[5]) - tilted(x[5], y[5]))
    assert bent > 0.5e-3 and kept < 0.1e-3


def test_zaber_scanning_layout_of_the_offsets() -> None:
    """focus_map.npy of Zaber's high-throughput scanning example: m passes (rows, at each y) by n
    images along each pass (columns, along x), um from the first imaging location, plate order."""
    x, y = grid_points()
    pts = [af.MapPoint(float(a), float(b), fake_result(float(c))) for a, b, c in zip(x, y, tilted(x, y))]
    fmap = af.summarise_map(pts, area_mm=AREA, grid=(5, 4), depth_of_field_mm=0.004, range_mm=(12.26, 12.42),
                            step_mm=0.004)
    off = fmap.offsets_um((7, 3))
    assert off.shape == (3, 7) and off[0, 0] == 0
    assert off[0, 1] == pytest.approx(4.0 * 2.0, abs=1e-6)  # x step 2 mm at 4 um/mm
    assert off[1, 0] == pytest.approx(-2.5 * 4.5, abs=1e-6)  # y step 4.5 mm at -2.5 um/mm


# --- focus_map() on the simulated slide ------------------------------------------------------------

class Recorder:
    """Wraps a stage and records every position commanded (the camera sees the wrapped stage)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.moves = inner, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def move_to(self, *where: float) -> None:
        self.moves.append(where)
        self.inner.move_to(*where)


def simulated(**slide: Any) -> tuple[Recorder, Recorder, af.SlideCamera]:
    plate, stage, camera = af.simulated_slide(**{**SIM, **slide})
    return Recorder(plate), Recorder(stage), camera


def true_error_um(fmap: af.FocusMap, camera: af.SlideCamera) -> np.ndarray:
    gx, gy = dense(fmap.area_mm)
    bare = np.array([[camera.slide.bare(a, b) for a, b in zip(r, s)] for r, s in zip(gx, gy)])
    return 1000.0 * (fmap.z_at(gx, gy) - camera.slide.z_mm(gx, gy))[~bare]


@pytest.fixture(scope="module")
def bowed_map() -> tuple[af.FocusMap, Recorder, Recorder, af.SlideCamera]:
    plate, stage, camera = simulated()
    fmap = af.focus_map(plate, stage, camera, area_mm=AREA, grid=(5, 4), start_mm=RANGE[0], end_mm=RANGE[1],
                        step_mm=RANGE[2], xy_limits_mm=(40, 30, 60, 45), z_min=12.25)
    return fmap, plate, stage, camera


def test_map_of_a_tilted_bowed_slide_is_accurate_and_cheap(bowed_map: Any) -> None:
    fmap, plate, stage, camera = bowed_map
    err = true_error_um(fmap, camera)
    assert np.sqrt(np.mean(err ** 2)) < 0.5 and np.max(np.abs(err)) < 1.5
    assert fmap.model == "quadratic" and fmap.trusted and fmap.complete and not fmap.warnings
    assert all(p.status == "used" for p in fmap.points)
    assert fmap.frames / len(fmap.points) <= 10
    windows = [p for p in fmap.points if p.note.startswith("window")]
    assert len(windows) >= 15 and all(len(p.searches) == 1 for p in windows)  # none had to widen
    assert np.median([p.frames for p in windows]) <= 7
    assert sum(p.noise_frames for p in fmap.points) == af.NOISE_REPEATS
    assert fmap.tilt_um_per_mm == pytest.approx((4.0, -2.5 + 0.3 * (37.5 - 37.5)), abs=0.3)


def test_map_visits_a_snake_and_never_leaves_the_range_or_the_limits(bowed_map: Any) -> None:
    fmap, plate, stage, camera = bowed_map
    assert [m for m in plate.moves] == af.snake_path(AREA, (5, 4))
    assert [(p.x_mm, p.y_mm) for p in fmap.points] == af.snake_path(AREA, (5, 4))
    assert all(RANGE[0] - 1e-12 <= z <= RANGE[1] + 1e-12 for (z,) in stage.moves)
    assert stage.moves[-1] == (fmap.points[-1].z_mm,)  # left at the last point's focus


def test_z_stays_in_the_range_when_the_stage_starts_outside_it_and_the_first_point_is_bare() -> None:
    plate, stage, camera = simulated(start_mm=5.0, bare_glass=((43.0, 32.0, 45.0, 34.0),))
    fmap = af.focus_map(plate, stage, camera, area_mm=AREA, grid=(2, 2), start_mm=RANGE[0], end_mm=RANGE[1],
                        step_mm=RANGE[2])
    assert fmap.points[0].status == "not_focused"  # its search returned the stage to where it started ...
    assert stage.moves[0] == (RANGE[0],) and all(RANGE[0] <= z <= RANGE[1] for (z,) in stage.moves)  # ... in range


def test_bare_glass_points_are_reported_and_never_bend_the_surface(bowed_map: Any) -> None:
    plain = bowed_map[0]
    plate, stage, camera = simulated(bare_glass=((48.5, 35.0, 51.5, 40.5),))
    fmap = af.focus_map(plate, stage, camera, area_mm=AREA, grid=(5, 4), start_mm=RANGE[0], end_mm=RANGE[1],
                        step_mm=RANGE[2])
    bare = [p for p in fmap.points if camera.slide.bare(p.x_mm, p.y_mm)]
    assert len(bare) == 2 and all(p.status == "not_focused" and p.z_mm is None for p in bare)
    assert all(p.status == "used" for p in fmap.points if p not in bare)
    assert any("(50, 36), (50, 39) mm" in w for w in fmap.warnings)
    gx, gy = dense()
    assert np.max(np.abs(fmap.z_at(gx, gy) - plain.z_at(gx, gy))) < 1.0e-3
    err = true_error_um(fmap, camera)
    assert np.sqrt(np.mean(err ** 2)) < 0.5 and np.max(np.abs(err)) < 1.5


def test_a_whole_range_peak_inside_a_window_that_showed_none_is_noise(bowed_map: Any,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """focus()'s verdict can still call a noise maximum on an empty field focused (issue 20); where
    the window, judged with the slide's measured noise, covered that z and showed no peak, the map
    takes it as noise: the bare-glass point is reported, the stage goes back, the surface is unbent."""
    plate, stage, camera = simulated(bare_glass=((49.0, 35.5, 51.0, 36.5),))  # the point (50, 36)
    real, windows = af._run_request, []

    def run(z_stage: Any, cam: Any, request: af.Request, on_frame: Any, **keywords: Any) -> af.FocusResult:
        result = real(z_stage, cam, request, on_frame, **keywords)
        if request.search == "sweep":
            windows.append((request.start_mm, request.end_mm))
        elif plate.inner.xy == (50.0, 36.0) and result.verdict.kind == "no_peak":
            fake_z = round(sum(windows[-1]) / 2, 6)  # a made-up peak in the middle of the window
            z_stage.move_to(fake_z)
            result = dataclasses.replace(result, best_mm=fake_z, verdict=dataclasses.replace(result.verdict,
                                                                                              kind="focused"))
        return result

    monkeypatch.setattr(af, "_run_request", run)
    fmap = af.focus_map(plate, stage, camera, area_mm=AREA, grid=(5, 4), start_mm=RANGE[0], end_mm=RANGE[1],
                        step_mm=RANGE[2])
    point = next(p for p in fmap.points if (p.x_mm, p.y_mm) == (50.0, 36.0))
    assert point.status == "not_focused" and "taken as noise" in point.note
    assert point.result.verdict.kind == "no_peak" and point.searches[-1].verdict.kind == "focused"  # both kept
    assert stage.moves[-1] != point.searches[-1].best_mm
    gx, gy = dense()
    assert np.max(np.abs(fmap.z_at(gx, gy) - bowed_map[0].z_at(gx, gy))) < 1.0e-3


def test_refine_adds_points_where_the_map_is_uncertain() -> None:
    plate, stage, camera = simulated(ripple_um=3.0, ripple_mm=7.0)
    kw = dict(area_mm=AREA, grid=(4, 3), start_mm=RANGE[0], end_mm=RANGE[1], step_mm=RANGE[2])
    fmap = af.focus_map(plate, stage, camera, refine=6, **kw)
    added = [p for p in fmap.points if p.added]
    assert 1 <= len(added) <= 6 and len(fmap.points) == 12 + len(added)
    grid = set(af.snake_path(AREA, (4, 3)))
    assert all((p.x_mm, p.y_mm) not in grid for p in added)
    before = af.summarise_map(fmap.points[:12], area_mm=AREA, grid=(4, 3), depth_of_field_mm=0.004,
                              range_mm=(12.26, 12.42), step_mm=0.004)
    assert not before.trusted and before.suggestions_mm
    assert fmap.loo_rms_um < before.loo_rms_um or fmap.trusted


class FailingCamera:
    """The slide camera, failing (CameraError or Ctrl-C) at frame N."""

    def __init__(self, camera: af.SlideCamera, at: int, error: BaseException) -> None:
        self.camera, self.at, self.error, self.frames = camera, at, error, 0

    def capture(self) -> np.ndarray:
        self.frames += 1
        if self.frames == self.at:
            raise self.error
        return self.camera.capture()


@pytest.mark.parametrize("error", [af.CameraError("camera unplugged"), KeyboardInterrupt()])
def test_a_fault_mid_map_keeps_the_points_and_moves_nothing_more(error: BaseException) -> None:
    plate, stage, camera = simulated()
    failing = FailingCamera(camera, 60, error)
    with pytest.raises(type(error)) as info:
        af.focus_map(plate, stage, failing, area_mm=AREA, grid=(5, 4), start_mm=RANGE[0], end_mm=RANGE[1],
                     step_mm=RANGE[2])
    partial = info.value.partial
    assert not partial.complete and any("cut short" in w for w in partial.warnings)
    assert 3 <= len(partial.points) < 20 and partial.points[-1].status == "failed"
    assert all(p.status == "used" for p in partial.points[:-1])
    assert partial.points[-1].result is not None  # the failed point's partial curve is kept
    assert (plate.moves[-1][0], plate.moves[-1][1]) == (partial.points[-1].x_mm, partial.points[-1].y_mm)
    assert "the plate is at" in info.value.stage_state
    assert len(plate.moves) == len(partial.points)  # no plate move after the fault
    # the focus axis: only the failed search's own return to where it started (focus()'s rule)
    assert stage.moves[-1] == (partial.points[-1].result.start_mm,)


def test_a_plate_moved_from_outside_stops_the_map() -> None:
    plate, stage, camera = simulated()

    def nudge(point: af.MapPoint, done: int, total: int) -> None:
        if done == 3:
            plate.inner.xy = (plate.inner.xy[0] + 0.05, plate.inner.xy[1])  # the joystick

    with pytest.raises(af.StageInterrupted, match="not where the map left it") as info:
        af.focus_map(plate, stage, camera, area_mm=AREA, grid=(5, 4), start_mm=RANGE[0], end_mm=RANGE[1],
                     step_mm=RANGE[2], on_point=nudge)
    assert len(plate.moves) == 3 and len(info.value.partial.points) == 4
    assert "nothing more was moved" in info.value.stage_state


@pytest.mark.parametrize(("kw", "message"), [
    (dict(area_mm=(44, 33, 44, 42)), "has no width"),
    (dict(area_mm=(44, 33, float("nan"), 42)), "four finite numbers"),
    (dict(grid=(1, 5)), "each side needs 2 to"),
    (dict(grid=(5, 2.5)), "two whole numbers"),
    (dict(area_mm=(44, 33, 120, 42)), "leaves the allowed 0..100 mm"),
    (dict(xy_limits_mm=(45, 30, 60, 45)), "leaves the allowed 45..60 mm"),
    (dict(end_mm=12.27), "fewer than 5 STEPs"),
    (dict(z_max=12.4), "leaves the allowed interval"),
    (dict(refine=-1), "refine"),
])
def test_bad_requests_are_refused_before_anything_moves(kw: dict[str, Any], message: str) -> None:
    plate, stage, camera = simulated()
    args = {**dict(area_mm=AREA, grid=(5, 4), start_mm=RANGE[0], end_mm=RANGE[1], step_mm=RANGE[2]), **kw}
    with pytest.raises(af.UsageError, match=re.escape(message)):
        af.focus_map(plate, stage, camera, **args)
    assert plate.moves == [] and stage.moves == []
    with pytest.raises(TypeError, match="speed"):
        af.focus_map(plate, stage, camera, area_mm=AREA, grid=(5, 4), start_mm=12.26, end_mm=12.42, step_mm=0.004,
                     speed=3)


# --- the command line ---------------------------------------------------------------------------

CLI = ["12.26", "12.42", "0.004", "--simulate", "--sim-objective", "20x", "--sim-size", "320x200",
       "--sim-time-scale", "0", "--sim-start-mm", "12.3"]


def call_main(capfd: pytest.CaptureFixture[str], argv: list[Any]) -> tuple[int, str, str]:
    code = af.main([str(a) for a in argv])
    cap = capfd.readouterr()
    return code, cap.out, cap.err


def test_cli_map_writes_csv_json_npy_and_the_heat_map(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = {k: tmp_path / f"map.{k}" for k in ("csv", "json", "npy", "png")}
    code, stdout, stderr = call_main(capfd, [*CLI, "--map", "3x3", "--map-area", "44,33,50,39",
                                             "--sim-bare-glass", "46.5,35.5,47.5,36.5", "--map-out", out["csv"],
                                             "--map-json", out["json"], "--map-npy", out["npy"],
                                             "--map-npy-grid", "4x2", "--plot", out["png"]])
    assert code == 0, stderr
    assert re.match(r"focus map 3x3 over X 44\.\.50, Y 33\.\.39 mm: \w+ surface, tilt [+-]\d", stdout)
    assert "8 of 9 points used, 1 without focus" in stdout and "note: 1 point without a focus" in stdout
    rows = out["csv"].read_text().splitlines()
    assert rows[0] == ",".join(af.MAP_CSV_HEADER) and len(rows) == 10
    centre = [r for r in rows[1:] if r.startswith("47.0,36.0,")]
    assert centre and centre[0].split(",")[2:6] == ["", "no_peak", "", "not_focused"]
    doc = json.loads(out["json"].read_text())
    assert doc["grid"] == [3, 3] and len(doc["points"]) == 9 and doc["trusted"] and doc["frames"] > 0
    surface = af.Surface.from_json(doc["surface"])
    offsets = np.load(out["npy"])
    assert offsets.shape == (2, 4) and offsets[0, 0] == 0
    assert offsets[1, 3] == pytest.approx(1000 * (surface.z_at(50, 39) - surface.z_at(44, 33)))
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_map_json_on_stdout(capfd: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = call_main(capfd, [*CLI, "--map", "2x2", "--map-area", "44,33,48,36", "--json"])
    doc = json.loads(stdout)  # the whole of stdout
    assert code == doc["exit_code"] and doc["error"] is None and len(doc["points"]) == 4


@pytest.mark.parametrize(("extra", "message"), [
    (["--map", "1x5", "--map-area", "44,33,50,39"], "each side needs 2 to 30 points"),
    (["--map", "0x3", "--map-area", "44,33,50,39"], "each side needs 2 to 30 points"),
    (["--map", "5by4", "--map-area", "44,33,50,39"], "is not NXxNY"),
    (["--map", "3x3"], "--map needs --map-area"),
    (["--map-area", "44,33,50,39"], "--map-area belongs to a focus map"),
    (["--map", "3x3", "--map-area", "44,33,44,39"], "has no width"),
    (["--map", "3x3", "--map-area", "44,33,nan,39"], "is not a finite number"),
    (["--map", "3x3", "--map-area", "44,33,50"], "is not 4 comma-separated numbers"),
    (["--map", "3x3", "--map-area", "44,33,150,39"], "leaves the allowed 0..100 mm"),
    (["--map", "3x3", "--map-area", "44,33,50,39", "--xy-limits", "45,30,60,45"], "leaves the allowed 45..60"),
    (["--map", "3x3", "--map-area", "44,33,50,39", "--save-curve", "c.csv"], "is for a single focus"),
    (["--map", "3x3", "--map-area", "44,33,50,39", "--map-npy-grid", "4x4"], "--map-npy-grid needs --map-npy"),
])
def test_cli_bad_maps_are_one_line(capfd: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
    code, stdout, stderr = call_main(capfd, [*CLI, *extra])
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1 and stdout == ""
    assert "Traceback" not in stderr


def test_cli_map_needs_a_plate(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "stack.csv").write_text("z_mm,file\n")
    code, _, stderr = call_main(capfd, ["0", "1", "0.1", "--replay", tmp_path, "--map", "2x2", "--map-area", "0,0,1,1"])
    assert code == 2 and "--map needs an XY plate" in stderr


# --- the README ---------------------------------------------------------------------------------

def test_readme_tiling_loop_runs_on_the_simulator(capsys: pytest.CaptureFixture[str]) -> None:
    """The README's tiling loop, exactly as printed there."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- tiling-loop -->\s*```python\n(.*?)```", text, re.S)
    assert found, "the README's tiling loop (marked <!-- tiling-loop -->) is missing"
    scope: dict[str, Any] = {}
    exec(compile(found.group(1), "README.md", "exec"), scope)  # noqa: S102 - our own README
    tiles = scope["tiles"]
    assert len(tiles) >= 20 and all(t.ndim == 2 for t in tiles.values())
    fmap, camera = scope["fmap"], scope["camera"]
    # every tile was taken at the surface's focus: within 1.5 um of the slide's true focal plane
    for (x, y), _ in tiles.items():
        assert abs(fmap.z_at(x, y) - camera.slide.z_mm(x, y)) < 1.5e-3


def test_cli_map_shows_a_progress_bar_per_point(capfd: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # as on a terminal
    code, stdout, stderr = call_main(capfd, [*CLI, "--map", "2x2", "--map-area", "44,33,48,36"])
    assert code == 0 and "focus map 2x2" in stdout
    # tqdm's bar, counted in points, each with where it was and what it found
    assert re.search(r"focus map: +\d+%.*[1-4]/4 \[.*point/s, \(4[48], 3[36]\) focused, \d+ frames", stderr), stderr
