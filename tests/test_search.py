"""The pure core: planning, the sweep and fast searches, the peak fit and the verdict."""
from __future__ import annotations

import math

import numpy as np
import pytest

import autofocus
from autofocus import Plan, Sample


# --- planning ------------------------------------------------------------------------------

def test_plan_ascending_inclusive() -> None:
    assert autofocus.plan_positions(10, 10.2, 0.05) == [10.0, 10.05, 10.1, 10.15, 10.2]


def test_plan_descending() -> None:
    assert autofocus.plan_positions(10.2, 10, 0.05) == [10.2, 10.15, 10.1, 10.05, 10.0]


def test_plan_end_off_grid_still_ends_at_end() -> None:
    assert autofocus.plan_positions(10, 10.12, 0.05) == [10.0, 10.05, 10.1, 10.12]
    assert autofocus.plan_positions(10.12, 10, 0.05) == [10.12, 10.07, 10.02, 10.0]


def test_plan_seed_example_has_81_positions_without_float_noise() -> None:
    positions = autofocus.plan_positions(10, 14, 0.05)
    assert len(positions) == 81 and positions[0] == 10.0 and positions[-1] == 14.0
    assert all(p == round(p, 9) for p in positions)
    assert np.allclose(np.diff(positions), 0.05)


def test_plan_single_position() -> None:
    assert autofocus.plan_positions(5, 5, 0.1) == [5.0]


def test_plan_rejects_non_positive_step() -> None:
    with pytest.raises(ValueError):
        autofocus.plan_positions(0, 1, 0)


# --- a tiny in-memory microscope --------------------------------------------------------------

class LineStage:
    """A stage that records every commanded position."""

    def __init__(self, start: float = 0.0, limits: tuple[float, float] = (-100.0, 100.0)) -> None:
        self.z, self.limits, self.commands, self.stops = start, limits, [], 0

    def limits_mm(self) -> tuple[float, float]:
        return self.limits

    def position_mm(self) -> float:
        return self.z

    def move_to(self, z: float) -> None:
        assert self.limits[0] <= z <= self.limits[1], z
        self.commands.append(z)
        self.z = z

    def stop(self) -> None:
        self.stops += 1


class PeakCamera:
    """Frames whose focus score is a Gaussian of z (plus optional seeded noise)."""

    def __init__(self, stage: LineStage, focus: float | None, width: float = 0.08, noise: float = 0.0,
                 seed: int = 0) -> None:
        self.stage, self.focus, self.width, self.noise = stage, focus, width, noise
        self.rng = np.random.default_rng(seed)

    def capture(self) -> np.ndarray:
        z = self.stage.position_mm()
        peak = 0.0 if self.focus is None else math.exp(-0.5 * ((z - self.focus) / self.width) ** 2)
        value = 1.0 + peak + self.noise * self.rng.standard_normal()
        return np.full((8, 8), value * 100.0, dtype=np.float32)  # the smallest frame the tool scores


class ValueScorer(autofocus.Scorer):
    """Scores a uniform 'frame' by its value; coarse score is the same."""

    def _fine(self, region: np.ndarray) -> float:
        return float(region[0, 0])

    def _coarse(self, region: np.ndarray) -> float:
        return float(region[0, 0])


def run(focus: float | None, start: float = 10, end: float = 14, step: float = 0.05, search: str = "sweep",
        noise: float = 0.0, backlash: float = 0.0, stage_start: float = 0.0, width: float = 0.08):
    stage = LineStage(stage_start)
    camera = PeakCamera(stage, focus, width=width, noise=noise)
    plan = Plan(tuple(autofocus.plan_positions(start, end, step)), search, backlash)
    result = autofocus.run_autofocus(stage, camera, ValueScorer(), plan)
    return result, stage


# --- sweep -------------------------------------------------------------------------------------

def test_sweep_visits_every_position_in_order_then_the_best() -> None:
    result, stage = run(12.34)
    positions = autofocus.plan_positions(10, 14, 0.05)
    assert stage.commands[: len(positions)] == positions
    assert [s.z_mm for s in result.samples] == positions
    assert stage.commands[-1] == result.best_mm == stage.z
    assert result.verdict.kind == "focused"
    assert abs(result.best_mm - 12.34) < 0.005  # sub-step: the Gaussian fit is exact here
    assert result.best_sample_mm == 12.35


def test_final_move_goes_to_the_best_even_downward() -> None:
    result, stage = run(11.0, start=12, end=10, step=0.1)
    assert stage.commands[0] == 12.0 and stage.commands[-2] == 10.0
    assert stage.z == result.best_mm and abs(result.best_mm - 11.0) < 0.01


