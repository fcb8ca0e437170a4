"""The searches: planning the grid, the sweep and the fast search on a tiny in-memory microscope, backlash
approaches, plan safety, and both searches on the simulated microscope."""
from __future__ import annotations

import math
import time
import types

import numpy as np
import pytest

import autofocus
from autofocus import Plan, Sample
from conftest import LEFT, RIGHT, small_sim


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


def test_a_sweep_keeps_only_the_frames_in_flight() -> None:
    # A 500-step --save-images sweep held every frame (1.3 GB at 1920x1200): the search keeps each
    # PendingScore, and each kept its frame after scoring.  Frames alive at any capture: bounded.
    import gc
    import weakref

    class Tracked(np.ndarray):
        pass

    alive, most = [0], 0

    def gone() -> None:
        alive[0] -= 1

    class TrackingCamera(PeakCamera):
        def capture(self) -> np.ndarray:
            nonlocal most
            gc.collect()
            most = max(most, alive[0])
            frame = super().capture().view(Tracked)
            alive[0] += 1
            weakref.finalize(frame, gone)
            return frame

    stage = LineStage()
    result = autofocus.run_autofocus(stage, TrackingCamera(stage, 12.34), ValueScorer(),
                                     Plan(tuple(autofocus.plan_positions(10, 14, 0.05))))
    assert result.frames == 81 and most <= autofocus.IN_FLIGHT_FRAMES + 2, most


def test_each_frame_is_scored_while_the_next_is_exposed_not_during_the_stage_requests() -> None:
    """A scoring thread busy during the stage's round trips (the check, the move, its arrival) delays
    each reply on a small host; the frame waits for the next exposure to start."""
    events: list[tuple[str, float]] = []

    class LoggingStage(LineStage):
        def move_to(self, z: float) -> None:
            time.sleep(0.003)  # the stage's round trips
            super().move_to(z)
            events.append(("moved", z))

    class ExposingCamera(PeakCamera):
        def capture(self) -> np.ndarray:
            frame = super().capture()
            time.sleep(0.003)  # the exposure: the scoring thread runs now
            return frame

    class LoggingScorer(ValueScorer):
        def scores(self, frame: np.ndarray, coarse: bool) -> tuple[float, float | None]:
            events.append(("score", float(frame[0, 0])))
            return super().scores(frame, coarse)

    stage = LoggingStage(0.0)
    positions = autofocus.plan_positions(10, 10.5, 0.05)
    result = autofocus.run_autofocus(stage, ExposingCamera(stage, 10.2), LoggingScorer(), Plan(tuple(positions)))
    assert [s.z_mm for s in result.samples] == positions  # every frame scored, the last one too
    kinds = [kind for kind, _ in events]
    moved = [i for i, k in enumerate(kinds) if k == "moved"]
    scores = [i for i, k in enumerate(kinds) if k == "score"]
    assert len(moved) == len(positions) + 1 and len(scores) == len(positions)  # + the move to the answer
    for frame, at in enumerate(scores[:-1]):
        assert at > moved[frame + 1], (frame, kinds)  # not while the stage was moving to the next frame


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


class LampCamera:
    """A steady field at the lamp's level, the focus score in pixels (0, 0) and (0, 1) (for
    TwoScoreScorer: fine and coarse); the lamp steps to ``later`` from frame ``after`` on, scaling the
    score with it."""

    def __init__(self, stage: LineStage, focus: float, later: float, after: int) -> None:
        self.stage, self.focus, self.later, self.after, self.frames = stage, focus, later, after, 0

    def capture(self) -> np.ndarray:
        lamp = self.later if self.frames >= self.after else 1.0
        self.frames += 1
        frame = np.full((16, 16), 100.0 * lamp, dtype=np.float32)
        frame[0, :2] = lamp * (1 + math.exp(-0.5 * ((self.stage.position_mm() - self.focus) / 0.08) ** 2))
        return frame


@pytest.mark.parametrize("later", [1.0, 1.004, 1.05])
def test_fast_takes_a_fit_frame_again_only_when_the_light_changed_since(later: float) -> None:
    # The coarse pass (11 frames) sees one lamp level, the rest another: a coarse frame in the fit
    # window, taken long before its neighbours, no longer compares with them.  It is taken again
    # when the frames' mean level says the light changed (beyond LAMP_TOLERANCE), never otherwise.
    stage = LineStage(0.0)
    plan = Plan(tuple(autofocus.plan_positions(10, 14, 0.05)), "fast")
    result = autofocus.run_autofocus(stage, LampCamera(stage, 12.34, later, after=11), TwoScoreScorer(), plan)
    zs = [s.z_mm for s in result.samples]
    again = {z for z in zs if zs.count(z) > 1}
    assert bool(again) == (abs(later - 1) > autofocus.LAMP_TOLERANCE)
    assert all(zs.count(z) == 2 for z in again)
    for z in again:  # in the fit window, and stale: more than STALE_FRAMES older than its newest frame then
        assert abs(z - result.best_sample_mm) <= autofocus.FIT_REACH * 0.05 + 1e-9
        first, second = (k for k, q in enumerate(zs) if q == z)
        window = [k for k, q in enumerate(zs[:second]) if abs(q - result.best_sample_mm) <= 0.1 + 1e-9]
        assert first < 11 and max(window) - first > autofocus.STALE_FRAMES
    assert len(stage.commands) == result.frames + 1  # every frame one move, plus the final move
    assert result.best_mm == pytest.approx(12.34, abs=0.005)


