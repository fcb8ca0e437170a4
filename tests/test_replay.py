"""Record a sweep and replay recorded stacks offline.

Covers --save-images (lossless PNGs + a replayable stack.csv), record-then-replay, the replay layout
rules and every broken-stack error, hostile image files (headers checked before decoding), the ROI
a recording keeps, and the shared real stacks (skipped when ../shared is absent).
"""
from __future__ import annotations

import builtins
import csv
import io
import json
import re
import struct
import zlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

import autofocus
from cli_runs import PNG_MAGIC, assert_one_line_error, call, call_main, cli, read_csv, run_json, strict

REPO = Path(autofocus.__file__).resolve().parent
SHARED_STACKS = REPO.parent / "shared" / "stacks"
SIM = ["--simulate", "--sim-time-scale", "0", "--sim-size", "320x200"]


###############################################################################
# Helpers #####################################################################
###############################################################################


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
    assert header == ["z_mm", "file", "score", "retake"]
    assert all(r[3] == "" for r in rows)  # a sweep takes each position once
    assert len(rows) == doc["frames"] == len(doc["curve"]) == 15
    pngs = sorted(rec.glob("*.png"))
    assert len(pngs) == doc["frames"]
    # One row per frame, in capture order: the same z sequence as the JSON curve.
    assert [float(r[0]) for r in rows] == [z for z, _ in doc["curve"]]
    scorer = autofocus.Scorer()
    for (z_mm, name, score, _), (z, json_score) in zip(rows, doc["curve"]):
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
    # steps of a slice repeated between them (a frame taken again replays its later frame).
    assert {z: s for z, s in replay["curve"]} == {z: s for z, s in live["curve"]} and len(replay["peaks"]) == 1
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


def broken_retake_first(d: Path) -> None:
    _images(d)
    _csv(d, ["z_mm,file,retake", *(f"{row}," for row in GOOD_ROWS[:-1]), f"{GOOD_ROWS[-1]},1"])


def broken_duplicate_unmarked(d: Path) -> None:  # the retake column there, the repeat not marked in it
    _images(d)
    _csv(d, ["z_mm,file,retake", *(f"{row}," for row in GOOD_ROWS), "0.30,img_000.png,"])


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
    "duplicate_unmarked": (broken_duplicate_unmarked, "duplicate z_mm 0.3"),
    "retake_first": (broken_retake_first, "retake=1 marks a frame taken again, but no row before it"),
}


def test_the_recording_marks_a_frame_taken_again(tmp_path: Path) -> None:
    saver = autofocus.ImageSaver(tmp_path / "rec")
    frames = [np.full((8, 8), v, np.uint8) for v in (10, 20, 30)]
    for index, (z, frame) in enumerate(zip((0.1, 0.2, 0.1), frames)):
        saver(index, z, frame, float(frame[0, 0]))
    saver.close()
    header, rows = read_csv(tmp_path / "rec" / "stack.csv")
    assert header == ["z_mm", "file", "score", "retake"]
    assert [(float(r[0]), r[3]) for r in rows] == [(0.1, ""), (0.2, ""), (0.1, "1")]
    stack = autofocus.ReplayStack(tmp_path / "rec")
    assert list(stack.z_mm) == [0.1, 0.2] and int(stack.nearest(0.1)[0, 0]) == 30  # the later frame