def test_fit_not_trusted_moves_to_best_sample() -> None:
    # A flat-topped peak (plateau of two equal samples) fails the fit's gate.
    stage = LineStage()

    class Plateau:
        def capture(self) -> np.ndarray:
            z = stage.position_mm()
            v = 5.0 if z in (12.0, 12.1) else 1.0 + 0.001 * abs(z - 12)
            return np.full((8, 8), v, np.float32)

    plan = Plan(tuple(autofocus.plan_positions(11, 13, 0.1)))
    result = autofocus.run_autofocus(stage, Plateau(), ValueScorer(), plan)
    assert not result.fit.used and "flat top" in result.fit.reason
    assert result.best_mm == result.best_sample_mm == 12.0 == stage.z


def test_no_peak_returns_to_start_and_does_not_chase_noise() -> None:
    result, stage = run(None, noise=0.01, stage_start=3.0)
    assert result.verdict.kind == "no_peak" and result.exit_code == autofocus.EXIT_NO_PEAK
    assert stage.z == 3.0 == result.best_mm


def test_focus_outside_the_range_is_an_edge_with_a_suggestion() -> None:
    result, stage = run(14.3)
    assert result.verdict.kind == "edge" and result.exit_code == autofocus.EXIT_EDGE
    assert result.best_mm == 14.0 == stage.z
    lo, hi = result.verdict.suggestion_mm
    assert lo < 14.0 < hi and hi > 14.3
    result, _ = run(9.8)
    assert result.verdict.kind == "edge" and result.verdict.suggestion_mm[0] < 9.8


def test_backlash_final_approach_comes_from_the_sweep_direction() -> None:
    result, stage = run(12.34, backlash=0.1)
    # The last two commands: overshoot below the target, then the target, moving up like the sweep.
    assert stage.commands[-2] == pytest.approx(result.best_mm - 0.1)
    assert stage.commands[-1] == result.best_mm
    # Downward sweep: overshoot above.
    result, stage = run(12.34, start=14, end=10, backlash=0.1)
    assert stage.commands[-2] == pytest.approx(result.best_mm + 0.1)


def test_backlash_every_measurement_arrives_from_the_sweep_direction() -> None:
    result, stage = run(12.34, search="fast", backlash=0.05)
    c = stage.commands
    downward = [k for k in range(1, len(c)) if c[k] < c[k - 1]]
    assert downward, "the fast search must move back at least once"
    # Upward sweep: every move down is an overshoot, immediately followed by the approach from below.
    for k in downward:
        assert c[k + 1] == pytest.approx(c[k] + 0.05)
    assert c[-1] == result.best_mm and c[-2] < c[-1]


# --- fast search --------------------------------------------------------------------------------

@pytest.mark.parametrize("focus", [10.4, 11.57, 12.34, 13.12, 13.9])
def test_fast_finds_the_sweep_answer_in_a_quarter_of_the_frames(focus: float) -> None:
    sweep, _ = run(focus, noise=0.005)
    fast, _ = run(focus, search="fast", noise=0.005)
    assert fast.frames <= 0.25 * sweep.frames
    assert abs(fast.best_mm - focus) <= 0.05
    assert fast.verdict.kind == "focused"


def test_fast_reuses_frames_never_measures_a_position_twice() -> None:
    result, stage = run(12.34, search="fast")
    zs = [s.z_mm for s in result.samples]
    assert len(zs) == len(set(zs))
    assert len(stage.commands) == result.frames + 1  # every frame one move, plus the final move


def test_fast_on_a_short_grid_is_a_sweep() -> None:
    result, _ = run(12.34, start=12, end=12.8, step=0.05)
    assert result.frames == 17


def test_fast_edge_and_no_peak() -> None:
    assert run(14.15, search="fast")[0].verdict.kind == "edge"
    result, stage = run(None, search="fast", noise=0.01, stage_start=2.0)
    assert result.verdict.kind == "no_peak" and stage.z == 2.0


# --- peak fit -------------------------------------------------------------------------------------

def gaussian_samples(center: float, zs: list[float], width: float = 0.1) -> list[Sample]:
    return [Sample(z, math.exp(-0.5 * ((z - center) / width) ** 2)) for z in zs]


def test_fit_finds_a_gaussian_peak_between_the_frames() -> None:
    fit = autofocus.fit_peak(gaussian_samples(12.337, [12.2, 12.25, 12.3, 12.35, 12.4, 12.45]))
    assert fit.used and fit.z_mm == pytest.approx(12.337, abs=0.05 * 0.05)  # within 0.05 STEP
    assert fit.uncertainty_mm is not None and abs(fit.z_mm - 12.337) <= fit.uncertainty_mm < 0.5 * 0.05


def test_fit_handles_irregular_spacing() -> None:
    fit = autofocus.fit_peak(gaussian_samples(1.03, [0.8, 0.95, 1.07, 1.3]))
    assert fit.used and fit.z_mm == pytest.approx(1.03, abs=0.01)


