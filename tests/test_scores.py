"""Focus scores: peaked at focus for every frame type a camera delivers, and comparable within a sweep."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

import autofocus
from conftest import LEFT, RIGHT, sim_frame

DEFOCUS_MM = (-0.4, -0.2, -0.1, 0.0, 0.1, 0.2, 0.4)


def curve(metric: str, **kw: object) -> list[float]:
    scorer = autofocus.Scorer(metric)
    return [scorer(sim_frame(dz, **kw)) for dz in DEFOCUS_MM]


def peaked_at_focus(scores: list[float]) -> bool:
    """Highest at defocus 0 and falling off monotonically on both sides."""
    i0 = DEFOCUS_MM.index(0.0)
    left, right = scores[: i0 + 1], scores[i0:]
    return all(a < b for a, b in zip(left, left[1:])) and all(a > b for a, b in zip(right, right[1:]))


@pytest.mark.parametrize("metric", sorted(autofocus.METRICS))
def test_every_metric_peaks_at_focus(metric: str) -> None:
    assert peaked_at_focus(curve(metric)), metric


def test_sharper_scores_higher_than_blurred_copy() -> None:
    frame = sim_frame(0.0)
    blurred = cv2.GaussianBlur(frame, (0, 0), 2.0)
    assert autofocus.score_laplacian_variance(frame) > 2 * autofocus.score_laplacian_variance(blurred)


def test_16_bit_frames_score_like_8_bit() -> None:
    s8, s16 = curve("laplacian", bits=8), curve("laplacian", bits=16)
    assert peaked_at_focus(s16)
    # Mean normalisation makes the bit depth irrelevant: same physics, same score, up to the
    # 8-bit frame's extra quantisation noise (a few per cent at the noise floor).
    assert np.allclose(s8, s16, rtol=0.15)


def test_colour_frames_score_like_their_gray() -> None:
    gray = sim_frame(0.05)
    bgr = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    bgra = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGRA)
    one_channel = gray[:, :, None]
    ref = autofocus.score_laplacian_variance(gray)
    for image in (bgr, bgra, one_channel):
        assert autofocus.score_laplacian_variance(image) == pytest.approx(ref, rel=1e-3)


def test_photon_limited_frames_still_peak_at_focus() -> None:
    # A few hundred photons per pixel at the brightest structure: shot noise ~6% of the signal.
    assert peaked_at_focus(curve("laplacian", photons=200))


def test_insensitive_to_illumination_drift() -> None:
    frame = sim_frame(0.1).astype(np.float32)
    base = autofocus.score_laplacian_variance(frame)
    for gain in (0.8, 0.9, 1.1, 1.25):
        assert autofocus.score_laplacian_variance(frame * gain) == pytest.approx(base, rel=0.02)


def test_drift_during_a_sweep_does_not_move_the_peak() -> None:
    # Illumination ramps down by 30% over the sweep: the argmax must stay at focus.
    scorer = autofocus.Scorer()
    scores = []
    for k, dz in enumerate(DEFOCUS_MM):
        frame = sim_frame(dz).astype(np.float32) * (1.0 - 0.3 * k / (len(DEFOCUS_MM) - 1))
        scores.append(scorer(frame))
    assert int(np.argmax(scores)) == DEFOCUS_MM.index(0.0)


def test_no_per_frame_contrast_stretch() -> None:
    # A blurred frame must not be stretched back up to the contrast of a sharp one.
    sharp, blurry = sim_frame(0.0), sim_frame(0.6)
    assert autofocus.score_laplacian_variance(blurry) < 0.2 * autofocus.score_laplacian_variance(sharp)


def test_uniform_and_black_frames_score_zero() -> None:
    assert autofocus.score_laplacian_variance(np.full((64, 64), 100, np.uint8)) == pytest.approx(0.0, abs=1e-9)
    assert autofocus.score_laplacian_variance(np.zeros((64, 64), np.uint8)) == 0.0


def test_large_frames_are_binned_before_scoring() -> None:
    assert autofocus.score_binning((1200, 1920)) == 2
    assert autofocus.score_binning((600, 960)) == 1
    assert autofocus.prepare_gray(np.ones((1200, 1920), np.uint8)).shape == (600, 960)


def test_coarse_score_has_a_wider_capture_range() -> None:
    # 0.8-1.2 mm from focus the full-resolution score has sunk into its noise floor (flat),
    # while the coarse score still rises toward focus: that is what lets the fast search's
    # coarse pass step 8x wider without losing the direction to the peak.
    scorer = autofocus.Scorer()
    frames = {dz: sim_frame(dz, size=(640, 400)) for dz in (0.8, 1.2)}
    fine = {dz: scorer(f) for dz, f in frames.items()}
    coarse = {dz: scorer.coarse(f) for dz, f in frames.items()}
    assert fine[0.8] / fine[1.2] < 1.1
    assert coarse[0.8] / coarse[1.2] > 1.3


def test_bad_frame_shape_is_a_camera_error() -> None:
    with pytest.raises(autofocus.CameraError):  # the scorer checks; the pieces behind it assume a frame
        autofocus.Scorer()(np.zeros((2, 2, 2, 2), np.uint8))


@pytest.mark.parametrize("metric", ["laplacian", "tenengrad", "normvar"])
def test_isotropic_scores_score_a_transposed_frame_the_same(metric: str) -> None:
    # These three have no preferred direction (Tenengrad: both Sobel gradients): structure along
    # y counts as much as along x, so the transposed frame scores the same.
    score = autofocus.METRICS[metric]
    frame = sim_frame(0.05)
    assert score(np.ascontiguousarray(frame.T)) == pytest.approx(score(frame), rel=1e-4)


@pytest.mark.parametrize("metric", ["laplacian", "tenengrad", "vollath", "brenner"])
def test_the_blur_is_in_camera_pixels_at_every_binning(metric: str) -> None:
    # --blur covers the same area of the specimen however the frame is binned: the coarse score
    # (binned 8x on this 640x400 frame) is the score of the binned frame with the diameter divided
    # by the factor, not the camera-pixel diameter applied to binned pixels.
    frame = sim_frame(0.1, size=(640, 400))
    scorer = autofocus.Scorer(metric, blur=15)
    factor = autofocus.coarse_binning(frame.shape)
    assert factor > 2
    binned = autofocus.bin_image(frame.astype(np.float32), factor)
    diameter = max(3, round(15 / factor) | 1)
    assert diameter < 15
    score = autofocus.METRICS[metric]
    assert scorer.coarse(frame) == pytest.approx(score(binned, diameter, 1), rel=1e-6)
    assert abs(scorer.coarse(frame) / score(binned, 15, 1) - 1) > 1e-3  # the check can tell them apart


def test_tenengrad_sees_structure_that_varies_only_along_y() -> None:
    rows = (np.arange(200) // 4 % 2 * 200 + 20).astype(np.uint8)
    stripes = np.repeat(rows[:, None], 320, axis=1)  # horizontal stripes: no x gradient at all
    blurred = cv2_blur(stripes)
    score = autofocus.METRICS["tenengrad"]
    assert score(stripes, 9, 1) > 2 * score(blurred, 9, 1) > 0
    # ... and as much as the same stripes along x (without the y gradient both scores above are
    # float noise, ~1e-15, and the line above still holds).
    assert score(stripes, 9, 1) == pytest.approx(score(np.ascontiguousarray(stripes.T), 9, 1), rel=1e-4)


def cv2_blur(image: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(image, (0, 0), 3)


def test_each_frame_is_checked_once_and_only_float_frames_are_rescaled(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"frame_problem": 0, "float_in_range": 0}
    for name in calls:
        real = getattr(autofocus, name)
        monkeypatch.setattr(autofocus, name, lambda *a, _real=real, _name=name: (
            calls.__setitem__(_name, calls[_name] + 1), _real(*a))[1])
    stage, camera = autofocus.simulated_microscope(width=96, height=64, time_scale=0, start_mm=12.3)
    result = autofocus.focus(stage, camera, 12.0, 12.7, 0.05)
    # One check per frame (check_frame), one for the look before the first move; no rescaling of 8-bit frames.
    assert calls == {"frame_problem": result.frames + 1, "float_in_range": 0}

    class Float:
        def capture(self) -> np.ndarray:
            return camera.capture().astype(np.float32)

    calls.update(frame_problem=0, float_in_range=0)
    result = autofocus.focus(stage, Float(), 12.0, 12.7, 0.05)
    assert calls == {"frame_problem": result.frames + 1, "float_in_range": 2 * result.frames}  # fine + coarse


def test_roi_scores_only_the_region() -> None:
    frame = np.zeros((200, 320), np.uint8)
    frame[50:60, 200:210] = 255  # one bright square, inside the right half only
    scorer = autofocus.Scorer(roi=RIGHT)
    assert scorer(frame) > 0 and scorer.coarse(frame) > 0
    assert autofocus.Scorer(roi=LEFT)(frame) == 0 and autofocus.Scorer(roi=LEFT).coarse(frame) == 0
