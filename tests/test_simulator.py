"""The simulated microscope: objectives (magnification, NA, the physical blur), the specimens, the
options it models and refuses, and its timing."""
from __future__ import annotations

import math

import numpy as np
import pytest

import autofocus


def test_objectives_set_magnification_na_and_physical_blur() -> None:
    stage, camera = autofocus.simulated_microscope(objective="60x", width=64, height=48, time_scale=0)
    optics = camera.optics
    assert (optics.magnification, optics.na, optics.immersion_index) == (60.0, 0.85, 1.0)
    # Geometric blur from the cone's half-angle: radius = dz tan(asin(NA)), 1.61 dz at NA 0.85
    # (the small-angle NA dz would be 0.85 dz, half the blur).
    dz_mm = 0.01
    radius_px = math.tan(math.asin(0.85)) * dz_mm * 1000 / optics.sample_pixel_um
    assert optics.blur_sigma_px(dz_mm) == pytest.approx(math.hypot(radius_px / 2, optics.blur_sigma_px(0)), rel=1e-6)
    assert autofocus.SimOptics(**autofocus.objective_optics("4x")).depth_of_field_um == pytest.approx(69.65, abs=0.1)
    assert 0.8 < autofocus.SimOptics(**autofocus.objective_optics("60x")).depth_of_field_um < 1.0
    with pytest.raises(autofocus.UsageError, match="objective: '7x' is not an objective"):
        autofocus.simulated_microscope(objective="7x")


def test_cli_sim_objective(capsys: pytest.CaptureFixture[str]) -> None:
    code = autofocus.main(["12.30", "12.38", "0.001", "--simulate", "--sim-objective", "60x", "--sim-time-scale", "0",
                           "--sim-size", "320x200", "--search", "fast"])
    out = capsys.readouterr().out
    assert code == 0 and "best focus at 12.34" in out


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
