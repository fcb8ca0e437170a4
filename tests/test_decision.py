"""The decision (``decide``): the verdict, the chosen peak, the sub-step fit and its honest error bar.

Each rule is pinned on synthetic curves (and a few small simulator runs): the noise estimate and the
false-peak bound on dense and on sparse, selected frames; a warming lamp; a peak one frame wide; two
peaks with --peak; the edge rule and its suggested range; sub-step accuracy off the grid without a
Gaussian peak; the fine and the coarse scale; --objective's STEP advice; the contrast minimum of a
transparent specimen.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

import autofocus
from autofocus import Sample

STEP = 0.01
GRID = [round(10 + i * STEP, 9) for i in range(81)]
SIM = ["--simulate", "--sim-time-scale", "0", "--sim-size", "320x200"]
RANGE = (GRID[0], GRID[-1])


def curve(y: np.ndarray, grid: list[float] = GRID) -> list[Sample]:
    return [Sample(z, float(v)) for z, v in zip(grid, y)]


def fast_like(scores: np.ndarray, coarse: np.ndarray | None = None) -> list[Sample]:
    """The frames a fast search takes on this grid: every 8th position, plus the best one's
    neighbourhood (5 positions) -- a sparse curve with a dense cluster at its peak."""
    top = int(np.argmax(scores))
    idx = sorted(set(range(0, 81, 8)) | {80} | {j for j in range(top - 2, top + 3) if 0 <= j < 81})
    return [Sample(GRID[i], float(scores[i]), None if coarse is None else float(coarse[i])) for i in idx]


def gaussian(center: float, width_steps: float, height: float, base: float = 1.0) -> np.ndarray:
    z = np.array(GRID)
    return base + height * np.exp(-0.5 * ((z - center) / (width_steps * STEP)) ** 2)


# --- the statistics -----------------------------------------------------------------------------------

def test_student_t_tails() -> None:
    assert autofocus.student_t_sf(12.706, 1) == pytest.approx(0.025, rel=1e-3)
    assert autofocus.student_t_sf(2.015, 5) == pytest.approx(0.05, rel=1e-3)
    assert autofocus.student_t_isf(0.05, 5) == pytest.approx(2.015, rel=1e-3)
    assert autofocus.student_t_isf(1e-6, 1e6) == pytest.approx(4.753, rel=1e-2)  # ~ the normal's (1000 dof)
    assert autofocus.student_t_isf(1e-6, 3) > 10 * autofocus.student_t_isf(1e-6, 1e6) / 1.7  # few dof: far wider


def test_the_noise_estimate_counts_its_degrees_of_freedom() -> None:
    rng = np.random.default_rng(3)
    noise = autofocus.estimate_noise(np.array(GRID), 1 + 0.01 * rng.standard_normal(81))
    assert 0.008 < noise.sigma < 0.012
    # Neighbouring second-difference residuals share frames: m of them carry ~0.51 m dof.
    assert noise.dof == pytest.approx(0.514 * noise.residuals, rel=0.05)


def test_a_lone_high_frame_is_noise_not_a_peak_to_leave_out() -> None:
    # Leaving every frame above 3 sigma out of the noise estimate would shrink it exactly when the
    # noise has thrown up large values (a blank 160x100 field was called focused that way).
    rng = np.random.default_rng(9)
    y = 1 + 0.01 * rng.standard_normal(81)
    y[20], y[60] = 1.06, 1.045  # the highest frame and a lone 4.5-sigma one elsewhere
    noise = autofocus.estimate_noise(np.array(GRID), y)
    assert not noise.off_peak[20] and noise.off_peak[60]
    y[61] = 1.045  # two high frames side by side: a peak of its own
    assert not autofocus.estimate_noise(np.array(GRID), y).off_peak[60]


# --- blank fields: never focused -----------------------------------------------------------------------

def test_noise_on_sparse_selected_frames_is_never_a_peak(verdicts_only: None) -> None:
    # The selection bias of a fast search: its dense cluster sits at the highest of 81 noise values,
    # and only ~7 residuals measure the noise.  The earlier rule (sqrt(2 ln n) + 3 sigma, noise raised
    # by 1.64/sqrt(m)) called ~1% of these focused.
    rng = np.random.default_rng(20)
    verdicts = [autofocus.decide(fast_like(1 + 0.01 * rng.standard_normal(81)), GRID).verdict.kind
                for _ in range(600)]
    assert verdicts.count("focused") == 0


class NoiseCamera:
    """An 8x8 frame (the smallest the tool scores) whose value is fresh Gaussian noise (a blank field), optionally times a lamp."""

    def __init__(self, seed: int, lamp: object = None) -> None:
        self.rng, self.lamp, self.k = np.random.default_rng(seed), lamp, 0

    def capture(self) -> np.ndarray:
        gain = 1.0 if self.lamp is None else self.lamp(self.k)  # type: ignore[operator]
        self.k += 1
        return np.full((8, 8), 100.0 * (1 + 0.01 * self.rng.standard_normal()) / gain, np.float32)


class ValueScorer(autofocus.Scorer):
    def __call__(self, image: np.ndarray) -> float:
        return float(image[0, 0])

    def coarse(self, image: np.ndarray) -> float:
        return float(image[0, 0])


@pytest.mark.parametrize("search", ["sweep", "fast"])
def test_a_warming_lamp_on_a_blank_field_is_never_focused(search: str) -> None:
    # A blank field's score follows the lamp (shot noise relative to the light): a lamp warming up
    # by 10% over the first third of the run makes a monotonic curve in time -- in z for a sweep,
    # interleaved for a fast search.  It may read as edge; never as focused.
    verdicts = []
    for seed in range(25):
        stage = autofocus.SimStage(travel_mm=(0, 25), timing=autofocus.SimTiming(scale=0.0))
        camera = NoiseCamera(seed, lambda k: 1.0 - 0.10 * math.exp(-k / 25.0))
        plan = autofocus.Plan(tuple(GRID), search)
        verdicts.append(autofocus.run_autofocus(stage, camera, ValueScorer(), plan).verdict.kind)
    assert "focused" not in verdicts


def test_a_monotonic_drift_is_edge_or_nothing(verdicts_only: None) -> None:
    rng = np.random.default_rng(5)
    for _ in range(200):
        y = 1 + 0.1 * np.exp(-np.arange(81) / 25.0) + 0.01 * rng.standard_normal(81)
        for samples in (curve(y), fast_like(y)):
            decision = autofocus.decide(samples, GRID)
            assert decision.verdict.kind in ("edge", "no_peak")
            if decision.verdict.kind == "edge":
                assert "low end" in decision.verdict.reason  # the side it rises toward


def test_the_simulated_blank_field_with_a_flickering_lamp_is_never_focused() -> None:
    for seed in range(3):
        for search in ("sweep", "fast"):
            stage, camera = autofocus.simulated_microscope(specimen="blank", width=160, height=100, time_scale=0,
                                                           seed=seed, start_mm=10)
            rng = np.random.default_rng(seed)
            camera.lamp = lambda k: 1 + rng.uniform(-0.03, 0.03)
            assert autofocus.focus(stage, camera, 10, 14, 0.05, search=search).verdict.kind == "no_peak"


# --- peaks ------------------------------------------------------------------------------------------------

def pearson(x: np.ndarray, centre: float, width: float, m: float) -> np.ndarray:
    return (1 + ((x - centre) / width) ** 2 / m) ** -m


@pytest.mark.parametrize("shape", ["gaussian blur (m=2)", "lorentzian (m=1)", "flat top"])
def test_off_grid_peaks_of_any_shape_are_found_to_a_twentieth_of_a_step(shape: str) -> None:
    # STEP ~ one depth of field: a peak about one STEP wide on a floor, noise 0.2% of its height.
    # The earlier 3-point log-parabola (a Gaussian) was off by 0.1-0.3 STEP on such peaks.
    rng = np.random.default_rng(7)
    x = np.arange(81, dtype=float)
    errors, covered = [], []
    for offset in np.linspace(-0.45, 0.45, 10):
        centre = 40 + offset
        peak = {"gaussian blur (m=2)": pearson(x, centre, 0.7, 2.0), "lorentzian (m=1)": pearson(x, centre, 0.5, 1.0),
                "flat top": np.exp(-np.abs((x - centre) / 0.8) ** 2.5)}[shape]
        y = 0.05 + peak + 0.002 * rng.standard_normal(81)
        decision = autofocus.decide(curve(y), GRID)
        assert decision.verdict.kind == "focused"
        error = abs(decision.target_mm - (10 + centre * STEP)) / STEP
        errors.append(error)
        covered.append(error <= decision.uncertainty_mm / STEP)
        assert decision.uncertainty_mm / STEP <= 0.35
    assert np.median(errors) <= 0.05 and max(errors) <= 0.15
    assert sum(covered) >= 8  # a ~90% interval


@pytest.mark.parametrize("defocus", ["gaussian", "pillbox"])
@pytest.mark.parametrize("search", ["sweep", "fast"])
def test_off_grid_focus_on_the_simulator_under_both_defocus_models(defocus: str, search: str) -> None:
    step = 0.01  # 10x/0.25: one depth of field
    for offset in (0.31, -0.37):
        focus_mm = 10.4 + offset * step
        stage, camera = autofocus.simulated_microscope(objective="10x", defocus=defocus, photons=3000, width=320,
                                                       height=200, time_scale=0, focus_mm=focus_mm, start_mm=10)
        result = autofocus.focus(stage, camera, 10, 10.8, step, search=search)
        assert result.verdict.kind == "focused"
        assert abs(result.best_mm - focus_mm) <= 0.15 * step
        assert result.uncertainty_mm is not None and result.uncertainty_mm <= 0.35 * step


def test_a_peak_one_frame_wide_gets_half_a_step_and_a_note() -> None:
    rng = np.random.default_rng(2)
    y = 1 + 0.01 * rng.standard_normal(81)
    y[37] += 1.0  # its neighbours stay at the floor: the peak is narrower than STEP
    decision = autofocus.decide(curve(y), GRID)
    assert decision.verdict.kind == "focused" and decision.verdict.narrow
    assert decision.target_mm == GRID[37] and decision.uncertainty_mm >= STEP / 2
    assert any("one frame wide" in note and "narrower than STEP" in note for note in decision.notes)
    wide = y.copy()
    wide[36] += 0.5  # a neighbour clearly above the floor: resolved
    assert not autofocus.decide(curve(wide), GRID).verdict.narrow


def test_a_weak_peak_one_frame_wide_is_still_one_frame_wide() -> None:
    # Ten sigma above a flat floor, its neighbours only noise: a noisy neighbour may exceed a tenth
    # of so small a peak, yet it shows nothing of it.  Almost every run: the best frame, +-STEP/2.
    flagged = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        y = 1 + 0.01 * rng.standard_normal(81)
        y[40] += 0.10
        decision = autofocus.decide(curve(y), GRID)
        assert decision.verdict.kind == "focused"
        if any("one frame wide" in note for note in decision.notes):
            flagged += 1
            assert decision.target_mm == GRID[40] and decision.uncertainty_mm >= STEP / 2 - 1e-9
    assert flagged >= 36  # the neighbour quantile (NEIGHBOUR_RATE) misses ~2% on each side


def test_a_sharp_peak_on_a_broad_pedestal_is_narrower_than_step() -> None:
    # A sharp specimen's score: a cusp a fraction of STEP wide on the broad pedestal of its blurred
    # structure.  The pedestal lifts both neighbours above a tenth of the peak's height, but each
    # rises little above the frame beyond it: the frames see a point of the peak, not its shape.
    rng = np.random.default_rng(5)
    x = np.arange(81, dtype=float)

    def pedestal_and_cusp(centre: float, cusp_steps: float) -> list[Sample]:
        y = 1 + 0.15 * np.exp(-0.5 * ((x - centre) / 16) ** 2) + np.exp(-np.abs(x - centre) / cusp_steps)
        return curve(y + 0.001 * rng.standard_normal(81))

    for offset in (-0.2, 0.0, 0.2):  # next to nothing of the cusp beside the best frame: that frame, +-STEP/2
        decision = autofocus.decide(pedestal_and_cusp(40 + offset, 0.12), GRID)
        assert decision.verdict.kind == "focused" and decision.verdict.narrow
        assert any("narrower than STEP" in note for note in decision.notes)
        assert decision.target_mm == GRID[40] and decision.uncertainty_mm >= STEP / 2 - 1e-9
    for offset in (-0.1, 0.0, 0.1):  # its flanks a few % beside it: narrower than STEP, fitted
        centre = 40 + offset
        decision = autofocus.decide(pedestal_and_cusp(centre, 0.35), GRID)
        assert decision.verdict.kind == "focused" and decision.verdict.narrow
        assert any("narrower than STEP" in note and "frame beyond" in note for note in decision.notes)
        assert decision.uncertainty_mm >= autofocus.FIT_SHARP_FLOOR * STEP - 1e-12
        assert abs(decision.target_mm - (10 + centre * STEP)) <= decision.uncertainty_mm
        # STEP is already the objective's depth of field: the note names a finer one, not that again.
        with_dof = autofocus.decide(pedestal_and_cusp(centre, 0.35), GRID, depth_of_field_um=STEP * 1000)
        assert any("with STEP 0.003 mm" in note for note in with_dof.notes), with_dof.notes


def with_finer(shape, centre: float, noise: float, rng: np.random.Generator) -> tuple[list[Sample], autofocus.Decision]:
    """The grid's frames of ``shape`` (of the offset from ``centre``, in STEPs), and the decision
    after also measuring what it asks for off the grid (``finer_mm``), as the fast search does."""
    x = np.arange(81, dtype=float)
    grid_only = curve(1 + np.array([shape(v - centre) for v in x]) + noise * rng.standard_normal(81))
    first = autofocus.decide(grid_only, GRID)
    finer = [Sample(z, float(1 + shape((z - 10) / STEP - centre) + noise * rng.standard_normal()))
             for z in first.finer_mm]
    return grid_only + finer, first


def cusp(d: float) -> float:
    return math.exp(-abs(d) / 0.25)


def test_frames_half_a_step_off_the_grid_refine_the_fit_never_the_verdict() -> None:
    # A cusp a quarter STEP wide, its top between two grid frames: the decision asks for the frames
    # half a STEP either side of the best one, and fits them.
    for centre in (40.3, 40.38, 39.62):
        samples, before = with_finer(cusp, centre, 0.002, np.random.default_rng(7))
        best = before.best.z_mm
        assert before.finer_mm == (round(best - STEP / 2, 9), round(best + STEP / 2, 9))
        after = autofocus.decide(samples, GRID)
        truth = 10 + centre * STEP
        assert after.verdict == before.verdict and after.more_mm == before.more_mm and after.notes == before.notes
        assert after.finer_mm == ()  # measured: nothing more to ask for
        assert abs(after.target_mm - truth) < min(0.03 * STEP, abs(before.target_mm - truth))
        assert abs(after.target_mm - truth) <= 1.5 * after.uncertainty_mm  # a ~90 % interval of the right size
        assert after.uncertainty_mm < before.uncertainty_mm
        assert after.uncertainty_mm >= autofocus.FIT_SHARP_FLOOR * STEP / 2 - 1e-12  # the shape, still unknown
        assert after.best.score == max(s.score for s in samples)


def test_half_step_frames_only_for_a_narrow_peak_the_grid_cannot_place() -> None:
    rng = np.random.default_rng(3)
    x = np.arange(81, dtype=float)
    # A broad noisy peak: its error bar is wide (noise), but its neighbours stand near its top.  It
    # asks for nothing, and frames off the grid given anyway leave its answer as the grid's.
    for seed in range(6):
        y = 1 + np.exp(-0.5 * ((x - 40.3) / 2.4) ** 2) + 0.05 * np.random.default_rng(seed).standard_normal(81)
        before = autofocus.decide(curve(y), GRID)
        assert before.uncertainty_mm > autofocus.HALF_STEP_ABOVE * STEP and before.finer_mm == ()
        best = before.best.z_mm
        extra = [Sample(round(best + d * STEP, 9), float(1 + np.exp(-0.5 * ((best - 10) / STEP + d - 40.3) ** 2 / 2.4 ** 2)))
                 for d in (-0.5, 0.5)]
        after = autofocus.decide(curve(y) + extra, GRID)
        assert (after.verdict, after.target_mm, after.uncertainty_mm) == (before.verdict, before.target_mm, before.uncertainty_mm)
    # A narrow peak the grid already places well (a Gaussian 0.6 STEP wide, the focus on a frame).
    y = 1 + np.exp(-0.5 * ((x - 40.0) / 0.6) ** 2) + 0.001 * rng.standard_normal(81)
    decision = autofocus.decide(curve(y), GRID)
    assert decision.uncertainty_mm < autofocus.HALF_STEP_ABOVE * STEP and decision.finer_mm == ()
    # Frames sparse around a narrow peak: the grid neighbours first (more_mm), half steps after.
    sparse = [s for k, s in enumerate(curve(1 + np.exp(-np.abs(x - 40.4) / 0.25))) if k % 4 == 0]
    decision = autofocus.decide(sparse, GRID)
    assert decision.more_mm and decision.finer_mm == ()
    # A one-frame peak asks for them (its error bar is STEP/2).  Half-STEP frames that show it make
    # it a peak narrower than STEP, fitted, with at least the sharp floor at their spacing; frames
    # at the floor leave it one frame wide: the best frame, +-STEP/2.
    y = 1 + 0.01 * rng.standard_normal(81)
    y[40] += 1.0
    assert autofocus.decide(curve(y), GRID).finer_mm == (10.395, 10.405)
    after = autofocus.decide(curve(y) + [Sample(10.395, 1.3), Sample(10.405, 1.5)], GRID)
    assert after.verdict.narrow and autofocus.FIT_SHARP_FLOOR * STEP / 2 - 1e-12 <= after.uncertainty_mm < STEP / 2
    assert 10.4 < after.target_mm < 10.405
    assert any("narrower than STEP" in note and f"of {after.target_mm:.4f} mm" in note for note in after.notes)
    assert not any("one frame wide" in note for note in after.notes)
    still = autofocus.decide(curve(y) + [Sample(10.395, 1.004), Sample(10.405, 0.998)], GRID)
    assert still.target_mm == 10.4 and still.uncertainty_mm >= STEP / 2 - 1e-12
    assert any("one frame wide" in note for note in still.notes)


@pytest.mark.parametrize("noise", [0.0, 0.01, 0.04])
def test_a_broad_peak_sampled_finely_is_never_narrower_than_step(noise: float) -> None:
    # Its neighbours lie close to its top however flat and noisy its sides: not narrow, and its
    # error bar is the fit's (an oversampled run must not be told to use a finer STEP, nor snap to a
    # frame with +-STEP/2).
    x = np.arange(81, dtype=float)
    for seed in range(8):
        rng = np.random.default_rng(seed)
        for sigma_steps in (2, 4, 8, 14, 20):
            y = 1 + np.exp(-0.5 * ((x - 40.3) / sigma_steps) ** 2) + noise * rng.standard_normal(81)
            decision = autofocus.decide(curve(y), GRID)
            assert decision.verdict.kind == "focused" and not decision.verdict.narrow, (seed, sigma_steps)
            assert not any("narrower than STEP" in note for note in decision.notes)
            assert decision.uncertainty_mm >= decision.fit.uncertainty_mm - 1e-12  # never below what the fit allows


def two_peaks() -> np.ndarray:
    x = np.arange(81, dtype=float)
    return 1 + pearson(x, 20.3, 2, 2) + 0.6 * pearson(x, 60.2, 2, 2) + 0.002 * np.random.default_rng(1).standard_normal(81)


@pytest.mark.parametrize("policy, start, expected", [("sharpest", None, 20.3), ("lowest", None, 20.3),
                                                     ("highest", None, 60.2), ("nearest", 10.55, 60.2)])
def test_two_peaks_and_the_peak_policy(policy: str, start: float | None, expected: float) -> None:
    decision = autofocus.decide(curve(two_peaks()), GRID, peak=policy, start_mm=start)  # type: ignore[arg-type]
    assert decision.verdict.kind == "focused" and len(decision.peaks) == 2
    assert abs(decision.target_mm - (10 + expected * STEP)) < 0.1 * STEP
    assert decision.best in [autofocus.Sample(p.z_mm, p.score) for p in decision.peaks]  # the fields agree
    (chosen,) = [p for p in decision.peaks if p.z_mm == decision.best.z_mm]  # ... and its entry is the answer
    assert (chosen.fit_mm, chosen.uncertainty_mm) == (decision.target_mm, decision.uncertainty_mm)
    if policy in ("lowest", "highest", "nearest"):
        assert f"--peak {policy}" in decision.verdict.reason


def test_an_edge_peak_chosen_by_the_policy_is_an_edge_with_its_own_range_and_reason() -> None:
    # Rising to the low end (a focus below the range) and a real peak inside: --peak lowest picks
    # the low end -- an edge there, its suggestion around the low end and its reason saying so;
    # --peak highest the inner one, focused.
    x = np.arange(81, dtype=float)
    y = 1 + 1.5 * np.exp(-x / 6) + pearson(x, 50.4, 2, 2) + 0.002 * np.random.default_rng(4).standard_normal(81)
    lowest = autofocus.decide(curve(y), GRID, peak="lowest")
    assert lowest.verdict.kind == "edge" and lowest.target_mm == GRID[0]
    assert "low end" in lowest.verdict.reason and "--peak lowest" in lowest.verdict.reason
    lo, hi = lowest.verdict.suggestion_mm
    assert lo < GRID[0] < hi
    assert lowest.uncertainty_mm is None
    highest = autofocus.decide(curve(y), GRID, peak="highest")
    assert highest.verdict.kind == "focused" and abs(highest.target_mm - 10.504) < 0.1 * STEP
    # --transparent: the same words for the contrast minimum, pointing the same way.
    transparent = autofocus.decide(curve(y), GRID, peak="lowest", transparent=True)
    assert "contrast is still falling at the low end" in transparent.verdict.reason


def test_a_suggested_range_stays_where_the_stage_may_go() -> None:
    x = np.arange(81, dtype=float)
    y = 1 + np.exp(-(80 - x) / 6) + 0.002 * np.random.default_rng(4).standard_normal(81)  # rises to the high end
    free = autofocus.decide(curve(y), GRID).verdict
    assert free.kind == "edge" and free.suggestion_mm == (10.4, 11.2)
    clipped = autofocus.decide(curve(y), GRID, allowed_mm=(0, 11.0)).verdict
    assert clipped.suggestion_mm == (10.4, 11.0)
    at_limit = autofocus.decide(curve(y), GRID, allowed_mm=(0, 10.8)).verdict
    assert at_limit.suggestion_mm is None and "highest allowed position (10.8 mm" in at_limit.reason


def test_the_cli_never_suggests_a_range_beyond_the_soft_limit(capsys: pytest.CaptureFixture[str]) -> None:
    code = autofocus.main(["11.9", "12.3", "0.02", *SIM, "--z-max", "12.3", "--json"])  # focus 12.34: beyond
    out = json.loads(capsys.readouterr().out)
    assert code == autofocus.EXIT_EDGE
    assert out["suggested_range_mm"] is None or out["suggested_range_mm"][1] <= 12.3


# --- the answer's fields, the CLI and the API --------------------------------------------------------------

def test_summary_and_json_carry_the_error_bar(capsys: pytest.CaptureFixture[str]) -> None:
    code = autofocus.main(["12.0", "12.7", "0.01", *SIM, "--json"])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert code == 0 and 0 < out["uncertainty_mm"] < 0.0035
    assert abs(out["best_mm"] - 12.34) <= out["uncertainty_mm"] * 1.5
    assert f"\N{PLUS-MINUS SIGN} {out['uncertainty_mm'] * 1000:.2g} \N{MICRO SIGN}m" in captured.err


@pytest.mark.parametrize("objective", ["40x", "60x"])
def test_a_step_far_coarser_than_the_depth_of_field_is_said_plainly(objective: str,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code = autofocus.main(["12.0", "12.7", "0.05", *SIM, "--sim-objective", objective])
    captured = capsys.readouterr()
    assert f"objective {objective}/" in captured.err and "depths of field" in captured.err
    assert "fine detail is lost in noise" not in captured.out
    if code == 0:  # a frame landed near the focus: narrower than STEP, +-25 um, the STEP to use
        assert "\N{PLUS-MINUS SIGN} 25 \N{MICRO SIGN}m" in captured.out and "narrower than STEP" in captured.out
        assert "with STEP 0.0015 mm" in captured.out
    else:  # none did: the reason names the STEP, not only a blank field
        assert code == 3 and f"use STEP {'0.0015' if objective == '40x' else '0.001'} mm" in captured.out


# --- the peak fit and the noise on simple curves ---------------------------------------------------

def gaussian_samples(center: float, zs: list[float], width: float = 0.1) -> list[Sample]:
    return [Sample(z, math.exp(-0.5 * ((z - center) / width) ** 2)) for z in zs]


def test_fit_finds_a_gaussian_peak_between_the_frames() -> None:
    fit = autofocus.fit_peak(gaussian_samples(12.337, [12.2, 12.25, 12.3, 12.35, 12.4, 12.45]))
    assert fit.used and fit.z_mm == pytest.approx(12.337, abs=0.05 * 0.05)  # within 0.05 STEP
    assert fit.uncertainty_mm is not None and abs(fit.z_mm - 12.337) <= fit.uncertainty_mm < 0.5 * 0.05


def test_fit_handles_irregular_spacing() -> None:
    fit = autofocus.fit_peak(gaussian_samples(1.03, [0.8, 0.95, 1.07, 1.3]))
    assert fit.used and fit.z_mm == pytest.approx(1.03, abs=0.01)


@pytest.mark.parametrize("shape", [-1.0, 0.0, 0.5, 1.5])
def test_one_shape_fit_is_the_weighted_least_squares_it_documents(shape: float) -> None:
    """fit_peak fits every shape at once; with one shape and one floor its answer must be the plain
    weighted least squares of g(u) on a parabola, and its interval the normal 90% one of that fit."""
    rng = np.random.default_rng(7)
    x = np.arange(-2.0, 3.0)
    noise = 0.02
    y = 0.1 + np.exp(-0.5 * ((x - 0.3) / 1.2) ** 2) + noise * rng.standard_normal(5)
    h = 0.05
    samples = [Sample(12.0 + h * k, float(v)) for k, v in zip(x, y)]
    fit = autofocus.fit_peak(samples, floor=0.1, noise=noise, shapes=(shape,))
    height = y[2] - 0.1
    u = np.maximum(y - 0.1, 0.5 * noise) / height
    sig = np.sqrt((noise / height) ** 2 + (autofocus.SCORE_SCATTER * u) ** 2)
    g = np.log(u) if shape == 0 else (u ** (-shape) - 1) / (-shape)
    root_w = 1 / (u ** (-shape - 1) * sig)
    design = np.vstack([np.ones(5), x, x * x]).T
    coef = np.linalg.lstsq(design * root_w[:, None], g * root_w, rcond=None)[0]
    cov = np.linalg.inv((design * root_w[:, None]).T @ (design * root_w[:, None]))
    grad = np.array([0.0, -1 / (2 * coef[2]), coef[1] / (2 * coef[2] ** 2)])
    lin = design @ coef
    predicted = np.exp(lin) if shape == 0 else np.where(1 - shape * lin > 0, np.abs(1 - shape * lin) ** (-1 / shape), 0)
    spread = max(1.0, float(np.sum(((u - predicted) / sig) ** 2)) / (5 - 4))
    sd = math.sqrt(float(grad @ cov @ grad) * spread + autofocus.FIT_MODEL_FLOOR ** 2)
    vertex = min(max(-coef[1] / (2 * coef[2]), -0.5), 0.5)
    assert fit.used and fit.points == 5
    assert fit.z_mm == pytest.approx(12.0 + h * vertex, abs=1e-6)
    assert fit.uncertainty_mm == pytest.approx(1.6448536 * sd * h, rel=1e-3)


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


def test_curve_noise_recovers_white_noise_sigma_despite_a_peak_and_a_trend() -> None:
    rng = np.random.default_rng(1)
    z = np.linspace(0, 4, 201)
    y = 5 + 0.3 * z + 3 * np.exp(-0.5 * ((z - 2) / 0.05) ** 2) + 0.02 * rng.standard_normal(z.size)
    sigma = autofocus.curve_noise([Sample(a, b) for a, b in zip(z, y)])
    assert 0.015 < sigma < 0.027


@pytest.mark.parametrize("seed", range(20))
def test_pure_noise_is_never_a_peak(seed: int, verdicts_only: None) -> None:
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


# --- the verdict rule: noise, the small-count bound, fine and coarse scales -----------------------

def test_a_flat_noise_free_curve_is_no_peak() -> None:
    flat = [Sample(z, 5.0) for z in GRID]
    assert autofocus.decide(flat, GRID).verdict.kind == "no_peak"
    assert autofocus.decide(fast_like(np.full(81, 5.0)), GRID).verdict.kind == "no_peak"


@pytest.mark.parametrize("sparse", [False, True], ids=["dense (sweep)", "sparse (fast)"])
def test_noise_alone_is_almost_never_a_peak(sparse: bool, verdicts_only: None) -> None:
    # The bound: Student's t at FALSE_PEAK_RATE / n (n the grid positions), with the degrees of
    # freedom the noise estimate rests on.  The sparse cluster sits at the highest of all 81 noise
    # values (a harsher choice than a real fast search makes) and its noise rests on ~7 residuals:
    # the earlier rule (sqrt(2 ln n) + 3 sigma, the noise raised by 1.64/sqrt(m)) alarmed on 1% of
    # these; this one on none.
    rng = np.random.default_rng(11)
    alarms = 0
    for _ in range(400):
        scores = 1.0 + 0.01 * rng.standard_normal(81)
        samples = fast_like(scores) if sparse else [Sample(z, float(y)) for z, y in zip(GRID, scores)]
        alarms += autofocus.decide(samples, GRID).verdict.kind != "no_peak"
    assert alarms == 0


def test_a_one_to_two_step_wide_peak_on_a_sparse_curve_is_focused_at_the_fine_scale() -> None:
    # High NA, STEP ~ one depth of field: the peak is 1-2 STEPs wide, so the coarse frames sit on
    # the baseline and only the refined frames show it -- at twice the baseline, far above noise.
    rng = np.random.default_rng(5)
    scores = gaussian(GRID[43] + 0.3 * STEP, 0.8, 1.0) + 0.01 * rng.standard_normal(81)
    samples = fast_like(scores)
    decision = autofocus.decide(samples, GRID)
    verdict = decision.verdict
    assert verdict.kind == "focused", verdict.reason
    # The noise comes from the frames off the peak: about the 0.01 put in, not the peak's curvature.
    assert verdict.noise < 0.03
    assert verdict.scale == "fine" and abs(decision.target_mm - (GRID[43] + 0.3 * STEP)) < STEP / 4


@pytest.mark.parametrize("width_steps", [6, 10])
def test_the_noise_estimate_leaves_out_the_whole_peak_not_just_three_frames(width_steps: float) -> None:
    # A broad peak (low NA, STEP << DOF): residuals on its flanks are curvature, not noise.  Leaving
    # out only the best frame and its neighbours reads ~1.9x the noise put in (0.001) here.
    scores = gaussian(GRID[40], width_steps, 1.0) + 0.001 * np.random.default_rng(0).standard_normal(81)
    noise, count = autofocus.curve_noise_and_count([Sample(z, float(y)) for z, y in zip(GRID, scores)])
    assert 0.0008 < noise < 0.0016 and count >= 30  # the 81 frames minus the peak's (all > 3 sigma up)


def test_fine_peak_is_never_overridden_by_the_coarse_scale() -> None:
    rng = np.random.default_rng(2)
    fine = gaussian(GRID[20], 1.0, 1.0) + 0.01 * rng.standard_normal(81)
    coarse = gaussian(GRID[60], 4.0, 1.0)  # the coarse score peaks elsewhere (a brighter, blurrier layer)
    samples = [Sample(z, float(f), float(c)) for z, f, c in zip(GRID, fine, coarse)]
    decision = autofocus.decide(samples, GRID)
    assert decision.verdict.scale == "fine" and abs(decision.best.z_mm - GRID[20]) < 1e-9


def test_coarse_answer_comes_from_step_spaced_frames() -> None:
    # Fine scores are noise (too few photons); the coarse score shows the peak.  The answer is the
    # coarse score's STEP-spaced frames around its peak, fitted -- not the coarse pass's 8-STEP grid.
    rng = np.random.default_rng(4)
    fine = 4.3 + 0.05 * rng.standard_normal(81)
    truth = GRID[42] + 0.35 * STEP
    coarse = gaussian(truth, 1.2, 0.3, base=0.013)
    samples = [Sample(z, float(f), float(c)) for z, f, c in zip(GRID, fine, coarse)]
    decision = autofocus.decide(samples, GRID)
    assert decision.verdict.scale == "coarse" and decision.verdict.kind == "focused"
    assert decision.fit.used and decision.fit.scale == "coarse" and abs(decision.target_mm - truth) < STEP / 4


# --- transparent specimens: the contrast minimum (--transparent) ------------------------------------

# STEP about a third of the depth of field, the range +-4 depths of field (see README, "Unstained
# specimens"): 10x/0.25 DOF 11 um, 40x/0.65 DOF 1.5 um.
CASES = {"10x": 0.003, "40x": 0.0005}


def transparent_run(objective: str, focus_mm: float, search: str, **options: object) -> autofocus.FocusResult:
    step = CASES[objective]
    stage, camera = autofocus.simulated_microscope(objective=objective, specimen="transparent", focus_mm=focus_mm,
                                                   width=640, height=400, time_scale=0, start_mm=12.34)
    return autofocus.focus(stage, camera, 12.34 - 12 * step, 12.34 + 12 * step, step, search=search, **options)


@pytest.mark.parametrize("search", ["sweep", "fast"])
@pytest.mark.parametrize("objective, offset_steps", [("10x", 0.43), ("40x", -2.6), ("40x", 0.0)])
def test_transparent_finds_the_contrast_minimum_within_a_quarter_step(objective: str, offset_steps: float,
                                                                      search: str) -> None:
    step = CASES[objective]
    focus_mm = 12.34 + offset_steps * step
    result = transparent_run(objective, focus_mm, search, transparent=True)
    assert result.verdict.kind == "focused", result.verdict.reason
    assert abs(result.best_mm - focus_mm) <= step / 4
    assert result.metric == "normvar" and result.transparent  # not edge-enhanced, by default


def test_without_transparent_a_peak_is_an_out_of_focus_image_and_the_note_says_so(
        capsys: pytest.CaptureFixture[str]) -> None:
    step = CASES["40x"]
    code = autofocus.main([str(12.34 - 30 * step), str(12.34 + 30 * step), str(step), "--simulate", "--sim-objective",
                           "40x", "--sim-specimen", "transparent", "--sim-time-scale", "0", "--sim-size", "640x400",
                           "--json"])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert code in (0, 4) and abs(out["best_mm"] - 12.34) > 2 * step  # the sharpest image is a defocused one
    assert "--transparent focuses there" in captured.err
    assert out["dips"] and abs(out["dips"][0]["z_mm"] - 12.34) <= step


def test_a_contrast_minimum_is_fitted_with_a_parabola() -> None:
    z = [10.0, 10.01, 10.02]
    samples = [autofocus.Sample(x, -((x - 10.0123) ** 2) * 1e4 - 0.5) for x in z]  # negated V: -(dz^2) - floor
    fit = autofocus.fit_peak(samples)
    assert fit.used and fit.z_mm == pytest.approx(10.0123, abs=1e-9) and "parabola" in fit.reason


def test_json_and_metric_choice(capsys: pytest.CaptureFixture[str]) -> None:
    step = CASES["40x"]
    code = autofocus.main([str(12.34 - 12 * step), str(12.34 + 12 * step), str(step), "--simulate", "--sim-objective",
                           "40x", "--sim-specimen", "transparent", "--sim-time-scale", "0", "--sim-size", "320x200",
                           "--transparent", "--metric", "brenner", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["transparent"] is True and out["metric"] == "brenner"
    assert all(score <= 0 for _, score in out["curve"])  # the curve holds -score: the minimum is its peak