def test_a_blank_field_under_a_drifting_lamp_takes_no_frame_again() -> None:
    # Without a peak there is nothing to fit: the halving passes end in a sweep of 81 frames, not
    # more (the light moves, but re-taking frames around a noise maximum buys nothing).
    stage, camera = autofocus.simulated_microscope(specimen="blank", width=160, height=100, time_scale=0, seed=4)
    camera.lamp = lambda k: 1 + 0.06 * math.sin(2 * math.pi * k / 50)
    result = autofocus.focus(stage, camera, 10, 14, 0.05, search="fast")
    zs = [s.z_mm for s in result.samples]
    assert result.verdict.kind == "no_peak" and len(zs) == len(set(zs)) == 81


def test_the_decision_uses_the_latest_frame_at_a_position() -> None:
    ys = 1 + np.exp(-0.5 * ((np.arange(21) - 10.3) / 1.5) ** 2)
    grid = [round(10 + 0.01 * i, 9) for i in range(21)]
    samples = [Sample(z, float(y)) for z, y in zip(grid, ys)]
    stale = [Sample(grid[11], 5.0)] + samples  # an early, brighter frame at 10.11 mm, taken again later
    assert autofocus.by_z(stale)[11] is samples[11]
    assert autofocus.decide(stale, grid).target_mm == autofocus.decide(samples, grid).target_mm


class TwoScoreCamera:
    """Frames carrying a fine score (pixel 0,0) and a coarse score (pixel 0,1) chosen apart: on a
    real specimen the binned frame sees a broader peak than the full-resolution one."""

    def __init__(self, stage: LineStage, fine, coarse) -> None:
        self.stage, self.fine, self.coarse = stage, fine, coarse

    def capture(self) -> np.ndarray:
        z = self.stage.position_mm()
        frame = np.full((8, 8), 100.0, np.float32)
        frame[0, 0], frame[0, 1] = self.fine(z), self.coarse(z)
        return frame


class TwoScoreScorer(autofocus.Scorer):
    def _fine(self, region: np.ndarray) -> float:
        return float(region[0, 0])

    def _coarse(self, region: np.ndarray) -> float:
        return float(region[0, 1])


def test_fast_climbs_to_the_top_of_the_slope_it_lands_on() -> None:
    # The coarse pass predicts 12.0, on the rising side of a fine-score peak at 12.25; a coarse
    # frame at 13.2 happens to be the run's best.  The climb must still follow its slope to the
    # local top (both neighbours lower), and then refine the run's best too: stopping where one
    # neighbour is lower would leave the peak it stood on unmeasured.
    def fine(z: float) -> float:
        return 100 + 100 * math.exp(-0.5 * ((z - 12.25) / 0.1) ** 2) + (300 if abs(z - 13.2) < 1e-6 else 0)

    def coarse(z: float) -> float:
        return 100 + 100 * math.exp(-0.5 * ((z - 12.0) / 0.5) ** 2)

    stage = LineStage()
    acq = autofocus.Acquisition(stage, TwoScoreCamera(stage, fine, coarse), TwoScoreScorer(), coarse=True)
    positions = autofocus.plan_positions(10, 14, 0.05)
    decided = types.SimpleNamespace(verdict=types.SimpleNamespace(kind="focused"), finer_mm=())  # the search alone
    autofocus.fast_search(acq, positions, lambda: decided)
    acq.drain()
    measured = set(acq.scored)
    assert {11.95, 12.0, 12.05} <= measured  # the prediction and its neighbours (sanity)
    assert {12.15, 12.2, 12.25, 12.3} <= measured  # climbed to the local top and saw it fall
    assert {13.15, 13.2, 13.25} <= measured  # and refined the run's best


class CuspCamera(PeakCamera):
    """A sharp specimen's score: a cusp exp(-|z - focus| / width), narrower than STEP when width is."""

    def capture(self) -> np.ndarray:
        z = self.stage.position_mm()
        value = 1.0 + math.exp(-abs(z - self.focus) / self.width) + self.noise * self.rng.standard_normal()
        return np.full((8, 8), value * 100.0, dtype=np.float32)


