"""Issue 12 (transparent specimens): the simulator's phase object and --transparent."""
from __future__ import annotations

import json

import numpy as np
import pytest

import autofocus

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


def test_the_phase_object_has_no_contrast_at_focus_most_at_a_few_dof_and_fades_beyond() -> None:
    optics = autofocus.SimOptics(**autofocus.objective_optics("40x"), specimen="transparent", width=320, height=200,
                                 photons=1e6)
    stage = autofocus.SimStage(timing=autofocus.SimTiming(scale=0.0))
    camera = autofocus.SimCamera(stage, optics, autofocus.SimTiming(scale=0.0))
    dof_mm = optics.depth_of_field_um / 1000

    def contrast(dz_dof: float) -> float:
        stage.move_to(optics.focus_mm + dz_dof * dof_mm)
        return autofocus.METRICS["normvar"](camera.capture(), 9)

    at_focus, near, far = contrast(0), max(contrast(1), contrast(-1)), contrast(20)
    assert at_focus < near / 20  # ~zero at focus (photon noise only)
    assert far < near / 3  # the condenser's partial coherence fades it farther out
    above, below = (camera.render(optics.focus_mm + s * dof_mm).astype(float) for s in (1, -1))
    assert np.corrcoef((above - above.mean()).ravel(), (below - below.mean()).ravel())[0, 1] < -0.5  # sign flips


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
