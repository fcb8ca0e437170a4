"""The simulated microscope: objectives (magnification, NA, the physical blur), the specimens, the
options it models and refuses, and its timing."""
from __future__ import annotations

import math
from pathlib import Path

import cv2
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


def test_objective_names_and_custom_objectives() -> None:
    assert autofocus.depth_of_field_um("100x") == pytest.approx(0.49, abs=0.01)
    assert autofocus.objective_optics("20x/0.75") == {"magnification": 20.0, "na": 0.75, "immersion_index": 1.0}
    assert autofocus.objective_optics("100x/1.3/oil")["immersion_index"] == 1.515
    with pytest.raises(autofocus.UsageError, match="MAGx/NA"):
        autofocus.objective_optics("20x/1.2")  # NA above air's index
    line = autofocus.objective_line("40x", 0.05)
    assert "depth of field 1.5 \N{MICRO SIGN}m" in line and "use STEP 0.0015 mm" in line


def test_pillbox_defocus_is_a_uniform_disc() -> None:
    kernel = autofocus.disc_kernel(5.0)  # 13 x 13, centre at [6, 6]
    assert kernel.sum() == pytest.approx(1.0) and kernel[6, 6] == pytest.approx(kernel[6, 8])  # flat inside
    assert 0 < kernel[6, 1] < kernel[6, 6] and kernel[6, 0] == 0 and kernel[0, 0] == 0  # a soft rim, nothing beyond
    point = np.zeros((64, 64), np.float32)
    point[32, 32] = 1.0
    disc = autofocus.blur_pillbox(point, 8.0, 0.0)
    gauss = autofocus.blur_sigma(point, 4.0)  # the same second moment
    assert disc[32, 32] < 1.5 * disc[32, 38] and gauss[32, 32] > 2 * gauss[32, 38]


@pytest.mark.parametrize("defocus", autofocus.DEFOCUS_MODELS)
def test_a_focal_plane_millimetres_away_at_high_na_renders_a_flat_field(
        defocus: str, capsys: pytest.CaptureFixture[str]) -> None:
    # 60x from a stage at 0 mm with the focus at 12.34 mm: a blur of ~10^6 pixels.  The pillbox's
    # disc was built as a kernel that size (a MemoryError), the Gaussian took a minute.
    code = autofocus.main(["10", "14", "0.05", "--simulate", "--sim-objective", "60x", "--sim-defocus", defocus,
                           "--sim-time-scale", "0", "--sim-size", "320x200"])
    captured = capsys.readouterr()
    assert code == autofocus.EXIT_NO_PEAK and "Traceback" not in captured.err
    assert "use STEP 0.001 mm" in captured.err + captured.out
    optics = autofocus.SimOptics(**autofocus.objective_optics("60x"), width=320, height=200, defocus=defocus)
    texture = optics.texture()
    far = optics.blur(texture, 12.34)
    assert far.shape == texture.shape and far.dtype == texture.dtype
    assert float(np.std(far)) < 0.02 * float(np.std(texture))
    assert float(far.mean()) == pytest.approx(float(texture.mean()), rel=0.02)
    # No step where the cap begins (a step in the curve reads as a peak in a noisy sweep): just
    # inside it the frame is the same as far beyond it.
    cap = autofocus.FLAT_BLUR_FRAMES * 320
    blur = (lambda r: autofocus.blur_pillbox(texture, r, 1.0)) if defocus == "pillbox" else \
        (lambda r: autofocus.blur_sigma(texture, r))
    assert float(np.max(np.abs(blur(0.995 * cap) - blur(50 * cap)))) < 0.001 * float(np.ptp(texture))
    # A strip of a frame (10000x16 is allowed): its short side cannot be halved away, and a disc
    # kernel of its long side would take gigabytes.
    strip = autofocus.SimOptics(**autofocus.objective_optics("60x"), width=10000, height=16, defocus=defocus)
    texture = strip.texture()
    far = strip.blur(texture, 12.34)
    assert far.shape == (16, 10000) and float(np.std(far)) < 0.02 * float(np.std(texture))


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


@pytest.mark.parametrize("options, message", [({"start_mm": 30.0}, "must start inside its travel"),
                                              ({"bit_depth": 64}, "bit_depth: 64 is not one of 8, 12, 16"),
                                              ({"focus_mm": float("inf")}, "focus_mm: inf is not a finite number")])
def test_simulator_options_outside_what_it_models_are_refused(options: dict, message: str) -> None:
    with pytest.raises(autofocus.UsageError, match=message):
        autofocus.simulated_microscope(**options)


@pytest.mark.parametrize("options, named", [
    ({"dust_height_mm": math.inf}, "dust_height_mm"), ({"condenser_na": -1}, "condenser_na"), ({"na": 0}, "na"),
    ({"magnification": 0}, "magnification"), ({"bit_depth": 8.0}, "bit_depth"), ({"read_noise_e": -1}, "read_noise_e"),
    ({"exposure_s": -0.01}, "exposure_s"), ({"poll_s": 0}, "poll_s"), ({"photons": 1e-300}, "photons"),
    ({"width": 96.0}, "width"), ({"seed": 1.5}, "seed"), ({"specimen": None}, "specimen"),
    ({"travel_mm": (25, 0)}, "travel_mm"), ({"travel_mm": (0, math.nan)}, "travel_mm"),
    ({"one_shot": "yes"}, "one_shot"), ({"camera_roi": (0, 0, 4, 4)}, "camera_roi"), ({"objective": "7x"}, "objective"),
    ({"na": 1.2}, "na 1.2 must be below immersion_index 1"), ({"time_scale": -1}, "time_scale"),
    ({"wavelength_um": 550}, "wavelength_um"), ({"start_mm": "0"}, "start_mm"),
])
def test_simulator_values_it_cannot_render_are_refused(options: dict, named: str) -> None:
    with pytest.raises(autofocus.BadValue) as caught:
        autofocus.simulated_microscope(**{"width": 96, "height": 64, "time_scale": 0, **options})
    assert str(caught.value).startswith(named)


def test_every_simulator_field_has_a_rule() -> None:
    fields = {f.name for cls in (autofocus.SimOptics, autofocus.SimTiming) for f in autofocus.dataclasses.fields(cls)}
    assert fields - {"scale"} <= set(autofocus.SIM_RULES)
    with pytest.raises(autofocus.BadValue, match="na: 0 is out of range"):  # built directly, too
        autofocus.SimOptics(na=0)
    with pytest.raises(autofocus.BadValue, match="poll_s: 0 is out of range"):
        autofocus.SimTiming(poll_s=0)