def test_a_frame_taken_again_replays_its_later_row(tmp_path: Path) -> None:
    # What the fast search records when it takes a frame again; headers may carry spaces by hand.
    _images(tmp_path)
    _csv(tmp_path, ["z_mm, file, retake", *(f"{row}," for row in GOOD_ROWS), "0.30,img_000.png, 1"])
    stack = autofocus.ReplayStack(tmp_path)
    assert list(stack.z_mm) == [float(row.split(",")[0]) for row in GOOD_ROWS]  # once each
    img_000 = cv2.imread(str(tmp_path / "img_000.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(stack.nearest(0.3), img_000)  # the later row's image, not img_003's


def test_half_step_frames_record_and_replay(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # A pixel-sharp specimen at 60x, STEP one depth of field, the focus 0.44 STEP off the grid: its
    # score peak is narrower than STEP, and the fast search measures half a STEP either side.
    rng = np.random.default_rng(0)
    specimen = tmp_path / "sharp.png"
    assert cv2.imwrite(str(specimen), np.where(rng.random((200, 320)) > 0.5, 220, 20).astype(np.uint8))
    rec, sweep_rec = tmp_path / "rec", tmp_path / "sweep"
    grid = ["12.30", "12.38", "0.001"]
    live_args = [*grid, *SIM, "--sim-objective", "60x", "--sim-specimen-image", specimen, "--sim-focus-mm", "12.34044"]
    code, live, _ = run_json(capfd, [*live_args, "--search", "fast", "--save-images", rec])
    halves = [z for z, _ in live["curve"] if abs(z * 1000 - round(z * 1000)) > 1e-6]
    assert code == 0 and halves == [12.3395, 12.3405]
    _, rows = read_csv(rec / "stack.csv")
    assert [float(r[0]) for r in rows] == [z for z, _ in live["curve"]]
    # Replayed, the fast search (a sweep of the recorded slices) asks for the same half-STEP slices
    # and gives the same answer.
    code, replay, _ = run_json(capfd, [*grid, "--replay", rec, "--search", "fast"])
    assert code == 0 and replay["best_mm"] == live["best_mm"] and replay["frames"] == live["frames"]
    assert {z: s for z, s in replay["curve"]} == {z: s for z, s in live["curve"]}
    # Over a sweep's recording there is no slice half a STEP off the grid: it asks for none (the
    # replay camera refuses a position between slices, exit 5).
    code, _, _ = run_json(capfd, [*live_args, "--save-images", sweep_rec])
    assert code == 0
    code, fast, err = run_json(capfd, [*grid, "--replay", sweep_rec, "--search", "fast"])
    assert code == 0, err
    assert all(abs(z * 1000 - round(z * 1000)) < 1e-6 for z, _ in fast["curve"])


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


def test_json_on_a_broken_stack(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    stack = tmp_path / "dupes"
    stack.mkdir()
    broken_duplicate_z(stack)
    code, doc, err = run_json(capfd, ["0", "0.5", "0.1", "--replay", stack])
    assert code == 2 and doc["exit_code"] == 2
    assert "duplicate z_mm" in doc["error"]
    assert doc["best_mm"] is None and doc["frames"] == 0 and doc["curve"] == []
    assert_one_line_error(err, "duplicate z_mm")


###############################################################################
# 5. Image files: every header checked before anything is decoded #############
###############################################################################


def jpeg(width: int, height: int) -> bytes:
    app0 = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    return b"\xff\xd8" + app0 + b"\xff\xc0\x00\x0b\x08" + struct.pack(">HH", height, width) + b"\x01\x01\x11\x00\xff\xd9"


BOMBS = {  # each declares 30000x30000 pixels (900 MP) in a few bytes
    "JPEG": jpeg(30000, 30000),
    "BMP": b"BM" + bytes(12) + struct.pack("<Iii", 40, 30000, -30000) + bytes(28),
    "WebP": b"RIFF\x00\x00\x00\x00WEBPVP8X\x0a\x00\x00\x00\x00\x00\x00\x00" + (29999).to_bytes(3, "little") * 2,
    "GIF": b"GIF89a" + struct.pack("<HH", 30000, 30000) + bytes(3) + b"\x2c" + bytes(4) + struct.pack("<HH", 8, 8),
    "GIF frame beyond its screen": b"GIF89a" + struct.pack("<HHBBB", 8, 8, 0, 0, 0) + b"\x21\xf9\x04" + bytes(4)
                                   + b"\x00\x2c" + bytes(4) + struct.pack("<HH", 30000, 30000) + bytes(3),
    "PNM": b"P5\n# a comment\n30000 30000\n255\n",
    "PAM": b"P7\nWIDTH 30000\nHEIGHT 30000\nDEPTH 1\nMAXVAL 255\nENDHDR\n",
    "PFM": b"Pf\n30000 30000\n-1\n",
    "Sun raster": b"\x59\xa6\x6a\x95" + struct.pack(">III", 30000, 30000, 8) + bytes(20),
    "Radiance HDR": b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 30000 +X 30000\n",
    "BigTIFF": b"II+\x00\x08\x00\x00\x00" + struct.pack("<QQ", 16, 2) + struct.pack("<HHQQ", 256, 16, 1, 30000)
               + struct.pack("<HHQQ", 257, 16, 1, 30000) + bytes(8),
    "JPEG 2000": b"\xff\x4f\xff\x51\x00\x29\x00\x00" + struct.pack(">IIII", 30000, 30000, 0, 0) + bytes(24),
    "JPEG in a big APP segment": jpeg(30000, 30000)[:2] + b"\xff\xe1\xff\xff" + bytes(65533) + jpeg(30000, 30000)[2:],
}


@pytest.mark.parametrize("kind", list(BOMBS))
def test_a_declared_size_is_refused_before_anything_is_decoded(kind: str, tmp_path: Path,
                                                               capfd: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    stack = tmp_path / "stack"
    stack.mkdir()
    (stack / "img.bin").write_bytes(BOMBS[kind])
    (stack / "stack.csv").write_text("z_mm,file\n10,img.bin\n10.1,img.bin\n")
    monkeypatch.setattr(autofocus.cv2, "imdecode", None)  # it must never get that far
    code, out, err = call(capfd, "10", "10.1", "0.05", "--replay", stack, "--json")
    assert code == 2 and "declares 30000x30000 pixels, more than 50 MP" in err and err.count("\n") == 1, err
    assert json.loads(out)["exit_code"] == 2


@pytest.mark.parametrize("ext", [".bmp", ".jpg", ".jp2", ".webp", ".pgm", ".ppm", ".pam", ".pfm", ".sr", ".hdr",
                                 ".tif", ".png", ".gif"])
def test_every_format_opencv_reads_is_checked_and_replays(ext: str, tmp_path: Path) -> None:
    if not cv2.haveImageWriter("x" + ext):
        pytest.skip(f"this OpenCV cannot write {ext}")
    frame = (np.random.default_rng(4).random((48, 64, 3)) * 200 + 20).astype(np.uint8)
    if ext in (".pgm",):
        frame = frame[:, :, 0]
    if ext in (".pfm", ".hdr"):
        frame = frame.astype(np.float32) / 255
    ok, data = cv2.imencode(ext, frame)
    assert ok
    kind, width, height, _ = autofocus.image_header(data.tobytes())
    assert (width, height) == (64, 48), kind
    (tmp_path / f"img{ext}").write_bytes(data.tobytes())
    image = autofocus.read_image(tmp_path / f"img{ext}", "img")
    assert image.shape[:2] == (48, 64)


@pytest.mark.parametrize("data, message", [
    (b"\x00\x00\x00 ftypavif" + bytes(40), "not one of the formats whose size can be checked"),  # AVIF
    (b"\x76\x2f\x31\x01" + bytes(40), "not one of the formats"),  # OpenEXR
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01" + bytes(6) + b"\x00\x01\xff\xda", "no frame header"),  # JPEG, no SOF
    (b"\xff\xd8\xff\xc0\x00\x0b\x08\x00\x00\x01\x00\x01", "DNL"),  # height 0
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR\x00\x00", "cut short"),
    (b"II*\x00\x08\x00\x00\x00\x00\x00", "no width or height"),
])
def test_headers_that_cannot_be_checked_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        autofocus.image_header(data)


def png_bomb() -> bytes:
    """A 69-byte PNG whose header declares 50000x50000 pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 50000, 50000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")[:0]) + chunk(b"IEND", b"")


def make_stack(folder: Path, writer: Any, rows: int = 3) -> Path:
    folder.mkdir()
    writer(folder)
    (folder / "stack.csv").write_text("z_mm,file\n" + "".join(f"{10 + i * 0.05},img.tif\n" for i in range(rows)))
    return folder


def tiff(array: np.ndarray) -> Any:
    def write(folder: Path) -> None:
        assert cv2.imwrite(str(folder / "img.tif"), array)
    return write


def raw(data: bytes) -> Any:
    def write(folder: Path) -> None:
        (folder / "img.tif").write_bytes(data)
    return write


def five_channel_tiff(folder: Path) -> None:
    """An uncompressed 64x48 TIFF with 5 samples a pixel (OpenCV cannot write one)."""
    h, w, c = 48, 64, 5
    data = np.random.default_rng(3).integers(0, 255, (h, w, c), np.uint8).tobytes()
    n = 10
    bits_at = 8 + 2 + n * 12 + 4
    data_at = bits_at + 2 * c
    entries = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, c, bits_at), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, data_at), (277, 3, 1, c), (278, 3, 1, h), (279, 4, 1, len(data)), (284, 3, 1, 1)]
    out = b"II*\x00" + struct.pack("<IH", 8, n)
    for tag, kind, count, value in entries:
        out += struct.pack("<HHIHH", tag, kind, count, value, 0) if kind == 3 and count == 1 else \
            struct.pack("<HHII", tag, kind, count, value)
    (folder / "img.tif").write_bytes(out + struct.pack("<I", 0) + struct.pack(f"<{c}H", *[8] * c) + data)


def truncated_png(folder: Path) -> None:
    ok, encoded = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (200, 320), np.uint8))
    (folder / "img.tif").write_bytes(encoded.tobytes()[: len(encoded) // 2])  # the name does not matter to OpenCV


GRAY = np.random.default_rng(1).random((48, 64))


@pytest.mark.parametrize("writer, message", [
    (raw(png_bomb()), "declares 50000x50000 pixels, more than 50 MP"),
    (tiff(np.dstack([GRAY] * 3)), "has float64 pixels"),
    (tiff((GRAY * 1000).astype(np.int16)), "has int16 pixels"),
    (tiff((GRAY * 1000).astype(np.int32)), "has int32 pixels"),
    (five_channel_tiff, "has 5 channels"),
    (tiff(np.where(GRAY > 0.5, np.inf, GRAY).astype(np.float32)), "non-finite pixels"),
    (truncated_png, "cannot be read as an image"),
    (raw(b"not an image at all"), "cannot be read as an image"),
])
def test_hostile_replay_images_are_one_line_and_nothing_from_opencv_reaches_stderr(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], writer: Any, message: str) -> None:
    stack = make_stack(tmp_path / "stack", writer)
    code = autofocus.main(["10", "10.1", "0.05", "--replay", str(stack), "--json"])
    captured = capfd.readouterr()  # file-descriptor level: libpng and OpenCV write there directly
    assert code == 2 and message in captured.err, captured.err
    assert captured.err.count("\n") == 1 and "libpng" not in captured.err and "WARN" not in captured.err
    assert strict(captured.out)["exit_code"] == 2


def test_each_distinct_file_is_decoded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frame = (np.random.default_rng(2).random((48, 64)) * 200).astype(np.uint8)
    stack = make_stack(tmp_path / "stack", tiff(frame), rows=50)
    real_imdecode = cv2.imdecode
    calls = []

    def imdecode(*args: Any) -> Any:  # the file's bytes are decoded: OpenCV never opens a path itself
        calls.append(len(args[0]))
        return real_imdecode(*args)

    monkeypatch.setattr(autofocus.cv2, "imdecode", imdecode)
    monkeypatch.setattr(autofocus.cv2, "imread", None)  # never called
    replay = autofocus.ReplayStack(stack)
    assert len(replay.frames) == 50 and calls == [(stack / "img.tif").stat().st_size]


def test_replay_picks_the_nearest_slice_between_slices(tmp_path: Path) -> None:
    folder = tmp_path / "stack"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"f{i}.png"), np.full((16, 16), 10 + i, np.uint8))
    (folder / "stack.csv").write_text("z_mm,file\n0.0,f0.png\n0.1,f1.png\n0.2,f2.png\n")
    replay = autofocus.ReplayStack(folder)
    picked = {z: int(replay.nearest(z)[0, 0]) - 10 for z in (-1.0, 0.03, 0.07, 0.13, 0.17, 0.2, 5.0)}
    assert picked == {-1.0: 0, 0.03: 0, 0.07: 1, 0.13: 1, 0.17: 2, 0.2: 2, 5.0: 2}  # nearer neighbour, not lower


def test_replay_half_way_between_slices_picks_the_lower_whatever_the_row_order(tmp_path: Path) -> None:
    folder = tmp_path / "stack"
    folder.mkdir()
    for i in range(2):
        cv2.imwrite(str(folder / f"f{i}.png"), np.full((16, 16), 10 + i, np.uint8))
    (folder / "stack.csv").write_text("z_mm,file\n0.1,f1.png\n0.0,f0.png\n")  # rows not in z order
    assert int(autofocus.ReplayStack(folder).nearest(0.05)[0, 0]) == 10


def one_image_stack(folder: Path, data: bytes, name: str = "img.bin") -> Path:
    folder.mkdir(parents=True)
    (folder / name).write_bytes(data)
    (folder / "stack.csv").write_text(f"z_mm,file\n10,{name}\n10.1,{name}\n")
    return folder


def test_an_image_opencv_refuses_to_decode_is_one_line(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # 1 x 2,000,000 pixels: inside the tool's 50 MP, beyond OpenCV's CV_IO_MAX_IMAGE_WIDTH (2^20).
    ok, data = cv2.imencode(".tif", np.full((1, 2_000_000), 100, np.uint8))
    assert ok
    stack = one_image_stack(tmp_path / "stack", data.tobytes(), "wide.tif")
    code, out, err = call(capfd, "10", "10.1", "0.05", "--replay", stack, "--json")
    assert code == 2 and err.count("\n") == 1, err
    assert "wide.tif (2000000x1 TIFF) cannot be decoded: OpenCV refuses it" in err and "CV_IO_MAX_IMAGE_WIDTH" in err
    assert json.loads(out)["exit_code"] == 2


@pytest.fixture
def bytes_read(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every byte read_image reads from its file, counted where it leaves the file system."""
    counted: list[int] = []

    class Counting(io.FileIO):
        def readinto(self, buffer: Any) -> int | None:
            n = super().readinto(buffer)
            counted.append(n or 0)
            return n

    def counting_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        return io.BufferedReader(Counting(file, "r")) if mode == "rb" else builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(autofocus, "open", counting_open, raising=False)
    return counted


@pytest.mark.parametrize("data, message", [
    (b"\xff\xd8" + b"\xff" * (8 << 20), "its JPEG markers are damaged"),  # once walked in Python: 27.6 s for 50 MB
    (b"BM" + bytes(12) + struct.pack("<Iii", 40, 30000, -30000) + bytes(8 << 20), "declares 30000x30000 pixels"),
    (b"\xff\xd8" + b"\xff\xe1\x00\x04\x00\x00" * 1_000_000, "runs on for more than 4096 segments"),
])
def test_a_file_is_refused_from_its_header_without_reading_the_rest(tmp_path: Path, bytes_read: list[int],
                                                                    data: bytes, message: str) -> None:
    path = tmp_path / "img.bin"
    path.write_bytes(data)
    with pytest.raises(autofocus.StackError, match=message):
        autofocus.read_image(path, "img")
    assert len(data) > 5 << 20 and sum(bytes_read) <= 64 << 10


def test_a_header_far_into_the_file_is_found_and_the_file_read_once(tmp_path: Path, bytes_read: list[int]) -> None:
    frame = (np.random.default_rng(7).random((48, 64)) * 200 + 20).astype(np.uint8)
    ok, jpeg = cv2.imencode(".jpg", frame)
    padding = (b"\xff\xef\xff\xff" + bytes(65533)) * 3  # three full APP15 segments: the frame header lies 192 KiB in
    (tmp_path / "big.jpg").write_bytes(jpeg.tobytes()[:2] + padding + jpeg.tobytes()[2:])
    ok, tiff = cv2.imencode(".tif", (np.random.default_rng(8).random((400, 400)) * 255).astype(np.uint8))
    (tmp_path / "end.tif").write_bytes(tiff.tobytes())  # OpenCV writes the TIFF directory after the pixels
    assert struct.unpack("<I", tiff.tobytes()[4:8])[0] > 150_000
    for name in ("big.jpg", "end.tif"):
        bytes_read.clear()
        image = autofocus.read_image(tmp_path / name, name)
        size = (tmp_path / name).stat().st_size
        assert image.shape[:2] in ((48, 64), (400, 400)) and sum(bytes_read) <= size + (32 << 10), name


def test_a_nul_byte_in_a_stack_row_is_one_line(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    stack = tmp_path / "stack"
    stack.mkdir()
    cv2.imwrite(str(stack / "a.png"), np.full((16, 16), 100, np.uint8))
    (stack / "stack.csv").write_text("z_mm,file\n12,a.png\n12.1,a\x00.png\n")
    for extra in ([], ["--save-curve", tmp_path / "c.csv"], ["--save-images", tmp_path / "out"]):
        code, out, err = call(capfd, "12", "12.1", "0.05", "--replay", stack, *extra, "--json")
        assert code == 2 and err.count("\n") == 1, err
        assert "line 3: the file name holds a NUL byte" in err and json.loads(out)["exit_code"] == 2


###############################################################################
# 6. The shared real stacks ###################################################
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
# 7. A STEP finer than the recording ##########################################
###############################################################################


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
