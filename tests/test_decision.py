"""Issue 20: one decision (``decide``) with an honest error bar.

Each rule is pinned on synthetic curves (and a few small simulator runs): the false-peak bound
on sparse, selected frames; a warming lamp; a peak one frame wide; two peaks with --peak; the
edge rule and its suggested range; sub-step accuracy off the grid without a Gaussian peak; the
replay grid; --objective; the simulator's pillbox defocus and specimen image.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

import autofocus
from autofocus import Sample

STEP = 0.01
GRID = [round(10 + i * STEP, 9) for i in range(81)]
SIM = ["--simulate", "--sim-time-scale", "0", "--sim-size", "320x200"]


def curve(y: np.ndarray, grid: list[float] = GRID) -> list[Sample]:
    return [Sample(z, float(v)) for z, v in zip(grid, y)]


def fast_like(scores: np.ndarray) -> list[Sample]:
    """A fast search's frames: every 8th position, and a cluster of 5 around the highest one."""
    top = int(np.argmax(scores))
    idx = sorted(set(range(0, 81, 8)) | {80} | {j for j in range(top - 2, top + 3) if 0 <= j < 81})
    return [Sample(GRID[i], float(scores[i])) for i in idx]


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

def test_noise_on_sparse_selected_frames_is_never_a_peak() -> None:
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


def test_a_monotonic_drift_is_edge_or_nothing() -> None:
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


def test_objective_names_and_custom_objectives() -> None:
    assert autofocus.depth_of_field_um("100x") == pytest.approx(0.49, abs=0.01)
    assert autofocus.objective_optics("20x/0.75") == {"magnification": 20.0, "na": 0.75, "immersion_index": 1.0}
    assert autofocus.objective_optics("100x/1.3/oil")["immersion_index"] == 1.515
    with pytest.raises(autofocus.UsageError, match="MAGx/NA"):
        autofocus.objective_optics("20x/1.2")  # NA above air's index
    line = autofocus.objective_line("40x", 0.05)
    assert "depth of field 1.5 \N{MICRO SIGN}m" in line and "use STEP 0.0015 mm" in line


def test_replay_at_a_finer_step_keeps_to_the_recorded_slices(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert autofocus.main(["12.0", "12.7", "0.05", *SIM, "--save-images", str(tmp_path / "rec")]) == 0
    capsys.readouterr()
    code = autofocus.main(["12.0", "12.7", "0.01", "--replay", str(tmp_path / "rec"), "--json"])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    zs = [z for z, _ in out["curve"]]
    assert code == 0 and len(zs) == len(set(zs)) == 15  # each recorded slice once, never a repeat
    assert len(out["peaks"]) == 1 and "recorded every 0.05 mm" in captured.err
    # A camera asked for a position between the slices refuses rather than repeat one.
    stage, camera = autofocus.replay_microscope(tmp_path / "rec")
    stage.move_to(12.02)
    with pytest.raises(autofocus.CameraError, match="no slice was recorded at z=12.02"):
        camera.capture()


def test_snap_to_recorded() -> None:
    recorded = [0.0, 0.05, 0.1, 0.15]
    assert autofocus.snap_to_recorded([0.0, 0.05, 0.1], recorded) == ((0.0, 0.05, 0.1), None)
    positions, note = autofocus.snap_to_recorded([0.0, 0.02, 0.04, 0.06, 0.08, 0.1], recorded)
    assert positions == (0.0, 0.05, 0.1) and "recorded every 0.05 mm" in note
    positions, note = autofocus.snap_to_recorded([0.1, 0.08, 0.06], recorded)  # a downward sweep
    assert positions == (0.1, 0.05) and note


# --- the simulator's new options ----------------------------------------------------------------------------

def test_pillbox_defocus_is_a_uniform_disc() -> None:
    kernel = autofocus.disc_kernel(5.0)  # 13 x 13, centre at [6, 6]
    assert kernel.sum() == pytest.approx(1.0) and kernel[6, 6] == pytest.approx(kernel[6, 8])  # flat inside
    assert 0 < kernel[6, 1] < kernel[6, 6] and kernel[6, 0] == 0 and kernel[0, 0] == 0  # a soft rim, nothing beyond
    point = np.zeros((64, 64), np.float32)
    point[32, 32] = 1.0
    disc = autofocus.blur_pillbox(point, 8.0, 0.0)
    gauss = autofocus.blur_sigma(point, 4.0)  # the same second moment
    assert disc[32, 32] < 1.5 * disc[32, 38] and gauss[32, 32] > 2 * gauss[32, 38]


def test_a_micrograph_as_the_specimen(tmp_path: Path) -> None:
    image = (np.random.default_rng(0).uniform(0, 255, (50, 80))).astype(np.uint8)
    path = tmp_path / "cells.png"
    cv2.imwrite(str(path), image)
    stage, camera = autofocus.simulated_microscope(specimen_image=str(path), width=200, height=120, time_scale=0,
                                                   start_mm=12.34, defocus="pillbox")
    frame = camera.capture()
    assert frame.shape == (120, 200) and frame.std() > 10  # mirrored tiles fill the larger frame
    with pytest.raises(autofocus.UsageError, match="cannot be combined with specimen 'blank'"):
        autofocus.simulated_microscope(specimen_image=str(path), specimen="blank")
    with pytest.raises(autofocus.UsageError, match="specimen image .*missing.png cannot be read"):
        autofocus.simulated_microscope(specimen_image=str(tmp_path / "missing.png"))
    with pytest.raises(autofocus.UsageError, match="defocus: 'disc' is unknown; choose one of gaussian, pillbox"):
        autofocus.simulated_microscope(defocus="disc")
