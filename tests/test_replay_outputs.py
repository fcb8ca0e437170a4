"""Issue 3: record a sweep, replay recorded stacks offline, and results people can script and plot.

Covers --save-images (lossless PNGs + a replayable stack.csv), record-then-replay, the replay layout
rules and every broken-stack error, --json (success and failure), --save-curve, --plot,
--make-figures, and the shared real stacks (skipped when ../shared is absent).
"""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

import autofocus

REPO = Path(autofocus.__file__).resolve().parent
SHARED_STACKS = REPO.parent / "shared" / "stacks"
SIM = ["--simulate", "--sim-time-scale", "0", "--sim-size", "320x200"]
JSON_KEYS = {"best_mm", "best_score", "verdict", "frames", "moves", "elapsed_s", "search", "curve", "timing"}
TIMING_KEYS = {"move_s", "capture_s", "score_s"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


###############################################################################
# Helpers #####################################################################
###############################################################################


def call_main(argv: list[str]) -> int:
    """autofocus.main, whether a usage error returns 2 or raises SystemExit(2)."""
    try:
        return autofocus.main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2


def run_json(capfd: pytest.CaptureFixture[str], argv: list[Any]) -> tuple[int, dict[str, Any], str]:
    """Run in-process with --json; stdout must be exactly one JSON object (nothing else)."""
    code = call_main([*map(str, argv), "--json"])
    cap = capfd.readouterr()
    doc = json.loads(cap.out)  # the whole of stdout: any stray human text fails here
    assert isinstance(doc, dict)
    return code, doc, cap.err


def cli(*argv: Any, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "autofocus.py", *map(str, argv)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env)


def assert_one_line_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def textured_frame(z: float, z0: float, *, shape: tuple[int, int] = (96, 128), bits: int = 8,
                   colour: bool = False, seed: int = 7) -> np.ndarray:
    """A random texture blurred by a Gaussian whose sigma grows with |z - z0|: sharpest at z0."""
    rng = np.random.default_rng(seed)
    texture = cv2.GaussianBlur(rng.random(shape).astype(np.float32), (0, 0), 1.0)
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    sigma = 0.4 + 40.0 * abs(z - z0)
    img = cv2.GaussianBlur(texture, (0, 0), sigma)
    # A little noise, different at every z (deterministic), like a camera.
    noise_rng = np.random.default_rng(int(round(z * 1e6)) + 1000 * seed)
    img = 0.2 + 0.6 * img + noise_rng.normal(0, 0.003, shape).astype(np.float32)
    full = 255 if bits == 8 else 65535
    out = np.clip(img * full, 0, full).astype(np.uint8 if bits == 8 else np.uint16)
    if colour:
        out = np.dstack([out, (out * 0.9).astype(out.dtype), (out * 0.8).astype(out.dtype)])
    return out


def write_stack(folder: Path, zs: list[float], z0: float, *, bits: int = 8, colour: bool = False,
                shuffle: bool = False, header: tuple[str, ...] = ("z_mm", "file")) -> Path:
    """A replay stack: images named by index, stack.csv with the given header (extra columns filled)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, z in enumerate(zs):
        name = f"img_{i:03d}.png"
        assert cv2.imwrite(str(folder / name), textured_frame(z, z0, bits=bits, colour=colour))
        values = {"z_mm": repr(z), "file": name}
        rows.append([values.get(col, f"extra{i}") for col in header])
    if shuffle:
        order = np.random.default_rng(3).permutation(len(rows))
        rows = [rows[k] for k in order]
    with open(folder / "stack.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return folder


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def nearest_index(zs: list[float] | np.ndarray, z: float) -> int:
    return int(np.argmin(np.abs(np.asarray(zs) - z)))


###############################################################################
# 1. --save-images: lossless PNGs and a replayable stack.csv ##################
###############################################################################


@pytest.mark.parametrize("bits, dtype", [(8, np.uint8), (16, np.uint16)])
def test_save_images_writes_every_frame_losslessly(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                                   bits: int, dtype: type) -> None:
    rec = tmp_path / "rec"
    code, doc, _ = run_json(capfd, ["12.0", "12.7", "0.05", *SIM, "--sim-bits", bits, "--save-images", rec])
    assert code == 0 and doc["verdict"] == "focused"
    header, rows = read_csv(rec / "stack.csv")
    assert header == ["z_mm", "file", "score"]
    assert len(rows) == doc["frames"] == len(doc["curve"]) == 15
    pngs = sorted(rec.glob("*.png"))
    assert len(pngs) == doc["frames"]
    # One row per frame, in capture order: the same z sequence as the JSON curve.
    assert [float(r[0]) for r in rows] == [z for z, _ in doc["curve"]]
    scorer = autofocus.Scorer()
    for (z_mm, name, score), (z, json_score) in zip(rows, doc["curve"]):
        assert "/" not in name and "\\" not in name, "files must be relative to DIR"
        path = rec / name
        assert path.read_bytes()[:8] == PNG_MAGIC
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert image is not None and image.dtype == dtype and image.shape == (200, 320)
        # Lossless: the saved frame scores exactly what the live frame scored.
        assert scorer(image) == pytest.approx(json_score, rel=1e-12, abs=0)
        assert float(score) == pytest.approx(json_score, rel=1e-8)
    if bits == 16:
        peak = max(int(cv2.imread(str(p), cv2.IMREAD_UNCHANGED).max()) for p in pngs)
        assert peak > 255, "16-bit frames must keep their 16-bit values"


def test_save_images_follows_capture_order_downward(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    rec = tmp_path / "down"
    code, doc, _ = run_json(capfd, ["12.6", "12.1", "0.05", *SIM, "--save-images", rec])
    assert code == 0
    _, rows = read_csv(rec / "stack.csv")
    zs = [float(r[0]) for r in rows]
    assert zs == sorted(zs, reverse=True) == [z for z, _ in doc["curve"]]
    assert zs[0] == 12.6 and zs[-1] == 12.1


def test_saved_stack_z_keeps_full_precision(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # A script that refines around a previous fitted best_mm (rounded to 9 decimals) passes START/END
    # with 9 decimals; the recording must keep them so that replaying the same range works.
    # Scripted refinement around a previous best, e.g. best_mm 12.341234567 +- 0.3:
    start, end = "12.041234567", "12.641234567"
    rec = tmp_path / "rec"
    code, doc, _ = run_json(capfd, [start, end, "0.05", *SIM, "--save-images", rec])
    assert code == 0
    _, rows = read_csv(rec / "stack.csv")
    assert [float(r[0]) for r in rows] == [z for z, _ in doc["curve"]]
    code2, doc2, err2 = run_json(capfd, [start, end, "0.05", "--replay", rec])
    assert code2 == 0, err2
    assert doc2["best_mm"] == doc["best_mm"]


def test_saved_curve_z_keeps_full_precision(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "curve.csv"
    code, doc, _ = run_json(capfd, ["12.041234567", "12.641234567", "0.05", *SIM, "--save-curve", out])
    assert code == 0
    _, rows = read_csv(out)
    assert [float(r[1]) for r in rows] == [z for z, _ in doc["curve"]]


###############################################################################
# 2. Record, then replay ######################################################
###############################################################################


@pytest.mark.parametrize("search, args", [("sweep", ["12.0", "12.7", "0.05"]), ("fast", ["11.5", "13.5", "0.02"])])
def test_recorded_sweep_replays_to_the_same_answer(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                                   search: str, args: list[str]) -> None:
    rec = tmp_path / "rec"
    code, live, _ = run_json(capfd, [*args, *SIM, "--sim-bits", "16", "--search", search, "--save-images", rec])
    assert code == 0 and live["verdict"] == "focused"
    # Replay: no PORT, no simulator; the same range and search see the same frames.
    code2, replay, err = run_json(capfd, [*args, "--replay", rec, "--search", search])
    assert code2 == 0, err
    assert replay["verdict"] == "focused"
    assert replay["best_sample_mm"] == pytest.approx(live["best_sample_mm"], abs=1e-9)
    assert replay["best_mm"] == pytest.approx(live["best_mm"], abs=1e-9)
    # A fast search's recording holds the frames it took: the replay searches exactly those (its
    # grid snapped to them, said in a note), so it sees the same curve and one peak, not the
    # steps of a slice repeated between them.
    assert sorted(replay["curve"]) == sorted(live["curve"]) and len(replay["peaks"]) == 1
    assert (search == "fast") == ("recorded slices nearest to it" in err)
    assert abs(replay["best_mm"] - autofocus.SimOptics.focus_mm) <= 0.05


###############################################################################
# 3. Replay layout rules ######################################################
###############################################################################

Z0 = 0.43  # true focus of the synthetic stacks, mm
GRID_STEP = 0.05


def jittered_grid(n: int = 21) -> list[float]:
    """Irregular z: a 0.05 mm grid, every inner position moved by up to a fifth of a step."""
    jitter = np.random.default_rng(11).uniform(-0.2, 0.2, n) * GRID_STEP
    jitter[0] = jitter[-1] = 0.0
    return [round(i * GRID_STEP + float(j), 6) for i, j in enumerate(jitter)]


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("colour", [False, True], ids=["mono", "colour"])
def test_replay_accepts_any_layout(tmp_path: Path, capfd: pytest.CaptureFixture[str], bits: int, colour: bool) -> None:
    zs = jittered_grid()
    # Extra columns, in any order, rows shuffled, irregular z; 8/16-bit, mono/colour.
    stack = write_stack(tmp_path / "s", zs, Z0, bits=bits, colour=colour, shuffle=True,
                        header=("note", "file", "score", "z_mm"))
    code, doc, err = run_json(capfd, ["0", "1", GRID_STEP, "--replay", stack])
    assert code == 0, err
    assert doc["verdict"] == "focused" and doc["frames"] == len(zs)
    truth = nearest_index(zs, Z0)
    assert abs(nearest_index(zs, doc["best_mm"]) - truth) <= 1
    assert abs(doc["best_sample_mm"] - Z0) <= GRID_STEP


def test_replay_sweeps_downward_too(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    zs = [round(i * GRID_STEP, 6) for i in range(21)]
    stack = write_stack(tmp_path / "s", zs, Z0)
    code, doc, err = run_json(capfd, ["1", "0", GRID_STEP, "--replay", stack])
    assert code == 0, err
    curve_z = [z for z, _ in doc["curve"]]
    assert curve_z == sorted(curve_z, reverse=True)
    assert abs(doc["best_mm"] - Z0) <= GRID_STEP


def test_replay_with_a_step_finer_than_the_stack_does_not_crash(tmp_path: Path,
                                                               capfd: pytest.CaptureFixture[str]) -> None:
    # A sparse, irregular stack replayed with a fine STEP: many positions show the same (nearest)
    # frame, so the curve has flat runs and its noise estimate is exactly 0.
    zs = [0.0, 0.13, 0.29, 0.41, 0.47, 0.62, 0.8, 1.0]
    stack = write_stack(tmp_path / "s", zs, Z0)
    code = call_main(["0", "1", "0.01", "--replay", str(stack), "--json"])
    cap = capfd.readouterr()
    assert "Traceback" not in cap.err
    doc = json.loads(cap.out)
    assert code in (0, 3, 4) and doc["exit_code"] == code
    assert doc["verdict"] in ("focused", "no_peak", "edge")
    if doc["verdict"] == "focused":
        assert abs(nearest_index(zs, doc["best_mm"]) - nearest_index(zs, Z0)) <= 1


@pytest.mark.parametrize("start, end, which", [("-0.1", "1", "START"), ("0", "1.2", "END"), ("1.5", "0", "START")])
def test_range_outside_the_stack_is_a_usage_error(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                                  start: str, end: str, which: str) -> None:
    stack = write_stack(tmp_path / "s", [round(i * 0.1, 6) for i in range(11)], Z0)
    code = call_main([start, end, "0.05", "--replay", str(stack)])
    cap = capfd.readouterr()
    assert code == 2
    assert cap.out == ""
    assert_one_line_error(cap.err, which, "outside", "0..1")


def test_replay_with_a_port_is_a_usage_error(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    stack = write_stack(tmp_path / "s", [round(i * 0.1, 6) for i in range(11)], Z0)
    code = call_main(["0", "1", "0.1", "COM3", "--replay", str(stack)])
    assert code == 2
    assert_one_line_error(capfd.readouterr().err, "PORT")


###############################################################################
# 4. Broken stacks: one line, exit 2, nothing else ############################
###############################################################################

GOOD_ROWS = [f"{i * 0.1:.1f},img_{i:03d}.png" for i in range(6)]


def _images(folder: Path, n: int = 6, shape: tuple[int, int] = (40, 50)) -> None:
    for i in range(n):
        cv2.imwrite(str(folder / f"img_{i:03d}.png"), textured_frame(i * 0.1, 0.2, shape=shape))


def _csv(folder: Path, lines: list[str]) -> None:
    (folder / "stack.csv").write_text("\n".join(lines) + "\n")


def broken_no_csv(d: Path) -> None:
    _images(d)


def broken_empty_csv(d: Path) -> None:
    _images(d)
    (d / "stack.csv").write_bytes(b"")


def broken_header_only(d: Path) -> None:
    _images(d)
    _csv(d, ["z_mm,file"])


def broken_no_z_column(d: Path) -> None:
    _images(d)
    _csv(d, ["z,file", *GOOD_ROWS])


def broken_no_file_column(d: Path) -> None:
    _images(d)
    _csv(d, ["z_mm,image", *GOOD_ROWS])


def broken_non_numeric_z(d: Path) -> None:
    _images(d)
    _csv(d, ["z_mm,file", *GOOD_ROWS[:3], "abc,img_003.png", *GOOD_ROWS[4:]])


def broken_missing_image(d: Path) -> None:
    _images(d)
    _csv(d, ["z_mm,file", *GOOD_ROWS, "0.6,img_999.png"])


def broken_garbage_image(d: Path) -> None:
    _images(d)
    (d / "junk.png").write_text("this is not a PNG, just some text\n")
    _csv(d, ["z_mm,file", *GOOD_ROWS, "0.6,junk.png"])


def broken_sizes_differ(d: Path) -> None:
    _images(d)
    cv2.imwrite(str(d / "big.png"), textured_frame(0.6, 0.2, shape=(41, 50)))
    _csv(d, ["z_mm,file", *GOOD_ROWS, "0.6,big.png"])


def broken_duplicate_z(d: Path) -> None:
    _images(d)
    _csv(d, ["z_mm,file", *GOOD_ROWS, "0.30,img_000.png"])


BROKEN = {
    "no_stack_csv": (broken_no_csv, "no stack.csv"),
    "empty_csv": (broken_empty_csv, "the header must name z_mm and file"),
    "header_only": (broken_header_only, "no rows"),
    "no_z_column": (broken_no_z_column, "the header must name z_mm and file"),
    "no_file_column": (broken_no_file_column, "the header must name z_mm and file"),
    "non_numeric_z": (broken_non_numeric_z, "'abc' is not a number"),
    "missing_image": (broken_missing_image, "img_999.png (z=0.6 mm) is missing"),
    "garbage_image": (broken_garbage_image, "junk.png cannot be read as an image"),
    "sizes_differ": (broken_sizes_differ, "all images must have the same size"),
    "duplicate_z": (broken_duplicate_z, "duplicate z_mm 0.3"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_stack_is_one_line_and_exit_2(tmp_path: Path, capfd: pytest.CaptureFixture[str], case: str) -> None:
    build, needle = BROKEN[case]
    stack = tmp_path / case
    stack.mkdir()
    build(stack)
    code = call_main(["0", "0.5", "0.1", "--replay", str(stack)])
    cap = capfd.readouterr()  # capfd: OpenCV's own warnings (C++ stderr) would show here too
    assert code == 2
    assert cap.out == ""
    assert_one_line_error(cap.err, needle, "replay stack")


def test_broken_stack_exit_code_of_the_process(tmp_path: Path) -> None:
    stack = tmp_path / "garbage"
    stack.mkdir()
    broken_garbage_image(stack)
    proc = cli("0", "0.5", "0.1", "--replay", stack)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert_one_line_error(proc.stderr, "cannot be read as an image")


###############################################################################
# 5. --json ###################################################################
###############################################################################


def test_json_is_the_whole_stdout_with_every_key(capfd: pytest.CaptureFixture[str]) -> None:
    code, doc, err = run_json(capfd, ["12.0", "12.7", "0.05", *SIM])
    assert code == 0 and doc["exit_code"] == 0 and doc["error"] is None
    assert JSON_KEYS <= doc.keys()
    assert doc["verdict"] == "focused" and doc["search"] == "sweep"
    assert abs(doc["best_mm"] - autofocus.SimOptics.focus_mm) <= 0.05
    assert isinstance(doc["best_score"], float) and doc["best_score"] > 0
    assert doc["frames"] == len(doc["curve"]) == 15
    assert doc["moves"] >= doc["frames"]
    assert doc["elapsed_s"] >= 0
    assert set(doc["timing"]) == TIMING_KEYS and all(v >= 0 for v in doc["timing"].values())
    # Capture order: the sweep's positions, in order, each [z, score].
    assert [z for z, _ in doc["curve"]] == autofocus.plan_positions(12.0, 12.7, 0.05)
    assert all(len(p) == 2 and isinstance(p[1], float) for p in doc["curve"])
    assert max(s for _, s in doc["curve"]) == doc["best_score"]
    # The human summary goes to stderr.
    assert "best focus at" in err


def test_json_fast_search_curve_is_in_capture_order(capfd: pytest.CaptureFixture[str]) -> None:
    code, doc, _ = run_json(capfd, ["10", "14", "0.02", *SIM, "--search", "fast"])
    assert code == 0 and doc["search"] == "fast"
    assert doc["frames"] == len(doc["curve"]) < 201 // 3
    zs = [z for z, _ in doc["curve"]]
    # The coarse pass comes first, every 8th grid position in sweep order.
    coarse = autofocus.plan_positions(10, 14, 0.02)[::autofocus.COARSE_FACTOR]
    assert zs[: len(coarse)] == coarse
    assert len(set(zs)) == len(zs)


def test_json_on_a_broken_stack(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    stack = tmp_path / "dupes"
    stack.mkdir()
    broken_duplicate_z(stack)
    code, doc, err = run_json(capfd, ["0", "0.5", "0.1", "--replay", stack])
    assert code == 2 and doc["exit_code"] == 2
    assert "duplicate z_mm" in doc["error"]
    assert doc["best_mm"] is None and doc["frames"] == 0 and doc["curve"] == []
    assert_one_line_error(err, "duplicate z_mm")


def test_json_on_a_blank_specimen_is_no_peak(capfd: pytest.CaptureFixture[str]) -> None:
    code, doc, err = run_json(capfd, ["11", "13.5", "0.05", *SIM, "--sim-specimen", "blank", "--sim-start-mm", "11.5"])
    assert code == 3 and doc["exit_code"] == 3
    assert doc["verdict"] == "no_peak" and doc["error"] is None
    assert doc["frames"] == len(doc["curve"]) == 51
    assert doc["best_mm"] == 11.5  # never moved to a noise maximum: back where it started
    assert JSON_KEYS <= doc.keys()
    assert "no focus found" in err


def test_json_exit_codes_of_the_process() -> None:
    proc = cli("11", "13.5", "0.05", *SIM, "--sim-specimen", "blank", "--json")
    assert proc.returncode == 3
    doc = json.loads(proc.stdout)
    assert doc["verdict"] == "no_peak" and doc["exit_code"] == 3
    assert "Traceback" not in proc.stderr


def test_json_on_a_failure_has_the_same_keys(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    _, ok, _ = run_json(capfd, ["12.0", "12.7", "0.05", *SIM])
    _, failed, _ = run_json(capfd, ["0", "0.5", "0.1", "--replay", tmp_path / "nothing-here"])
    assert failed["error"]
    assert set(failed) == set(ok), f"missing on failure: {sorted(set(ok) - set(failed))}"


def test_json_on_a_usage_error(capfd: pytest.CaptureFixture[str]) -> None:
    code = call_main(["12", "12", "0.05", *SIM, "--json"])  # START equals END
    cap = capfd.readouterr()
    assert code == 2
    assert_one_line_error(cap.err, "START_MM equals END_MM")
    doc = json.loads(cap.out)
    assert doc["exit_code"] == 2 and "START_MM equals END_MM" in doc["error"]


###############################################################################
# 6. --save-curve and --plot ##################################################
###############################################################################


def test_save_curve_csv(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "curve.csv"
    code, doc, _ = run_json(capfd, ["10", "14", "0.02", *SIM, "--search", "fast", "--save-curve", out])
    assert code == 0
    header, rows = read_csv(out)
    assert header == ["index", "z_mm", "score"]
    assert len(rows) == doc["frames"]
    assert [int(r[0]) for r in rows] == list(range(doc["frames"]))
    for (_, z, score), (jz, js) in zip(rows, doc["curve"]):
        assert float(z) == pytest.approx(jz, abs=1e-9)
        assert float(score) == pytest.approx(js, rel=1e-8)


def test_save_curve_on_no_peak(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "blank.csv"
    code, doc, _ = run_json(capfd, ["11", "13", "0.1", *SIM, "--sim-specimen", "blank", "--save-curve", out])
    assert code == 3
    _, rows = read_csv(out)
    assert len(rows) == doc["frames"] == 21


def test_plot_png_headless(tmp_path: Path) -> None:
    out = tmp_path / "curve.png"
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "MPLBACKEND")}
    proc = cli("12.0", "12.7", "0.05", *SIM, "--plot", out, env=env)
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    image = cv2.imread(str(out), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[0] >= 200 and image.shape[1] >= 300
    assert image.std() > 10  # not a blank canvas


def test_plot_and_curve_to_a_missing_folder_fail_before_moving(tmp_path: Path,
                                                               capfd: pytest.CaptureFixture[str]) -> None:
    for flag in ("--plot", "--save-curve"):
        code = call_main(["12.0", "12.7", "0.05", *SIM, flag, str(tmp_path / "no" / "such" / "x")])
        cap = capfd.readouterr()
        assert code == 2
        assert_one_line_error(cap.err, flag, "does not exist")
        assert not (tmp_path / "no").exists()


###############################################################################
# 7. The shared real stacks ###################################################
###############################################################################

TRUTH_RE = re.compile(r"best focus: slice (\d+) \(z_mm = (-?[\d.]+)\)")


def shared_stack(name: str) -> tuple[Path, list[float], int, float]:
    """(folder, slice z values, truth slice, truth z); skips when ../shared is absent."""
    folder = SHARED_STACKS / name
    if not (folder / "stack.csv").is_file():
        pytest.skip(f"shared stack {name} is absent ({folder}): real-stack tests need ../shared beside the repo")
    with open(folder / "stack.csv", newline="") as f:
        zs = [float(row["z_mm"]) for row in csv.DictReader(f)]
    m = TRUTH_RE.search((folder / "TRUTH.txt").read_text())
    assert m, "TRUTH.txt: expected 'best focus: slice N (z_mm = Z)'"
    truth, truth_z = int(m.group(1)), float(m.group(2))
    assert zs[truth] == pytest.approx(truth_z, abs=1e-9)
    return folder, zs, truth, truth_z


def slice_spacing(zs: list[float]) -> float:
    """The regular spacing of a stack, or the mean spacing of an irregular one."""
    return round((max(zs) - min(zs)) / (len(zs) - 1), 7)


@pytest.mark.parametrize("metric", sorted(autofocus.METRICS))
def test_shared_zaber_gif_sweep_finds_the_truth(capfd: pytest.CaptureFixture[str], metric: str) -> None:
    folder, zs, truth, _ = shared_stack("zaber_gif")
    step = slice_spacing(zs)
    code, doc, err = run_json(capfd, [min(zs), max(zs), step, "--replay", folder, "--metric", metric])
    assert code == 0, err
    assert doc["verdict"] == "focused" and doc["frames"] == len(zs)
    assert abs(nearest_index(zs, doc["best_mm"]) - truth) <= 1
    assert abs(nearest_index(zs, doc["best_sample_mm"]) - truth) <= 1


def test_shared_zaber_gif_fast_search_finds_the_truth(capfd: pytest.CaptureFixture[str]) -> None:
    folder, zs, truth, _ = shared_stack("zaber_gif")
    code, doc, err = run_json(capfd, [min(zs), max(zs), slice_spacing(zs), "--replay", folder, "--search", "fast"])
    assert doc["frames"] < len(zs)
    assert abs(nearest_index(zs, doc["best_sample_mm"]) - truth) <= 1  # it did see the peak ...
    assert code == 0 and doc["verdict"] == "focused", doc["reason"]  # ... and must say so
    assert abs(nearest_index(zs, doc["best_mm"]) - truth) <= 1


@pytest.mark.parametrize("metric", ["laplacian", "tenengrad", "normvar", "brenner"])
def test_shared_wafer_sparse_finds_the_truth(capfd: pytest.CaptureFixture[str], metric: str) -> None:
    # Irregular z; STEP = the mean slice spacing: the grid is snapped to the 11 recorded slices
    # (said in a note), never to a slice repeated at the positions between them.  With so few
    # frames off the peak the noise rests on a handful of residuals: the verdict may be focused
    # (on the truth) or "too few to tell it from noise" -- never a focus elsewhere.
    folder, zs, truth, _ = shared_stack("wafer_sparse")
    code, doc, err = run_json(capfd, [min(zs), max(zs), slice_spacing(zs), "--replay", folder, "--metric", metric])
    assert "searched the" in err and doc["frames"] <= len(zs)
    assert len({z for z, _ in doc["curve"]}) == len(doc["curve"])
    if doc["verdict"] == "no_peak":
        assert code == 3 and "too few to tell it from noise" in doc["reason"], doc["reason"]
    else:
        assert code == 0 and doc["verdict"] == "focused", err
        assert abs(nearest_index(zs, doc["best_mm"]) - truth) <= 1


@pytest.mark.parametrize("search", ["sweep", "fast"])
def test_shared_dfnn_lightsheet_never_claims_fine_focus(capfd: pytest.CaptureFixture[str], search: str) -> None:
    # Nearly flat curves over +-0.75 um: the full-resolution curve has no peak that clears its
    # noise, and the tool says so.  Where it goes on is the coarse-scale curve, a broad hump
    # whose top (slices 11-13) lies 2-4 slices (0.1-0.2 um) from the source's focus, slice 15:
    # the verdict then says it came from the coarse scale.  It never moves to a noise maximum.
    folder, zs, truth_idx, _ = shared_stack("dfnn_microtubules_lightsheet")
    code, doc, err = run_json(capfd, [min(zs), max(zs), slice_spacing(zs), "--replay", folder, "--search", search])
    if doc["verdict"] == "no_peak":
        assert code == 3 and doc["best_mm"] == doc["start_mm"] == min(zs)
    else:
        assert code == 0 and doc["verdict"] == "focused" and doc["verdict_scale"] == "coarse", err
        assert "coarse-scale" in doc["reason"]
        assert abs(doc["best_mm"] - zs[truth_idx]) <= 4 * slice_spacing(zs) + 1e-12


###############################################################################
# 8. --make-figures ###########################################################
###############################################################################


def test_make_figures_writes_valid_images(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "img"
    code = call_main(["--make-figures", str(folder)])  # the README's command: no range needed
    out = capfd.readouterr().out
    assert code == 0
    written = [Path(line) for line in out.splitlines() if line.strip()]
    names = {p.name for p in written}
    assert {"blurry_image.png", "blurry_laplacian.png", "focused_image.png", "focused_laplacian.png",
            "autofocus.gif", "roi.png", "transparent.png", "show_images.png"} <= names
    roi_view = cv2.imread(str(folder / "roi.png"))
    assert np.all(roi_view == (0, 255, 255), axis=2).sum() > 100  # the --roi figure outlines its region
    assert all(p.is_file() and p.parent == folder for p in written)
    for png in folder.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC
        image = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
        assert image is not None and image.size > 0 and image.std() > 1
    # The focused frame is sharper than the blurry one (the figures tell the README's story).
    scorer = autofocus.Scorer()
    assert scorer(cv2.imread(str(folder / "focused_image.png"), cv2.IMREAD_UNCHANGED)) > \
        2 * scorer(cv2.imread(str(folder / "blurry_image.png"), cv2.IMREAD_UNCHANGED))
    gif = folder / "autofocus.gif"
    assert gif.read_bytes()[:6] in (b"GIF87a", b"GIF89a")
    from PIL import Image

    with Image.open(gif) as anim:
        assert anim.n_frames > 10
        assert anim.size[0] > 100 and anim.size[1] > 50