class UnitStage(LineStage, autofocus.StageDefaults):
    """A LineStage with a native unit (a Zaber axis's microstep) and, optionally, only some positions
    it has frames at (as a replay has its recorded slices)."""

    def __init__(self, unit_mm: float, only: set[float] | None = None) -> None:
        super().__init__()
        self.native_unit_mm, self.only = unit_mm, only

    def reachable(self, positions: tuple[float, ...]) -> tuple[tuple[float, ...], str | None]:
        if self.only is None:
            return positions, None
        return tuple(z for z in positions if z in self.only), "only some"


def cusp_run(search: str, stage: LineStage | None = None, focus: float = 12.372) -> autofocus.FocusResult:
    stage = stage or LineStage()
    camera = CuspCamera(stage, focus, width=0.01, noise=0.002)  # 0.44 STEP past the grid position 12.35
    plan = Plan(tuple(autofocus.plan_positions(10, 14, 0.05)), search)
    return autofocus.run_autofocus(stage, camera, ValueScorer(), plan)


def off_grid(result: autofocus.FocusResult, step: float = 0.05) -> set[float]:
    return {round(s.z_mm, 6) for s in result.samples if abs(s.z_mm / step - round(s.z_mm / step)) > 1e-6}


def test_fast_measures_half_a_step_either_side_of_a_peak_the_grid_cannot_place() -> None:
    # The STEP grid sees only the cusp's flanks: the sweep's answer is 0.06 STEP off and its error
    # bar says so (wider than HALF_STEP_ABOVE STEPs).  The fast search then measures half a STEP
    # either side of its best frame, and the decision fits those frames too.
    sweep = cusp_run("sweep")
    assert sweep.uncertainty_mm > autofocus.HALF_STEP_ABOVE * 0.05 and abs(sweep.best_mm - 12.372) > 0.05 * 0.05
    fast = cusp_run("fast")
    assert off_grid(fast) == {12.325, 12.375}
    assert fast.verdict.kind == "focused" and abs(fast.best_mm - 12.372) < 0.02 * 0.05
    assert abs(fast.best_mm - 12.372) <= fast.uncertainty_mm < autofocus.HALF_STEP_ABOVE * 0.05
    assert fast.best_sample_mm == 12.375  # the half-STEP frame is the best one, and the answer's
    assert fast.frames < 0.3 * sweep.frames
    # A peak the grid places well (a Gaussian 1.6 STEPs wide) gets no frame off the grid.
    broad, _ = run(12.372, search="fast", noise=0.002)
    assert off_grid(broad) == set() and abs(broad.best_mm - 12.372) < 0.02 * 0.05


class ShapeCamera(PeakCamera):
    """A score of any shape of the offset from focus, in STEPs of 0.05 mm."""

    def __init__(self, stage: LineStage, focus: float, shape, noise: float, seed: int) -> None:
        super().__init__(stage, focus, noise=noise, seed=seed)
        self.shape = shape

    def capture(self) -> np.ndarray:
        value = 1.0 + self.shape((self.stage.position_mm() - self.focus) / 0.05) + self.noise * self.rng.standard_normal()
        return np.full((8, 8), value * 100.0, dtype=np.float32)


@pytest.mark.parametrize("shape", [lambda d: math.exp(-abs(d) / 0.25), lambda d: math.exp(-(abs(d) / 0.6) ** 4)],
                         ids=["cusp", "flat top"])
def test_the_error_bar_with_half_step_frames_covers_the_focus(shape) -> None:
    # A flat top seen through three frames: every shape agrees on a vertex pulled toward the grid,
    # so the error bar takes in how far the grid's fit lies from it, and the sharp floor.
    rng = np.random.default_rng(4)
    covered, runs = 0, 0
    for seed, focus in enumerate(rng.uniform(11.5, 12.5, 40)):
        stage = LineStage()
        result = autofocus.run_autofocus(stage, ShapeCamera(stage, float(focus), shape, 0.02, seed), ValueScorer(),
                                         Plan(tuple(autofocus.plan_positions(10, 14, 0.05)), "fast"))
        if result.verdict.kind != "focused" or not off_grid(result):
            continue
        runs += 1
        covered += abs(result.best_mm - focus) <= result.uncertainty_mm
    assert runs >= 20 and covered / runs >= 0.85, (covered, runs)