@pytest.mark.parametrize(
    "samples, reason",
    [
        ([Sample(0, 1), Sample(1, 2)], "fewer than 3"),
        ([Sample(0, 3), Sample(1, 2), Sample(2, 1)], "edge"),
        ([Sample(0, 1), Sample(1, 2), Sample(2, 2)], "flat top"),
    ],
)
def test_fit_gates(samples: list[Sample], reason: str) -> None:
    fit = autofocus.fit_peak(samples)
    assert not fit.used and reason in fit.reason and fit.z_mm is None
    below = autofocus.fit_peak([Sample(0, 1), Sample(1, 2), Sample(2, 1)], floor=3.0)
    assert not below.used and "does not rise above the floor" in below.reason


@pytest.mark.parametrize("seed", range(30))
def test_a_used_fit_always_lies_between_the_best_samples_neighbours(seed: int) -> None:
    rng = np.random.default_rng(seed)
    z = np.sort(rng.uniform(0, 1, 7))
    samples = [Sample(a, b) for a, b in zip(z, rng.uniform(0.1, 1, 7))]
    fit = autofocus.fit_peak(samples)
    ordered = autofocus.by_z(samples)
    i = ordered.index(autofocus.best_sample(samples))
    if fit.used:
        assert ordered[i - 1].z_mm < fit.z_mm < ordered[i + 1].z_mm
    else:
        assert i in (0, len(ordered) - 1) or fit.z_mm is None


# --- noise and verdict ---------------------------------------------------------------------------

def test_curve_noise_recovers_white_noise_sigma_despite_a_peak_and_a_trend() -> None:
    rng = np.random.default_rng(1)
    z = np.linspace(0, 4, 201)
    y = 5 + 0.3 * z + 3 * np.exp(-0.5 * ((z - 2) / 0.05) ** 2) + 0.02 * rng.standard_normal(z.size)
    sigma = autofocus.curve_noise([Sample(a, b) for a, b in zip(z, y)])
    assert 0.015 < sigma < 0.027


@pytest.mark.parametrize("seed", range(20))
def test_pure_noise_is_never_a_peak(seed: int) -> None:
    rng = np.random.default_rng(seed)
    z = np.arange(81) * 0.05
    samples = [Sample(a, 1 + 0.01 * b) for a, b in zip(z, rng.standard_normal(z.size))]
    assert autofocus.decide(samples, z).verdict.kind == "no_peak"


def test_a_peak_three_times_the_noise_is_found_scale_free() -> None:
    rng = np.random.default_rng(3)
    z = np.arange(81) * 0.05
    for scale in (1e-6, 1.0, 1e6):  # no constant depends on the units of the score
        y = scale * (1 + 0.2 * np.exp(-0.5 * ((z - 2) / 0.1) ** 2) + 0.01 * rng.standard_normal(z.size))
        verdict = autofocus.decide([Sample(a, b) for a, b in zip(z, y)], z).verdict
        assert verdict.kind == "focused", scale
        assert verdict.prominence > verdict.threshold > 0


def test_too_few_frames_cannot_be_judged() -> None:
    verdict = autofocus.decide([Sample(0, 1), Sample(1, 5), Sample(2, 1)], [0, 1, 2]).verdict
    assert verdict.kind == "no_peak" and "at least" in verdict.reason


# --- plan safety ------------------------------------------------------------------------------------

def test_check_plan_accepts_inside_and_rejects_outside() -> None:
    plan = Plan(tuple(autofocus.plan_positions(10, 14, 0.05)))
    autofocus.check_plan(plan, (0, 25), (None, None))
    autofocus.check_plan(plan, (0, 25), (10, 14))
    with pytest.raises(autofocus.UsageError, match="soft limits"):
        autofocus.check_plan(plan, (0, 25), (None, 13.9))
    with pytest.raises(autofocus.UsageError, match="travel 0..12"):
        autofocus.check_plan(plan, (0, 12), (None, None))


def test_check_plan_includes_the_backlash_overshoot() -> None:
    plan = Plan(tuple(autofocus.plan_positions(0.02, 1, 0.05)), backlash_mm=0.05)
    assert plan.envelope_mm() == (-0.03, 1.0)
    with pytest.raises(autofocus.UsageError, match="backlash"):
        autofocus.check_plan(plan, (0, 25), (None, None))


def test_a_single_position_is_measured_once_and_cannot_be_judged() -> None:
    stage = LineStage(start=1.0)
    plan = Plan((12.0,))
    result = autofocus.run_autofocus(stage, PeakCamera(stage, 12.0), ValueScorer(), plan)
    assert [s.z_mm for s in result.samples] == [12.0] and result.frames == 1
    assert result.verdict.kind == "no_peak" and "at least 5" in result.verdict.reason
    assert stage.commands == [12.0, 1.0] and stage.z == 1.0  # measured, then back to the start
