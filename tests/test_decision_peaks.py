"""The decision, peaks and dips: every significant peak and dip of the curve, --peak, and the dusty simulated
specimen (cells plus dust on the coverslip 0.17 mm above them)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import autofocus
from autofocus import Sample

GRID = [round(10 + i * 0.01, 9) for i in range(81)]
SIM = ["--simulate", "--sim-time-scale", "0", "--sim-size", "640x400"]


def curve(y: np.ndarray) -> list[Sample]:
    return [Sample(z, float(v)) for z, v in zip(GRID, y)]


def bump(center: int, width: float, height: float) -> np.ndarray:
    i = np.arange(81)
    return height * np.exp(-0.5 * ((i - center) / width) ** 2)


def test_one_peak_is_one_peak_and_no_dip() -> None:
    samples = curve(1 + bump(40, 3, 1.0))
    peaks = autofocus.find_peaks(samples, 0.05)
    assert [p.z_mm for p in peaks] == [GRID[40]] and peaks[0].fit_mm == pytest.approx(GRID[40], abs=1e-6)
    assert autofocus.find_dips(samples, 0.05) == []


def test_two_peaks_and_the_dip_between_them() -> None:
    samples = curve(1 + bump(20, 2, 1.0) + bump(60, 2, 0.5))
    peaks = autofocus.find_peaks(samples, 0.05)
    assert [p.z_mm for p in peaks] == [GRID[20], GRID[60]]
    assert peaks[1].prominence == pytest.approx(0.5, abs=0.01)  # above the valley, not the median
    dips = autofocus.find_dips(samples, 0.05)
    assert len(dips) == 1 and GRID[25] < dips[0].z_mm < GRID[55]
    assert autofocus.find_peaks(samples, 0.6) == [peaks[0]]  # the smaller one is within the noise rule


def test_a_v_shaped_curve_is_a_dip_fitted_at_its_minimum() -> None:
    v = 1 + 0.02 * np.abs(np.arange(81) - 40.3)
    dips = autofocus.find_dips(curve(v), 0.05)
    assert len(dips) == 1 and dips[0].z_mm == GRID[40]
    assert dips[0].fit_mm is not None and abs(dips[0].fit_mm - (10 + 0.403)) < 0.005


def test_noise_alone_has_no_significant_peak_or_dip(verdicts_only: None) -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        samples = curve(1 + 0.01 * rng.standard_normal(81))
        verdict = autofocus.decide(samples, GRID).verdict
        assert autofocus.find_peaks(samples, verdict.threshold) == []
        assert autofocus.find_dips(samples, verdict.threshold) == []


@pytest.mark.parametrize("policy, start, expected", [("sharpest", 0.0, 10.2), ("lowest", 0.0, 10.2),
                                                     ("highest", 0.0, 10.6), ("nearest", 10.55, 10.6),
                                                     ("nearest", 10.1, 10.2)])
def test_choose_peak(policy: str, start: float, expected: float) -> None:
    peaks = [autofocus.Extremum(10.2, 5.0, 3.0, None), autofocus.Extremum(10.6, 2.0, 1.0, None)]
    assert autofocus.choose_peak(peaks, policy, start).z_mm == expected


# --- end to end on the dusty specimen ---------------------------------------------------------------

@pytest.mark.parametrize("policy, plane", [("sharpest", 12.51), ("highest", 12.51), ("lowest", 12.34)])
def test_dusty_specimen_peak_choice(policy: str, plane: float, capsys: pytest.CaptureFixture[str]) -> None:
    # The dust (0.17 mm above the cells at 12.34) gives the sharper peak: the default picks it,
    # --peak lowest the specimen.
    code = autofocus.main(["11.8", "12.8", "0.05", *SIM, "--sim-specimen", "dusty", "--peak", policy, "--json"])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert code == 0 and abs(out["best_mm"] - plane) <= 0.05 / 4
    assert [round(p["z_mm"], 2) for p in out["peaks"]] == [12.35, 12.5]
    assert "note: 2 significant peaks, at 12.3500, 12.5000 mm: dust above the specimen" in captured.err
    assert ("picks another" in captured.err) and (("--peak lowest" in captured.err) == (policy != "lowest"))


def test_peak_needs_the_sweep(capsys: pytest.CaptureFixture[str]) -> None:
    code = autofocus.main(["11.8", "12.8", "0.05", *SIM, "--peak", "lowest", "--search", "fast"])
    assert code == 2 and "only a sweep measures" in capsys.readouterr().err


def test_one_clean_peak_prints_no_note(capsys: pytest.CaptureFixture[str]) -> None:
    assert autofocus.main(["11.8", "12.8", "0.05", *SIM]) == 0
    assert "note:" not in capsys.readouterr().out