def test_half_step_frames_only_where_the_stage_has_them() -> None:
    # In the stage's native units, at least MIN_STEP_NATIVE of them from the grid...
    fine = cusp_run("fast", UnitStage(0.0007))
    assert len(off_grid(fine)) == 2
    assert all(abs(z / 0.0007 - round(z / 0.0007)) < 1e-6 for z in off_grid(fine))
    coarse = cusp_run("fast", UnitStage(0.01))  # STEP is 5 units: half of it would be 2.5
    assert off_grid(coarse) == set() and coarse.verdict.kind == "focused"
    # ... and only where it has frames (a replay of a sweep: its recorded slices, all measured already).
    grid = set(autofocus.plan_positions(10, 14, 0.05))
    replayed = cusp_run("fast", UnitStage(0.0, only=grid))
    assert off_grid(replayed) == set() and replayed.verdict.kind == "focused"
    assert replayed.frames == coarse.frames


def test_fast_on_a_short_grid_is_a_sweep() -> None:
    result, _ = run(12.34, start=12, end=12.8, step=0.05)
    assert result.frames == 17


def test_fast_edge_and_no_peak() -> None:
    assert run(14.15, search="fast")[0].verdict.kind == "edge"
    result, stage = run(None, search="fast", noise=0.01, stage_start=2.0)
    assert result.verdict.kind == "no_peak" and stage.z == 2.0


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


# --- on the simulated microscope -----------------------------------------------------------------

@pytest.mark.parametrize("objective, step, where", [("20x", 0.004, 0.5 + 0.5 / 80), ("40x", 0.0015, 0.06),
                                                    ("40x", 0.0015, 0.5), ("60x", 0.001, 0.93)])
def test_fast_equals_sweep_at_high_na(objective: str, step: float, where: float) -> None:
    answers = {}
    for search in ("sweep", "fast"):
        focus_mm = 10 + where * 80 * step
        stage, camera = autofocus.simulated_microscope(objective=objective, photons=100, focus_mm=focus_mm,
                                                       width=320, height=200, time_scale=0, start_mm=10)
        result = autofocus.focus(stage, camera, 10, 10 + 80 * step, step, search=search)
        answers[search] = result
        assert result.verdict.kind == "focused", (search, result.verdict.reason)
        assert abs(result.best_mm - focus_mm) <= step / 4
    assert abs(answers["fast"].best_mm - answers["sweep"].best_mm) <= step / 4
    assert answers["fast"].frames < answers["sweep"].frames


class RecordingStage(autofocus.SimStage):
    def __init__(self) -> None:
        super().__init__(timing=autofocus.SimTiming(scale=0.0))
        self.targets: list[float] = []

    def move_to(self, z_mm: float) -> None:
        self.targets.append(z_mm)
        super().move_to(z_mm)


@pytest.mark.parametrize("start, end, overshoot", [(12.2, 12.5, 12.18), (12.5, 12.2, 12.52)])
def test_the_very_first_approach_with_backlash_overshoots_too(start: float, end: float, overshoot: float) -> None:
    stage = RecordingStage()
    camera = autofocus.SimCamera(stage, autofocus.SimOptics(width=64, height=48), autofocus.SimTiming(scale=0.0))
    autofocus.focus(stage, camera, start, end, 0.05, backlash_mm=0.02)
    assert stage.targets[:2] == [overshoot, start]  # from the sweep's side, even though nothing came before


# --- a region of interest picks the plane it covers ------------------------------------------------

@pytest.mark.parametrize("search, end, step", [("sweep", 12.7, 0.02), ("fast", 13.4, 0.05)])
def test_roi_picks_the_plane_of_the_region_it_covers(search: str, end: float, step: float) -> None:
    # Cells everywhere, the right half of the field 0.4 mm above the left half.
    for roi, plane in ((LEFT, 12.0), (RIGHT, 12.4)):
        stage, camera = small_sim(focus_mm=12.0, right_focus_mm=12.4, start_mm=11.9)
        result = autofocus.focus(stage, camera, 11.7, end, step, roi=roi, search=search)
        assert result.verdict.kind == "focused", (roi, result.verdict.reason)
        assert abs(result.best_mm - plane) <= step, (search, roi, result.best_mm)
        assert stage.position_mm() == result.best_mm


def test_featureless_half_is_no_peak_and_the_specimen_half_is_found() -> None:
    # The left half is an empty, evenly lit field (only noise); the right half has cells at 12.4 mm.
    options = dict(focus_mm=12.0, specimen="blank", right_specimen="cells", right_focus_mm=12.4, start_mm=11.9)
    stage, camera = small_sim(**options)
    empty = autofocus.focus(stage, camera, 11.7, 12.7, 0.02, roi=LEFT)
    assert empty.verdict.kind == "no_peak" and stage.position_mm() == 11.9  # back where it started
    stage, camera = small_sim(**options)
    found = autofocus.focus(stage, camera, 11.7, 12.7, 0.02, roi=RIGHT)
    assert found.verdict.kind == "focused" and abs(found.best_mm - 12.4) <= 0.02
