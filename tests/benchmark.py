#!/usr/bin/env python3
"""Benchmark of autofocus.py: score speed, accuracy, time to focus and memory.

Run by hand (it is not a pytest module; it defines no test functions)::

    python tests/benchmark.py                      # everything (~5 minutes on 2 quiet cores)
    python tests/benchmark.py --quick              # fewer seeds/repeats/steps (< 2 minutes)
    python tests/benchmark.py --section accuracy   # one section (repeatable: --section score --section timing)
    python tests/benchmark.py --section map --write   # ... and put it into tests/BENCHMARKS.md
    python tests/benchmark.py --section decision --baseline /tmp/old_autofocus.py   # before -> after

Prints Markdown tables (medians; ratios are measured within one run) and, at the end, a
"targets" summary with PASS/FAIL.  Everything is seeded, so two runs differ only in timings.
``--write`` puts the sections run into tests/BENCHMARKS.md (the others there are kept) and
rebuilds its Targets table; ``--merge PRINTOUT --write`` does so from a saved printout.

Sections:

score     milliseconds per 1920x1200 frame for each metric (8-bit mono, 16-bit mono, 8-bit
          colour, float32 mono), vs a naive seed-style score on the full frame.
accuracy  (a) the simulator with known truth at several noise levels and focal planes, both
          search modes; (b) every recorded stack in ../shared/stacks, plus a blank stack.
timing    real-time simulator at 1920x1200: a seed-style loop (start/stop per frame, scoring
          in series; a baseline implemented here, not a product mode) vs our sweep and fast,
          and our sweep with a 640x400 sensor ROI (--camera-roi: read-out time per row read).
memory    peak RSS of the CLI with --save-images (and --show-images under Xvfb) over 10 vs 500
          steps.
map       focus maps on the simulated slide (20x, STEP ~ one depth of field): frames a point and
          z_at's error against the true surface, focus_map() vs a full search at every point; tilted
          + bowed, steeper, bare-glass and rippled slides; a real micrograph texture.
bracketing the Zaber path (real ZML, tests/fake_zaber.py with a modelled serial latency): what
          verifying every frame before and after it costs, in round trips and ms per frame, and the
          loop's wall time against the modelled hardware time.
mm        the real pymmcore-plus core with Python devices (tests/mm_devices.py): focus() accuracy at
          20x on it (and that it equals the simulator's), and frames after a move through snapImage
          vs a running sequence acquisition.
decision  false focus on empty fields (the simulator's blank at five frame sizes, replayed blank
          stacks: noise, gradient, fixed pattern, lamp flicker, warming lamp; every metric, both
          searches); the error bar's coverage and width and the sub-step accuracy per objective
          and search (both defocus models, real textures); the fast search's frames on real
          textures with a drifting lamp.  --baseline OLD.py runs an earlier decision alongside.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

import autofocus as af  # noqa: E402

SHARED_STACKS = Path(__file__).resolve().parents[2] / "shared" / "stacks"
SECTIONS = ("score", "accuracy", "timing", "memory", "map", "bracketing", "mm", "decision")
FRAME_PERIOD_MS = 1000.0 / 41.0  # BFLY-U3-23S6M at 1920x1200
RANGE_MM = (10.0, 14.0)
STEP_MM = 0.05


@dataclasses.dataclass
class Target:
    name: str
    measured: str
    ok: bool | None  # None: not measured (skipped)


TARGETS: list[Target] = []


def target(name: str, measured: str, ok: bool | None) -> None:
    TARGETS.append(Target(name, measured, ok))


###############################################################################
# Helpers
###############################################################################


def git_describe() -> str:
    """The commit benchmarked (and whether autofocus.py differs from it)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "autofocus.py"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "commit unknown"
    if not head:
        return "commit unknown"
    return f"commit {head}" + (" + uncommitted autofocus.py changes" if dirty else "")


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def header(title: str, what: str) -> None:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n## {title}\n")
    print(f"_{what} — {now()}, 1-min load average {load:.2f} on {os.cpu_count()} CPUs_\n")


class BackgroundMonitor:
    """Samples how many tasks *outside this process* are runnable (they slow its timings down).

    Every 0.2 s: runnable tasks of the machine (/proc/loadavg) minus this process's own
    runnable threads (/proc/self/task/*/stat).  Child processes count as others.
    """

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.available = os.path.exists("/proc/loadavg")

    def __enter__(self) -> BackgroundMonitor:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.available:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                with open("/proc/loadavg") as f:
                    running = int(f.read().split()[3].split("/")[0])
                own = 0
                for task in os.listdir("/proc/self/task"):
                    try:
                        with open(f"/proc/self/task/{task}/stat") as f:
                            own += f.read().rsplit(")", 1)[1].split()[0] == "R"
                    except OSError:
                        pass
            except (OSError, ValueError, IndexError):
                continue
            self.samples.append(max(0, running - own))

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples) if self.samples else float("nan")


BUSY: list[tuple[str, float]] = []


def background_note(name: str, monitor: BackgroundMonitor, own_children: bool = False) -> str:
    """How busy the rest of the machine was while a section ran."""
    if not monitor.samples:
        return ""
    if own_children:
        return f"; other runnable tasks: {monitor.mean:.2f} on average (this section's own CLI children included)"
    share = monitor.mean / (os.cpu_count() or 1)
    BUSY.append((name, share))
    note = f"; other runnable tasks: {monitor.mean:.2f} on average ({share:.0%} of the {os.cpu_count()} CPUs)"
    if share > 0.10:
        note += " — **timings in this section are inflated by other processes**"
    return note


def md_table(headers: list[str], rows: list[list[object]]) -> str:
    def cell(v: object) -> str:
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "| " + " | ".join("---" if i == 0 else "---:" for i in range(len(headers))) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def table(headers: list[str], rows: list[list[object]]) -> None:
    print(md_table(headers, rows))
    print(flush=True)


def med(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def fmt(x: float, digits: int = 1) -> str:
    if x is None or x != x:
        return "-"
    return f"{x:.{digits}f}"


def passfail(ok: bool | None) -> str:
    return "SKIP" if ok is None else ("PASS" if ok else "FAIL")


def sim_pair(optics: af.SimOptics, start_mm: float = 0.0, scale: float = 0.0,
             poll_s: float | None = None, one_shot: bool = False,
             roi: af.Roi | None = None) -> tuple[af.SimStage, af.SimCamera, af.SimClock]:
    """A simulated stage and camera sharing one clock (``roi``: --camera-roi)."""
    timing = af.SimTiming(scale=scale)
    stage_timing = timing if poll_s is None else dataclasses.replace(timing, poll_s=poll_s)
    clock = af.SimClock(scale)
    stage = af.SimStage(position_mm=start_mm, timing=stage_timing, clock=clock)
    camera = af.SimCamera(stage, optics, timing, clock, one_shot=one_shot, roi=roi)
    return stage, camera, clock


def sim_frame(optics: af.SimOptics, z_mm: float) -> np.ndarray:
    stage, camera, _ = sim_pair(optics, start_mm=z_mm)
    return camera.capture()


def naive_median_score(img: np.ndarray) -> float:
    """The seed's pipeline: median blur 9, then the variance of the float64 Laplacian."""
    if img.dtype.kind == "f":  # medianBlur with ksize > 5 takes 8-bit only
        img = np.clip(img * 255, 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = (img >> 8).astype(np.uint8)
    return float(cv2.Laplacian(cv2.medianBlur(img, 9), cv2.CV_64F).var())


def naive_bilateral_score(img: np.ndarray) -> float:
    """Seed-style alternative: bilateral 9 on the full frame, then the float64 Laplacian's variance."""
    if img.dtype != np.uint8:  # bilateralFilter takes 8-bit or float32; OpenCV 5 has no 32F->64F Laplacian
        return float(cv2.Laplacian(cv2.bilateralFilter(img.astype(np.float32), 9, 75 * 257, 75), cv2.CV_32F).var())
    return float(cv2.Laplacian(cv2.bilateralFilter(img, 9, 75, 75), cv2.CV_64F).var())


###############################################################################
# 1. Score speed
###############################################################################


def section_score(quick: bool) -> None:
    runs = 20 if quick else 40
    header("Score speed", f"ms per 1920x1200 frame, median of {runs} runs taken round-robin over all rows (so that "
                          f"background load hits every row alike), cv2 threads={cv2.getNumThreads()}; frames from the simulator near focus (photons 1000); BGR = the "
                          f"mono frame in 3 shifted channels; camera frame period {FRAME_PERIOD_MS:.1f} ms")
    mono8 = sim_frame(af.SimOptics(), 12.34)
    mono16 = sim_frame(af.SimOptics(bit_depth=16), 12.34)
    colour = np.ascontiguousarray(np.dstack([mono8, np.roll(mono8, 1, axis=1), np.roll(mono8, 1, axis=0)]))
    mono32f = mono16.astype(np.float32) / 65535  # a float camera (or a float TIFF replayed): rescaled once
    formats = [("8-bit mono", mono8), ("16-bit mono", mono16), ("8-bit BGR", colour), ("float32 mono", mono32f)]
    fast_scorer = af.Scorer()
    seed_label = "naive seed: medianBlur 9 + Laplacian CV_64F .var()"
    labels = {m: f"`{m}`" for m in af.METRICS}
    fns = {**{m: af.Scorer(m) for m in af.METRICS},
           "fast": lambda im: fast_scorer.scores(im, True),  # as a run scores a checked frame
           "seed": naive_median_score, "bilateral": naive_bilateral_score}
    labels.update({"fast": "`laplacian` + coarse (fast search, per frame)", "seed": seed_label,
                   "bilateral": "naive: bilateral 9 + Laplacian CV_64F .var()"})
    jobs = [(key, name, fn, img) for key, fn in fns.items() for name, img in formats]
    samples: dict[tuple[str, str], list[float]] = {(k, n): [] for k, n, _, _ in jobs}
    for _, _, fn, img in jobs:
        fn(img)  # warm-up
    for _ in range(runs):
        for key, name, fn, img in jobs:
            t0 = time.perf_counter()
            fn(img)
            samples[(key, name)].append((time.perf_counter() - t0) * 1e3)
    ms = {k: statistics.median(v) for k, v in samples.items()}
    table(["score", *[n for n, _ in formats]],
          [[labels[k], *[fmt(ms[(k, n)], 2) for n, _ in formats]] for k in fns])
    table(["format", "laplacian ms", "seed naive ms", "speed-up", "laplacian / frame period"],
          [[n, fmt(ms[("laplacian", n)], 2), fmt(ms[("seed", n)], 1), f"{ms[('seed', n)] / ms[('laplacian', n)]:.1f}x",
            f"{ms[('laplacian', n)] / FRAME_PERIOD_MS:.0%}"] for n, _ in formats])
    ours = {k: v for k, v in ms.items() if k[0] not in ("seed", "bilateral")}
    slowest = max(ours, key=ours.get)
    target("every metric (and laplacian+coarse) scores a 1920x1200 frame within the frame period "
           f"({FRAME_PERIOD_MS:.1f} ms)", f"slowest {ours[slowest]:.1f} ms ({labels[slowest[0]]}, {slowest[1]})",
           ours[slowest] < FRAME_PERIOD_MS)
    lap = max(ms[("laplacian", n)] for n, _ in formats)
    target(f"default score (laplacian) within the frame period ({FRAME_PERIOD_MS:.1f} ms), every format",
           f"max {lap:.1f} ms", lap < FRAME_PERIOD_MS)


###############################################################################
# 2. Accuracy
###############################################################################


@dataclasses.dataclass
class Run:
    search: str
    verdict: str
    best_mm: float
    fit_mm: float | None
    frames: int
    moves: int
    ms_per_frame: float
    score_ms_per_frame: float


def run_once(stage, camera, positions, search: str, metric: str = "laplacian") -> Run:
    r = af.run_autofocus(stage, camera, af.Scorer(metric), af.Plan(tuple(positions), search))
    return Run(search, r.verdict.kind, r.best_mm, r.fit.z_mm if r.fit.used else None, r.frames, r.moves,
               r.elapsed_s * 1e3 / max(r.frames, 1), r.timing.score_s * 1e3 / max(r.frames, 1))


def section_accuracy(quick: bool) -> None:
    accuracy_synthetic(quick)
    accuracy_objectives(quick)
    accuracy_specimens(quick)
    accuracy_replay(quick)


OBJECTIVE_STEPS_MM = {"4x": 0.05, "10x": 0.01, "20x": 0.004, "40x": 0.0015, "60x": 0.001}  # ~1 DOF each


def objective_case(objective: str, photons: float, where: float, n: int, search: str) -> tuple[str, float, int]:
    """One simulated run: (verdict, signed error in STEPs, frames)."""
    step = OBJECTIVE_STEPS_MM[objective]
    start, end = 10.0, 10.0 + (n - 1) * step
    focus = start + where * (n - 1) * step
    stage, camera = af.simulated_microscope(objective=objective, photons=photons, focus_mm=focus, width=320,
                                            height=200, time_scale=0, seed=0, start_mm=start)
    result = af.focus(stage, camera, start, end, step, search=search)
    return result.verdict.kind, (result.best_mm - focus) / step, result.frames


def accuracy_objectives(quick: bool) -> None:
    """Issue 11's matrix: objective x photons x focus offset x grid, both searches."""
    photons = (100, 1000) if quick else (100, 1000, 3000)
    grids = (25, 81) if quick else (25, 81, 200)
    offsets = {"mid-way": 0.5 + 0.5 / 80, "on grid": 0.5, "near low end": 0.06, "near high end": 0.93}
    header("Accuracy (c): objectives 4x-60x, fast vs sweep",
           f"simulator 320x200, STEP ~ one depth of field ({', '.join(f'{o} {s * 1000:g} um' for o, s in OBJECTIVE_STEPS_MM.items())}), "
           f"photons {photons}, focus {', '.join(offsets)}, grids {grids}; errors in STEPs, sweep = reference")
    rows, agree, errors, frames81 = [], [], {"sweep": [], "fast": []}, []
    for objective in OBJECTIVE_STEPS_MM:
        cells = []
        for ph in photons:
            for where in offsets.values():
                for n in grids:
                    sweep = objective_case(objective, ph, where, n, "sweep")
                    fast = objective_case(objective, ph, where, n, "fast")
                    ok = sweep[0] != "focused" or (fast[0] == "focused" and abs(fast[1] - sweep[1]) <= 0.25)
                    cells.append((sweep, fast, ok, n))
                    agree.append(ok)
                    for name, run in (("sweep", sweep), ("fast", fast)):
                        if run[0] == "focused":
                            errors[name].append(abs(run[1]))
                    if n == 81:
                        frames81.append(fast[2] / sweep[2])
        s_err = [abs(c[0][1]) for c in cells if c[0][0] == "focused"]
        f_err = [abs(c[1][1]) for c in cells if c[1][0] == "focused"]
        rows.append([objective, len(cells), sum(c[0][0] == "focused" for c in cells),
                     sum(c[1][0] == "focused" for c in cells), f"{sum(c[2] for c in cells)}/{len(cells)}",
                     fmt(med(s_err), 3), fmt(max(s_err), 3), fmt(med(f_err), 3), fmt(max(f_err), 3),
                     fmt(med([c[1][2] for c in cells if c[3] == 81]), 0)])
    table(["objective", "cases", "sweep focused", "fast focused", "fast = sweep (+-STEP/4)", "sweep err med",
           "sweep err worst", "fast err med", "fast err worst", "fast frames (81 grid)"], rows)
    target("fast focused and within STEP/4 of the sweep wherever the sweep is focused (objectives 4x-60x)",
           f"{sum(agree)}/{len(agree)}", all(agree))
    for name in ("sweep", "fast"):
        target(f"{name}: fit error median <= STEP/8, worst <= STEP/4 (STEP ~ 1 DOF)",
               f"median {med(errors[name]):.3f}, worst {max(errors[name]):.3f} STEP",
               med(errors[name]) <= 0.125 and max(errors[name]) <= 0.25)
    target("fast frames <= 20% of the sweep's on an 81-position grid (median)", f"{med(frames81):.1%}",
           med(frames81) <= 0.20)


def accuracy_specimens(quick: bool) -> None:
    """Issue 12's rows: unstained (transparent) specimens with --transparent, and the dusty one."""
    photons = (300, 1000) if quick else (100, 300, 1000, 3000)
    cases = {"10x": 0.003, "40x": 0.0005}  # STEP ~ DOF/3, range +-4 DOF (README, Unstained specimens)
    offsets = (0.0, 0.43, -2.6, 5.3)  # focus on the grid, between positions, off the centre
    header("Accuracy (d): transparent and dusty specimens",
           f"--sim-specimen transparent with --transparent: objectives {tuple(cases)}, STEP ~ DOF/3, range +-12 "
           f"STEPs, focus offsets {offsets} STEPs from the range centre, photons {photons}, 640x400; "
           "--sim-specimen dusty (dust 0.17 mm above the cells at 12.34 mm), 4x, 11.8..12.8 mm every 0.05")
    rows, worst, worst_bright = [], [], []
    for objective, step in cases.items():
        for search in ("sweep", "fast"):
            errs, verdicts, frames = [], [], []
            for ph in photons:
                for off in offsets:
                    focus_mm = 12.34 + off * step
                    stage, camera = af.simulated_microscope(objective=objective, specimen="transparent",
                                                            focus_mm=focus_mm, photons=ph, width=640, height=400,
                                                            time_scale=0, start_mm=12.34)
                    r = af.focus(stage, camera, 12.34 - 12 * step, 12.34 + 12 * step, step, search=search,
                                 transparent=True)
                    verdicts.append(r.verdict.kind)
                    frames.append(r.frames)
                    if r.verdict.kind == "focused":
                        errs.append(abs(r.best_mm - focus_mm) / step)
                        if ph >= 300:
                            worst_bright.append(errs[-1])
            worst.extend(errs)
            rows.append([objective, search, f"{verdicts.count('focused')}/{len(verdicts)}", fmt(med(errs), 3),
                         fmt(max(errs), 3), fmt(med(frames), 0)])
    table(["objective", "search", "focused", "error med (STEP)", "error worst (STEP)", "frames med"], rows)
    target("--transparent: focused within STEP/4 of the focal plane (10x, 40x; sweep and fast; photons >= 300)",
           f"worst {max(worst_bright):.3f} STEP over {len(worst_bright)} focused runs (all photons: worst "
           f"{max(worst):.3f})", max(worst_bright) <= 0.25)
    picks = []
    for policy in af.PEAK_CHOICES:
        stage, camera = af.simulated_microscope(specimen="dusty", width=640, height=400, time_scale=0, start_mm=12.45)
        r = af.focus(stage, camera, 11.8, 12.8, 0.05, peak=policy)
        picks.append([policy, ", ".join(f"{p.z_mm:.2f}" for p in r.peaks), f"{r.best_mm:.4f}",
                      "specimen (12.34)" if abs(r.best_mm - 12.34) < 0.025 else
                      "dust (12.51)" if abs(r.best_mm - 12.51) < 0.025 else "neither"])
    print("Dusty specimen (stage starting at 12.45 mm):\n")
    table(["--peak", "significant peaks (mm)", "stage sent to (mm)", "which"], picks)


def accuracy_synthetic(quick: bool) -> None:
    photons_list = (100, 300, 1000, 3000)
    inside = (11.57, 12.34) if quick else (10.8, 11.57, 12.34, 13.12)
    near_outside = (9.85, 14.15)  # 3 depths of field beyond an end of the range
    far_outside = (15.0,) if quick else (9.0, 15.0)  # 1 mm (14 depths of field) beyond an end
    seeds = (0,) if quick else (0, 1, 2)
    positions = af.plan_positions(*RANGE_MM, STEP_MM)
    dof = af.SimOptics().depth_of_field_um
    header("Accuracy (a): simulator with known truth",
           f"run_autofocus over {RANGE_MM[0]:g}->{RANGE_MM[1]:g} mm, STEP {STEP_MM} mm ({len(positions)} positions; "
           f"depth of field of the simulated 4x/0.10 = {dof:.0f} um), metric laplacian, SimTiming(scale=0), "
           f"640x400 frames (plus 1920x1200 rows), photons {photons_list}, seeds {seeds}; focal planes inside "
           f"{inside}, near outside {near_outside} and far outside {far_outside} (expect edge), blank specimen "
           "(expect no_peak)")
    cases = []  # (size, photons, kind, focus)
    for photons in photons_list:
        cases += [((640, 400), photons, "inside", f) for f in inside]
        cases += [((640, 400), photons, "near outside", f) for f in near_outside]
        cases += [((640, 400), photons, "far outside", f) for f in far_outside]
        cases.append(((640, 400), photons, "blank", 12.34))
    cases += [((1920, 1200), photons, "inside", 12.34) for photons in ((1000,) if quick else (100, 1000))]
    results = []  # dicts
    for size, photons, kind, focus in cases:
        for seed in (seeds if size == (640, 400) else (0,)):
            optics = af.SimOptics(focus_mm=focus, width=size[0], height=size[1], photons=photons, seed=seed,
                                  specimen="blank" if kind == "blank" else "cells")
            pair = {}
            for search in ("sweep", "fast"):
                stage, camera, _ = sim_pair(optics)
                pair[search] = run_once(stage, camera, positions, search)
            results.append(dict(size=size, photons=photons, kind=kind, focus=focus, seed=seed, **pair))

    expected = {"inside": "focused", "near outside": "edge", "far outside": "edge", "blank": "no_peak"}

    def err_um(run: Run, focus: float) -> float:
        return abs(run.best_mm - focus) * 1000.0

    def counts(runs: list[Run]) -> str:
        c: dict[str, int] = {}
        for x in runs:
            c[x.verdict] = c.get(x.verdict, 0) + 1
        return ", ".join(f"{n} {v}" for v, n in sorted(c.items()))

    # Detail: one row per case (seeds pooled).
    keys = list(dict.fromkeys((r["size"], r["photons"], r["kind"], r["focus"]) for r in results))
    rows = []
    for k in keys:
        group = [r for r in results if (r["size"], r["photons"], r["kind"], r["focus"]) == k]
        size, photons, kind, focus = k
        row: list[object] = [f"{size[0]}x{size[1]}", photons, "blank" if kind == "blank" else f"{focus:g}",
                             expected[kind]]
        for search in ("sweep", "fast"):
            runs = [g[search] for g in group]
            row.append(counts(runs))
            row.append(fmt(med([err_um(x, focus) for x in runs]), 1) if kind == "inside" else "-")
            row.append(fmt(med([x.frames for x in runs]), 0))
        rows.append(row)
    print("Per case (seeds pooled; |err| = |best_mm - true focus| where the stage was sent, median over seeds; "
          "a no_peak run is sent back to its start, 0 mm):\n")
    table(["frame", "photons", "true focus mm", "expected", "sweep verdicts", "sweep |err| um", "sweep frames",
           "fast verdicts", "fast |err| um", "fast frames"], rows)

    # Summary per mode.
    rows = []
    fit_errors = {}
    for search in ("sweep", "fast"):
        runs = [(r, r[search]) for r in results]
        wrong = sum(1 for r, x in runs if x.verdict != expected[r["kind"]])
        ins = [(r, x) for r, x in runs if r["kind"] == "inside"]
        errs = [err_um(x, r["focus"]) for r, x in ins]
        found = [err_um(x, r["focus"]) for r, x in ins if x.verdict == "focused"]
        fits = [abs(x.fit_mm - r["focus"]) * 1000 for r, x in ins if x.fit_mm is not None and x.verdict == "focused"]
        fit_errors[search] = (med(fits), len(fits), len(ins))
        small = [x for r, x in runs if r["size"] == (640, 400)]
        rows.append([search, counts([x for _, x in runs]), f"{wrong}/{len(runs)}",
                     fmt(med(errs), 1), fmt(max(errs), 1), fmt(med(errs) / (STEP_MM * 1000), 2),
                     fmt(max(found) if found else float("nan"), 1),
                     fmt((max(found) if found else float("nan")) / (STEP_MM * 1000), 2),
                     f"{fmt(med(fits), 1)} ({len(fits)}/{len(ins)})",
                     fmt(med([x.frames for _, x in runs]), 0), fmt(med([x.moves for _, x in runs]), 0),
                     fmt(med([x.ms_per_frame for x in small]), 1), fmt(med([x.score_ms_per_frame for x in small]), 1)])
    print(f"Summary per mode ({len(results)} runs each; errors over the {len(ins)} in-range runs, STEP = "
          f"{STEP_MM * 1000:g} um; 'max |err| focused' leaves out the in-range runs judged no_peak; host ms/frame at "
          "640x400 includes the simulator's rendering):\n")
    table(["search", "verdicts", "wrong verdicts", "median |err| um", "max |err| um", "median |err| STEPs",
           "max |err| focused um", "max |err| focused STEPs", "fitted-peak median |err| um (runs)",
           "median frames", "median moves", "host ms/frame", "score ms/frame"], rows)

    ratios = [r["fast"].frames / r["sweep"].frames for r in results]
    ratios_in = [r["fast"].frames / r["sweep"].frames for r in results if r["kind"] == "inside"]
    step_um = STEP_MM * 1000 + 1e-6
    within = [r for r in results if r["kind"] == "inside" and err_um(r["sweep"], r["focus"]) <= step_um]
    misses = [r for r in within if err_um(r["fast"], r["focus"]) > step_um]
    table(["fast/sweep frames", "median", "max", "max (in-range focus)", "fast off by > 1 STEP where sweep is within"],
          [["ratio", f"{med(ratios):.0%}", f"{max(ratios):.0%}", f"{max(ratios_in):.0%}",
            f"{len(misses)} of {len(within)}"]])
    for r in misses:
        print(f"- miss: photons {r['photons']}, focus {r['focus']}, seed {r['seed']}, {r['size']}: sweep "
              f"{r['sweep'].best_mm:.4f}, fast {r['fast'].best_mm:.4f} ({r['fast'].verdict})")
    wrong_focused = [(r, s) for r in results for s in ("sweep", "fast")
                     if r["kind"] != "inside" and r[s].verdict == "focused"]
    for r, s in wrong_focused:
        print(f"- {s} said focused with the focal plane {'absent' if r['kind'] == 'blank' else 'at ' + str(r['focus'])}"
              f" mm (photons {r['photons']}, seed {r['seed']}): sent to {r[s].best_mm:.4f} mm")
    if misses or wrong_focused:
        print()

    # A field with nothing to focus on (blank, or focus far outside) makes the fast search halve
    # its spacing down to the full grid before it says so: those cost a sweep by design.
    target(f"fast uses <= 20% of the sweep's frames where the focus is in the range (synthetic, {len(positions)} "
           "positions; median; blank fields cost a sweep by design)",
           f"median {med(ratios_in):.0%}, max {max(ratios_in):.0%}", med(ratios_in) <= 0.20)
    target("fast within one STEP of the truth wherever the sweep is (synthetic)",
           f"{len(misses)} misses of {len(within)}", not misses)
    for search in ("sweep", "fast"):
        m, n, total = fit_errors[search]
        target(f"{search}: fitted peak median |err| <= STEP/4 ({STEP_MM * 250:g} um), STEP ~ 1 DOF (synthetic)",
               f"{m:.1f} um over {n}/{total} fitted runs", m <= STEP_MM * 250)
    for kind, label in (("inside", "focal plane inside the range gives focused (synthetic, all photons)"),
                        ("near outside", "focal plane 0.15 mm outside the range gives edge"),
                        ("far outside", "focal plane 1 mm outside the range gives edge"),
                        ("blank", "blank field gives no_peak (simulator)")):
        for search in ("sweep", "fast"):
            runs = [r for r in results if r["kind"] == kind]
            good = sum(1 for r in runs if r[search].verdict == expected[kind])
            bad = [r for r in runs if r[search].verdict != expected[kind]]
            where = {}
            for r in bad:
                where.setdefault(f"{r['photons']} photons", []).append(r[search].verdict)
            detail = "; ".join(f"{k}: {len(v)} {'/'.join(sorted(set(v)))}" for k, v in where.items())
            target(f"{search}: {label}", f"{good}/{len(runs)}" + (f" (wrong: {detail})" if detail else ""),
                   good == len(runs))
    for search in ("sweep", "fast"):
        bad = sum(1 for r, s in wrong_focused if s == search)
        n = sum(1 for r in results if r["kind"] != "inside")
        target(f"{search}: never 'focused' when the focal plane is outside the range or absent",
               f"{bad}/{n} wrongly focused", bad == 0)

    # Which metrics survive low light (the default laplacian is the one the targets use).
    photons_m = (100,) if quick else photons_list
    rows = []
    for photons in photons_m:
        optics = af.SimOptics(focus_mm=12.34, width=640, height=400, photons=photons)
        row: list[object] = [photons]
        for metric in af.METRICS:
            for search in ("sweep", "fast"):
                stage, camera, _ = sim_pair(optics)
                x = run_once(stage, camera, positions, search, metric)
                row.append(f"{x.verdict[:2]} {err_um(x, 12.34):.0f}" if x.verdict != "no_peak" else "no_peak")
        rows.append(row)
    print("Every metric at each noise level (640x400, focus 12.34 mm, seed 0; fo=focused, ed=edge; number = "
          "|err| um):\n")
    table(["photons", *[f"{m} {s}" for m in af.METRICS for s in ("sweep", "fast")]], rows)


def parse_truth(folder: Path) -> tuple[int, float] | None:
    path = folder / "TRUTH.txt"
    if not path.is_file():
        return None
    m = re.search(r"slice\s+(\d+)\s*\(z_mm\s*=\s*([-+0-9.eE]+)\)", path.read_text(encoding="utf-8").splitlines()[0])
    return (int(m.group(1)), float(m.group(2))) if m else None


def replay_run(stack: af.ReplayStack, step: float, search: str, metric: str) -> Run:
    """focus() on a replay stage: a grid off the recorded slices is snapped to them, as the CLI does."""
    lo, hi = stack.range_mm
    stage = af.ReplayStage(stack)
    r = af.focus(stage, af.ReplayCamera(stage, stack), lo, hi, step, search=search, metric=metric)
    return Run(search, r.verdict.kind, r.best_mm, r.fit.z_mm if r.fit.used else None, r.frames, r.moves,
               r.elapsed_s * 1e3 / max(r.frames, 1), r.timing.score_s * 1e3 / max(r.frames, 1))


def write_blank_stack(folder: Path, n: int = 31, step: float = 0.01) -> None:
    optics = af.SimOptics(width=640, height=400, specimen="blank", focus_mm=0.15)
    stage, camera, _ = sim_pair(optics)
    lines = ["z_mm,file"]
    for i in range(n):
        z = round(i * step, 9)
        stage.z = z
        name = f"slice_{i:03d}.png"
        cv2.imwrite(str(folder / name), camera.capture())
        lines.append(f"{z:.6f},{name}")
    (folder / "stack.csv").write_text("\n".join(lines) + "\n")


def accuracy_replay(quick: bool) -> None:
    header("Accuracy (b): recorded stacks (replay)",
           f"every stack in {SHARED_STACKS}, full z range, STEP = median z spacing, SimStage(scale=0) + "
           "ReplayCamera; plus a blank stack rendered by the simulator (640x400, 31 slices, 0.01 mm)")
    have_shared = SHARED_STACKS.is_dir()
    if not have_shared:
        print(f"SKIPPED the shared stacks: {SHARED_STACKS} is absent (a clone without ../shared).\n")
    folders = sorted(p for p in SHARED_STACKS.iterdir() if (p / "stack.csv").is_file()) if have_shared else []
    rows, matrix, misses, ratios = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="af_blank_") as tmp:
        write_blank_stack(Path(tmp))
        entries = [(p.name, p, parse_truth(p)) for p in folders] + [("blank (simulated)", Path(tmp), None)]
        blank_ok = {}
        for name, folder, truth in entries:
            t0 = time.perf_counter()
            stack = af.ReplayStack(folder)
            load_s = time.perf_counter() - t0
            step = float(np.median(np.diff(np.sort(stack.z_mm))))
            f0 = stack.frames[0]
            shape = f"{f0.shape[1]}x{f0.shape[0]}" + (f"x{f0.shape[2]}" if f0.ndim == 3 else "") + f" {f0.dtype}"
            n_grid = len(af.plan_positions(*stack.range_mm, step))
            mrow: list[object] = [name]
            for metric in af.METRICS:
                per_mode = {}
                for search in ("sweep", "fast"):
                    run = replay_run(stack, step, search, metric)
                    per_mode[search] = run
                    if truth is not None:
                        idx, tz = truth
                        err = abs(run.best_mm - tz) * 1000
                        nearest = int(np.argmin(np.abs(stack.z_mm - run.best_mm)))
                        dslice = abs(nearest - idx)
                        mrow.append(f"{run.verdict[:2]} {dslice}")
                    else:
                        err, dslice = float("nan"), None
                        mrow.append(run.verdict)
                    if metric == "laplacian":
                        rows.append([name, shape, len(stack.frames), f"{step * 1000:.3g}", n_grid, search,
                                     run.verdict, "-" if truth is None else fmt(err, 2),
                                     "-" if truth is None else dslice, run.frames, run.moves,
                                     fmt(run.ms_per_frame, 1)])
                    if truth is None and metric == "laplacian":
                        blank_ok[search] = run.verdict
                if truth is not None:
                    e = {s: abs(per_mode[s].best_mm - truth[1]) for s in per_mode}
                    if e["sweep"] <= step + 1e-12 and e["fast"] > step + 1e-12:
                        misses.append(f"{name} / {metric}: sweep {per_mode['sweep'].best_mm:.6f}, "
                                      f"fast {per_mode['fast'].best_mm:.6f} mm, truth {truth[1]:.6f}")
                    ratios.append(per_mode["fast"].frames / per_mode["sweep"].frames)
            matrix.append(mrow)
            print(f"- loaded {name}: {len(stack.frames)} slices {shape} in {load_s:.2f} s"
                  + (f"; truth slice {truth[0]} (z = {truth[1]:g} mm)" if truth else "; no truth (expect no_peak)"))
        print()
        table(["stack", "frame", "slices", "STEP um", "grid", "search", "verdict", "|err| um", "|err| slices",
               "frames", "moves", "host ms/frame"], rows)
        print("Every metric (verdict prefix: fo=focused, ed=edge, no=no_peak; number = |slice error|):\n")
        table(["stack", *[f"{m} {s}" for m in af.METRICS for s in ("sweep", "fast")]], matrix)
        if ratios:
            print(f"fast/sweep frames on the recorded stacks (31-slice grids or fewer: fixed refinement cost "
                  f"dominates): median {med(ratios):.0%}, max {max(ratios):.0%}\n")
        for m in misses:
            print(f"- fast off by > 1 STEP where the sweep is within: {m}")
        if misses:
            print()
    if have_shared:
        target("fast within one STEP of the truth wherever the sweep is (recorded stacks, every metric)",
               f"{len(misses)} misses", not misses)
    else:
        target("fast within one STEP of the truth wherever the sweep is (recorded stacks)", "../shared absent", None)
    for search in ("sweep", "fast"):
        target(f"{search}: blank replayed stack gives no_peak", blank_ok.get(search, "-"),
               blank_ok.get(search) == "no_peak")


###############################################################################
# 3. Timing
###############################################################################


def seed_style_loop(optics: af.SimOptics, positions: list[float], start_mm: float) -> dict:
    """A benchmark baseline, not a product mode: the seed article's loop.

    ZML's default 50 ms idle polling, one-shot acquisition (start/stop per frame), the naive
    score computed in series, best sample kept (no fit), then a move to it.
    """
    stage, camera, clock = sim_pair(optics, start_mm, scale=1.0, poll_s=0.05, one_shot=True)
    move_s = capture_s = score_s = 0.0
    best_z, best = None, -1.0
    moves = frames = 0
    t0 = time.perf_counter()
    for z in positions:
        t = time.perf_counter()
        stage.move_to(z)
        moves += 1
        t1 = time.perf_counter()
        img = camera.capture()
        frames += 1
        t2 = time.perf_counter()
        s = naive_median_score(img)
        t3 = time.perf_counter()
        move_s += t1 - t
        capture_s += t2 - t1
        score_s += t3 - t2
        if s > best:
            best, best_z = s, z
    t = time.perf_counter()
    stage.move_to(best_z)
    moves += 1
    move_s += time.perf_counter() - t
    wall = time.perf_counter() - t0
    return dict(wall=wall, modeled=clock.modeled_s, frames=frames, moves=moves, best_mm=best_z,
                move_s=move_s, capture_s=capture_s, score_s=score_s)


def ours(optics: af.SimOptics, positions: list[float], start_mm: float, search: str,
         roi: af.Roi | None = None) -> dict:
    stage, camera, clock = sim_pair(optics, start_mm, scale=1.0, roi=roi)
    t0 = time.perf_counter()
    r = af.run_autofocus(stage, camera, af.Scorer(), af.Plan(tuple(positions), search))
    wall = time.perf_counter() - t0
    return dict(wall=wall, modeled=clock.modeled_s, frames=r.frames, moves=r.moves, best_mm=r.best_mm,
                move_s=r.timing.move_s, capture_s=r.timing.capture_s, score_s=r.timing.score_s,
                verdict=r.verdict.kind)


def section_timing(quick: bool) -> None:
    repeats = 1 if quick else 3
    optics = af.SimOptics()  # 1920x1200, 8-bit, photons 1000, focus 12.34
    positions = af.plan_positions(*RANGE_MM, STEP_MM)
    start = RANGE_MM[0]
    header("Time to focus (real-time simulator)",
           f"1920x1200 8-bit, focus {optics.focus_mm} mm, {RANGE_MM[0]:g}->{RANGE_MM[1]:g} mm every {STEP_MM} mm "
           f"({len(positions)} positions), stage starts at {start:g} mm, SimTiming(scale=1) real sleeping, one "
           f"SimClock shared by stage and camera; median of {repeats} repeat(s); seed-style loop = ZML 50 ms "
           "polling + one-shot acquisition + medianBlur 9/Laplacian CV_64F scored in series (a baseline)")
    sim_frame(optics, optics.focus_mm)  # warm the specimen cache for everyone
    modes = {"seed-style loop (baseline)": lambda: seed_style_loop(optics, positions, start),
             "our sweep": lambda: ours(optics, positions, start, "sweep"),
             "our fast": lambda: ours(optics, positions, start, "fast"),
             # --camera-roi: a centred 640x400 sensor ROI reads a third of the rows (SimTiming.readout_rows_s)
             "our sweep, --camera-roi 640,400,640,400": lambda: ours(optics, positions, start, "sweep",
                                                                     roi=(640, 400, 640, 400))}
    runs: dict[str, list[dict]] = {k: [] for k in modes}
    for _ in range(repeats):
        for k, fn in modes.items():
            runs[k].append(fn())

    def m(k: str, field: str) -> float:
        return med([r[field] for r in runs[k]])

    seed_wall = m("seed-style loop (baseline)", "wall")
    rows = []
    for k in modes:
        errs = [abs(r["best_mm"] - optics.focus_mm) * 1000 for r in runs[k]]
        ratios = [r["wall"] / r["modeled"] for r in runs[k]]
        rows.append([k, fmt(m(k, "wall"), 2), fmt(m(k, "modeled"), 2), fmt(med(ratios), 3),
                     fmt(m(k, "frames"), 0), fmt(m(k, "moves"), 0), fmt(med(errs), 1),
                     f"{seed_wall / m(k, 'wall'):.1f}x", runs[k][0].get("verdict", "(no verdict)")])
    table(["mode", "wall s", "modeled hardware s", "wall / modeled", "frames", "moves", "|err| um",
           "speed-up vs seed loop", "verdict"], rows)
    rows = []
    for k in modes:
        ratio = [r["wall"] / (r["move_s"] + r["capture_s"]) for r in runs[k]]
        rows.append([k, fmt(m(k, "move_s"), 3), fmt(m(k, "capture_s"), 3), fmt(m(k, "score_s"), 3),
                     fmt(m(k, "wall"), 3), fmt(med(ratio), 3),
                     fmt(1000 * (m(k, "wall") - m(k, "move_s") - m(k, "capture_s")) / max(m(k, "frames"), 1), 1)])
    print("Timing totals as the tool measures them (result.timing; the seed loop's measured the same way):\n")
    table(["mode", "move_s", "capture_s", "score_s", "wall s", "wall / (move_s + capture_s)",
           "overhead ms/frame"], rows)
    seed_err = med([abs(r["best_mm"] - optics.focus_mm) * 1000 for r in runs["seed-style loop (baseline)"]])
    for k in ("our sweep", "our fast"):
        ratio_modeled = med([r["wall"] / r["modeled"] for r in runs[k]])
        ratio_measured = med([r["wall"] / (r["move_s"] + r["capture_s"]) for r in runs[k]])
        target(f"{k}: host overhead, wall <= 1.05 x (move + capture) [modeled hardware time]",
               f"{ratio_modeled:.3f}x (vs measured move_s+capture_s: {ratio_measured:.3f}x)",
               ratio_modeled <= 1.05)
    k = "our fast"
    speed = seed_wall / m(k, "wall")
    err = med([abs(r["best_mm"] - optics.focus_mm) * 1000 for r in runs[k]])
    equal = err <= max(seed_err, STEP_MM * 250)
    target("time to focus 10->14 mm at 0.05 mm >= 10x faster than the seed-style loop at equal accuracy "
           "(our fast; |err| <= the seed's or <= STEP/4)",
           f"{speed:.1f}x; |err| {err:.1f} um vs seed {seed_err:.1f} um (our sweep: "
           f"{seed_wall / m('our sweep', 'wall'):.1f}x)", speed >= 10 and equal)


###############################################################################
# 4. Memory
###############################################################################


class VirtualDisplay:
    """An Xvfb server started here (and only here) for --show-images; None when unavailable."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.display: str | None = None
        self.why = ""
        exe = shutil.which("Xvfb")
        if exe is None:
            self.why = "Xvfb is not installed (apt-get install -y xvfb)"
            return
        r, w = os.pipe()
        try:
            self.proc = subprocess.Popen([exe, "-displayfd", str(w), "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
                                         pass_fds=(w,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            os.close(w)
            deadline = time.monotonic() + 10
            buf = b""
            os.set_blocking(r, False)
            while time.monotonic() < deadline and not buf.endswith(b"\n"):
                try:
                    chunk = os.read(r, 16)
                    if not chunk:
                        break
                    buf += chunk
                except BlockingIOError:
                    time.sleep(0.05)
            if buf.strip().isdigit():
                self.display = ":" + buf.strip().decode()
            else:
                self.why = "Xvfb did not report a display"
                self.close()
        finally:
            os.close(r)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


# A fresh, small interpreter starts the CLI and reports the CLI's own peak RSS.  Measuring
# from this (large) benchmark process directly would not work: on Linux a child's ru_maxrss
# includes the RSS of the process it was forked from (recorded when it execs), so every child
# would report at least the benchmark's own size.
_RSS_HELPER = """
import os, subprocess, sys
p = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(p.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def cli_peak_rss(args: list[str], env: dict[str, str]) -> tuple[float, float, int, str]:
    """Run the CLI as a grandchild; its own peak RSS (MB, from wait4), wall s, exit code and summary line."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.TemporaryDirectory(prefix="af_rss_") as tmp:
        report = Path(tmp) / "rss.txt"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", _RSS_HELPER, str(report), sys.executable, str(ROOT / "autofocus.py"),
                        *args], stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=str(ROOT), check=False)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        lines = out.read().decode(errors="replace").strip().splitlines()
        errors = err.read().decode(errors="replace").strip().splitlines()
        tail = lines[0] if lines else (errors[-1] if errors else "")
        try:
            kb, code = report.read_text().split()
        except (OSError, ValueError):
            return float("nan"), wall, -1, "helper failed: " + " / ".join(errors[-2:])
    return int(kb) / 1024.0, wall, int(code), tail


def section_memory(quick: bool) -> None:
    big = 60 if quick else 500
    step = 0.008
    focus = af.SimOptics().focus_mm
    header("Memory (peak RSS of the CLI)",
           f"`python autofocus.py A B {step} --simulate --sim-time-scale 0 --save-images DIR [--show-images]`, "
           f"1920x1200 8-bit, 10 vs {big} steps centred on the focus {focus} mm; peak RSS of each child from "
           "os.wait4 (ru_maxrss)" + ("; --quick uses fewer steps than the 500 of the target" if quick else ""))
    if not hasattr(os, "wait4"):
        print("SKIPPED: os.wait4 is not available on this platform.\n")
        target("500-step peak RSS within 100 MB of the 10-step run", "skipped", None)
        return
    display = VirtualDisplay()
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    rows = []
    results: dict[tuple[str, int], float] = {}
    try:
        variants = [("--save-images", [], env)]
        if display.display:
            variants.append(("--save-images --show-images", ["--show-images"],
                             {**env, "DISPLAY": display.display, "QT_QPA_PLATFORM": "xcb"}))
        else:
            print(f"SKIPPED the --show-images rows: no virtual display ({display.why}).\n")
        for label, extra, child_env in variants:
            for n in (10, big):
                a = round(focus - n * step / 2, 6)
                b = round(a + n * step, 6)
                with tempfile.TemporaryDirectory(prefix="af_mem_") as tmp:
                    rss, wall, code, tail = cli_peak_rss(
                        [f"{a:g}", f"{b:g}", f"{step:g}", "--simulate", "--sim-time-scale", "0",
                         "--save-images", tmp, *extra], child_env)
                    saved = len(list(Path(tmp).glob("*.png")))
                results[(label, n)] = rss
                rows.append([label, n, f"{a:g} {b:g}", saved, code, fmt(rss, 1), fmt(wall, 1), tail[:70]])
                print(f"- {label} {n} steps: {rss:.1f} MB, {wall:.1f} s, exit {code}", flush=True)
    finally:
        display.close()
    print()
    table(["options", "steps", "range mm", "frames saved", "exit", "peak RSS MB", "wall s", "summary"], rows)
    for label in ("--save-images", "--save-images --show-images"):
        if (label, big) in results:
            growth = results[(label, big)] - results[(label, 10)]
            target(f"{label}: {big}-step peak RSS within 100 MB of the 10-step run",
                   f"{growth:+.1f} MB ({results[(label, 10)]:.0f} -> {results[(label, big)]:.0f} MB)",
                   growth <= 100)
        else:
            target(f"{label}: {big}-step peak RSS within 100 MB of the 10-step run",
                   f"skipped ({display.why})", None)


###############################################################################
# 5. Focus maps
###############################################################################

MAP_AREA = (44.0, 33.0, 56.0, 42.0)
MAP_RANGE = (12.26, 12.42, 0.004)  # 20x: depth of field 4.2 um, STEP 4 um, 41 positions
MAP_SLIDES = {  # SimSlide fields (the slide centre is (50, 37.5) mm; the area is 12 x 9 mm)
    "tilted + bowed": {},  # 4 / -2.5 um/mm, 0.15 um/mm^2: the simulator's default slide
    "steeper": dict(tilt_um_per_mm=(8.0, -6.0), bow_um_per_mm2=0.3),
    "bare glass": dict(bare_glass=((48.5, 35.0, 51.5, 40.5),)),  # 2 of the 5x4 points
    "rippled": dict(ripple_um=1.5, ripple_mm=10.0),  # a warp no polynomial follows
}


def real_texture_specimens() -> tuple[str, object] | None:
    """A make_specimen that shows crops of a real micrograph (the in-focus slice of a shared
    stack, fluorescence microtubules) for "cells", one crop per field of view (per seed)."""
    folder = SHARED_STACKS / "dfnn_microtubules_lightsheet"
    truth = parse_truth(folder)
    if truth is None:
        return None
    stack = af.ReplayStack(folder)
    image = af.to_gray_float(stack.nearest(truth[1]))
    image = (image - image.min()) / max(float(image.max() - image.min()), 1e-9)
    original = af.make_specimen

    def specimen(width: int, height: int, kind: str = "cells", seed: int = 0) -> np.ndarray:
        if kind != "cells":
            return original(width, height, kind, seed)
        rng = np.random.default_rng(seed)
        src = image if image.shape[0] >= height and image.shape[1] >= width else cv2.resize(
            image, (max(width, image.shape[1]), max(height, image.shape[0])))
        y = int(rng.integers(0, src.shape[0] - height + 1))
        x = int(rng.integers(0, src.shape[1] - width + 1))
        return np.ascontiguousarray(src[y:y + height, x:x + width], np.float32)

    return folder.name, specimen


def map_case(slide: dict, grid: tuple[int, int], photons: float, size: tuple[int, int], seed: int,
             strategy: str) -> dict:
    """One map: ours ("map"), or a full search at every grid point ("fast" / "sweep") fitted the same way."""
    plate, stage, camera = af.simulated_slide(objective="20x", width=size[0], height=size[1], time_scale=0.0,
                                              seed=seed, photons=photons, start_mm=12.30, **slide)
    lo, hi, step = MAP_RANGE
    if strategy == "map":
        fmap = af.focus_map(plate, stage, camera, area_mm=MAP_AREA, grid=grid, start_mm=lo, end_mm=hi, step_mm=step)
    else:
        points = []
        for x, y in af.snake_path(MAP_AREA, grid):
            plate.move_to(x, y)
            r = af.focus(stage, camera, lo, hi, step, search=strategy)
            points.append(af.MapPoint(x, y, r, (r,), "used" if r.verdict.kind == "focused" else "not_focused"))
        fmap = af.summarise_map(points, area_mm=MAP_AREA, grid=grid, depth_of_field_mm=step, range_mm=(lo, hi),
                                step_mm=step)
    gx, gy = np.meshgrid(np.linspace(MAP_AREA[0], MAP_AREA[2], 49), np.linspace(MAP_AREA[1], MAP_AREA[3], 37))
    bare = np.array([[camera.slide.bare(a, b) for a, b in zip(r, s)] for r, s in zip(gx, gy)])
    if fmap.surface is None:
        err = np.array([np.inf])
    else:
        err = (1000.0 * (fmap.z_at(gx, gy) - camera.slide.z_mm(gx, gy)))[~bare]
    bare_points = [p for p in fmap.points if camera.slide.bare(p.x_mm, p.y_mm)]
    return {"frames": fmap.frames / len(fmap.points), "rms": float(np.sqrt(np.mean(err ** 2))),
            "worst": float(np.max(np.abs(err))), "model": fmap.model or "-", "loo": fmap.loo_rms_um,
            "trusted": fmap.trusted, "bare_reported": all(p.status == "not_focused" for p in bare_points),
            "bare": len(bare_points), "outliers": sum(p.status == "outlier" for p in fmap.points),
            "fmap": fmap}


def section_map(quick: bool) -> None:
    seeds = range(2) if quick else range(5)
    sizes = [(320, 200)] if quick else [(320, 200), (640, 400)]
    photon_levels = (1000.0,) if quick else (300.0, 1000.0)
    strategies = ("map", "fast") if quick else ("map", "fast", "sweep")
    header("Focus maps",
           f"simulated slide on a plate, area {MAP_AREA[0]:g},{MAP_AREA[1]:g}..{MAP_AREA[2]:g},{MAP_AREA[3]:g} mm, "
           f"objective 20x (NA 0.40, depth of field 4.2 um), START..END {MAP_RANGE[0]}..{MAP_RANGE[1]} mm, STEP "
           f"{MAP_RANGE[2] * 1000:g} um; the simulator's Gaussian defocus; specimen: simulated cells re-seeded per "
           f"field of view; frames {', '.join(f'{w}x{h}' for w, h in sizes)}; photons "
           f"{', '.join(f'{p:g}' for p in photon_levels)}; seeds {list(seeds)}; |err| = z_at vs the true surface on a "
           "49x37 grid (bare glass excluded); map = focus_map(), fast/sweep = that search over START..END at every "
           "grid point, fitted the same way")
    rows, results = [], {}
    for name, slide in MAP_SLIDES.items():
        for grid in ((5, 4),) if name != "tilted + bowed" or quick else ((5, 4), (7, 5)):
            for photons in photon_levels:
                for strategy in strategies:
                    if strategy == "sweep" and (name, grid, photons) != ("tilted + bowed", (5, 4), 1000.0):
                        continue  # the sweep (41 frames a point) as a reference on the main case only
                    cases = [map_case(slide, grid, photons, size, seed, strategy) for size in sizes for seed in seeds]
                    results[(name, grid, photons, strategy)] = cases
                    rows.append([name, f"{grid[0]}x{grid[1]}", f"{photons:g}", strategy,
                                 fmt(med([c["frames"] for c in cases])), fmt(max(c["frames"] for c in cases)),
                                 fmt(med([c["rms"] for c in cases]), 2), fmt(max(c["rms"] for c in cases), 2),
                                 fmt(max(c["worst"] for c in cases), 2),
                                 fmt(med([c["loo"] if c["loo"] is not None else float("nan") for c in cases]), 2),
                                 " ".join(sorted({c["model"] for c in cases})),
                                 f"{sum(c['trusted'] for c in cases)}/{len(cases)}",
                                 f"{sum(c['bare_reported'] for c in cases)}/{len(cases)}" if cases[0]["bare"] else "-"])
    table(["slide", "grid", "photons", "strategy", "frames/point med", "frames/point max", "RMS um med",
           "RMS um max", "worst um max", "leave-one-out um med", "models", "trusted", "bare glass reported"], rows)
    main_cases = results[("tilted + bowed", (5, 4), 1000.0, "map")]
    full_cases = results[("tilted + bowed", (5, 4), 1000.0, "fast")]
    fpp = med([c["frames"] for c in main_cases])
    rms_max = max(c["rms"] for c in main_cases)
    worst_max = max(c["worst"] for c in main_cases)
    cond = f"20x, STEP 4 um, 1000 photons, {'/'.join(f'{w}x{h}' for w, h in sizes)}, {len(main_cases)} maps"
    target(f"map of the tilted, bowed slide: z_at RMS <= 0.5 um and worst <= 1.5 um ({cond})",
           f"RMS max {rms_max:.2f} um, worst max {worst_max:.2f} um", rms_max <= 0.5 and worst_max <= 1.5)
    target(f"map of the tilted, bowed slide: <= 10 frames a point, median ({cond}; stretch <= 8)",
           f"{fpp:.1f} frames a point (a full fast search at every point: "
           f"{med([c['frames'] for c in full_cases]):.1f}, ratio {fpp / med([c['frames'] for c in full_cases]):.2f})",
           fpp <= 10)
    bare = results[("bare glass", (5, 4), 1000.0, "map")]
    plain = main_cases
    bend = max(float(np.max(np.abs(np.asarray(b["fmap"].z_grid((25, 19))) - np.asarray(p["fmap"].z_grid((25, 19))))))
               for b, p in zip(bare, plain)) * 1000.0
    target("bare glass: every bare point reported (not_focused) and the surface within 1 um of the plain slide's",
           f"{sum(c['bare_reported'] for c in bare)}/{len(bare)} maps reported all; largest change {bend:.2f} um",
           all(c["bare_reported"] for c in bare) and bend <= 1.0)
    ripple = results[("rippled", (5, 4), 1000.0, "map")]
    honest = sum((c["loo"] or 0) >= 0.5 * c["rms"] for c in ripple)
    print(f"On the rippled slide (1.5 um, 10 mm wavelength) no surface follows the warp at 5x4 points "
          f"(RMS {med([c['rms'] for c in ripple]):.2f} um); the leave-one-out error says so "
          f"({med([c['loo'] for c in ripple]):.2f} um) in {honest}/{len(ripple)} maps.\n")
    texture = real_texture_specimens() if SHARED_STACKS.is_dir() else None
    if texture is None:
        print(f"SKIPPED the real-texture maps: {SHARED_STACKS} is absent.\n")
        target("map on a real micrograph texture: z_at RMS <= 0.5 um, worst <= 1.5 um, <= 10 frames a point",
               "skipped (no ../shared)", None)
        return
    name, specimen = texture
    original = af.make_specimen
    af.make_specimen = specimen  # type: ignore[assignment]
    try:
        real = [map_case({}, (5, 4), 1000.0, (320, 200), seed, "map") for seed in seeds]
    finally:
        af.make_specimen = original  # type: ignore[assignment]
    rms_r, worst_r, fpp_r = max(c["rms"] for c in real), max(c["worst"] for c in real), med([c["frames"] for c in real])
    print(f"Real micrograph texture ({name}'s in-focus slice, one crop per field of view, 320x200, tilted + bowed "
          f"slide, 1000 photons, {len(real)} seeds): RMS max {rms_r:.2f} um, worst max {worst_r:.2f} um, "
          f"{fpp_r:.1f} frames a point, models {' '.join(sorted({c['model'] for c in real}))}.\n")
    target(f"map on a real micrograph texture ({name}, 320x200): z_at RMS <= 0.5 um, worst <= 1.5 um, "
           "<= 10 frames a point", f"RMS max {rms_r:.2f}, worst max {worst_r:.2f} um, {fpp_r:.1f} frames a point",
           rms_r <= 0.5 and worst_r <= 1.5 and fpp_r <= 10)


###############################################################################
# 6. Zaber: what bracketing every frame costs
###############################################################################


def zaber_run(latency_s: float, bracket: bool, positions: list[float], optics: af.SimOptics) -> dict:
    """One sweep through the REAL ZML against the fake, every reply ``latency_s`` late (a serial
    line's round trip), the fake moving at SimTiming's speed and settle in its own process (a
    device does not share this process's interpreter), the simulated camera exposing and reading
    out in real time.  ``bracket`` False: the check after each exposure (the status read before
    the next move is sent) is skipped -- the comparison, not a product mode."""
    import json  # noqa: PLC0415

    timing = af.SimTiming(scale=1.0)
    start_native = round(positions[0] * 1e6)
    fake = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_zaber.py"), "--homed", "--log-on-exit",
                             "--position", str(start_native), "--speed", str(timing.speed_mm_s * 1e6),
                             "--settle-s", str(timing.settle_s), "--reply-delay-s", str(latency_s)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    port = int(fake.stdout.readline().rsplit(":", 1)[1])  # type: ignore[union-attr]
    stage = af.ZaberStage(f"tcp://127.0.0.1:{port}", native_unit_nm=1)
    real_check = af.ZaberStage._check_still
    commanded = {"z": positions[0]}
    real_move = af.ZaberStage.move_to

    def move_to(self: af.ZaberStage, z_mm: float) -> None:
        real_move(self, z_mm)
        commanded["z"] = z_mm

    class AtTarget:  # the simulated camera renders where the stage was sent, without a round trip
        def position_mm(self) -> float:
            return commanded["z"]

    try:
        af.ZaberStage.move_to = move_to  # type: ignore[method-assign]
        if not bracket:
            af.ZaberStage._check_still = lambda self, doing, allow=frozenset(): self._expect_native  # type: ignore
        clock = af.SimClock(1.0)
        camera = af.SimCamera(AtTarget(), optics, timing, clock)  # type: ignore[arg-type]
        t_start = time.time()
        t0 = time.perf_counter()
        r = af.run_autofocus(stage, camera, af.Scorer(), af.Plan(tuple(positions)))
        wall = time.perf_counter() - t0
        t_end = time.time()
    finally:
        af.ZaberStage._check_still = real_check  # type: ignore[method-assign]
        af.ZaberStage.move_to = real_move  # type: ignore[method-assign]
        stage.close()
    log = [json.loads(line) for line in fake.communicate("", timeout=10)[0].splitlines() if line.startswith("[")]
    sent = [text for t, _, text in log if t_start <= t <= t_end]
    targets = [int(text.split()[2]) for text in sent if text.startswith("move abs")]
    where = [start_native] + targets
    motions = [abs(b - a) / (timing.speed_mm_s * 1e6) + timing.settle_s for a, b in zip(where, where[1:])]
    # Modelled hardware time, as SimTiming.move_s counts a move (its command, then the motion rounded
    # up to the status polls, here back to back: one round trip apart), plus the start's position
    # read, per frame the exposure and read-out and -- bracketed -- one status read after it.
    # The "oracle" instead sees the arrival the instant it happens (motion + one round trip a move).
    fixed = (1 + (r.frames if bracket else 0)) * latency_s + clock.modeled_s
    modelled = fixed + sum((max(1, math.ceil(t / latency_s)) + 1) * latency_s for t in motions)
    oracle = fixed + sum(t + latency_s for t in motions)
    return dict(wall=wall, modelled=modelled, oracle=oracle, frames=r.frames, moves=len(targets),
                requests=len(sent), best_mm=r.best_mm, verdict=r.verdict.kind)


def section_bracketing(quick: bool) -> None:
    repeats = 1 if quick else 3
    # 640x400 frames (rendering and scoring a 1920x1200 frame would load the host, not the loop under
    # test); the modelled read-out stays the full sensor's, as with --camera-roi of the whole sensor.
    optics = af.SimOptics(width=640, height=400)
    positions = af.plan_positions(12.0, 12.6 if quick else 13.0, STEP_MM)
    timing = af.SimTiming()
    latencies = (timing.command_s,) if quick else (0.002, timing.command_s, 0.010)
    header("Bracketing every frame (Zaber, real ZML, modelled serial latency)",
           f"sweep {positions[0]:g}->{positions[-1]:g} mm every {STEP_MM} mm ({len(positions)} frames, 640x400 "
           f"8-bit simulated camera in real time: exposure {timing.exposure_s * 1e3:g} ms + read-out "
           f"{timing.readout_s * 1e3:.1f} ms), tests/fake_zaber.py in its own process moving at "
           f"{timing.speed_mm_s:g} mm/s with {timing.settle_s * 1e3:g} ms settle, every reply late by the round "
           f"trip; median of {repeats} repeat(s).  Modelled hardware time as SimTiming counts a move (command, "
           "then motion rounded up to the status polls, back to back), plus the camera and, bracketed, one status "
           "read a frame; the oracle sees each arrival the instant it happens (no polling at all)")
    sim_frame(optics, optics.focus_mm)
    rows = []
    for latency in latencies:
        on = [zaber_run(latency, True, positions, optics) for _ in range(repeats)]
        off = [zaber_run(latency, False, positions, optics) for _ in range(repeats)]
        frames = on[0]["frames"]
        cost_ms = 1000 * (med([r["wall"] for r in on]) - med([r["wall"] for r in off])) / frames
        ratio = med([r["wall"] / r["modelled"] for r in on])
        rows.append([f"{latency * 1e3:g} ms", fmt(med([r["requests"] for r in on]) / frames, 2),
                     fmt(med([r["requests"] for r in off]) / frames, 2), fmt(cost_ms, 2),
                     fmt(1000 * med([r["wall"] for r in on]) / frames, 1),
                     fmt(1000 * med([r["modelled"] for r in on]) / frames, 1), fmt(ratio, 3),
                     fmt(med([r["wall"] / r["modelled"] for r in off]), 3),
                     fmt(med([r["wall"] / r["oracle"] for r in on]), 3)])
        if latency == timing.command_s:
            target(f"bracketing: loop wall <= 1.05 x modelled hardware time (serial round trip {latency * 1e3:g} ms)",
                   f"{ratio:.3f}x; the bracket costs {cost_ms:.2f} ms a frame (one request)", ratio <= 1.05)
    table(["round trip", "requests / frame (bracketed)", "requests / frame (no check after exposure)",
           "bracket cost ms / frame", "wall ms / frame", "modelled ms / frame", "wall / modelled",
           "wall / modelled (no check)", "wall / oracle"], rows)
# 7. Micro-Manager (pymmcore-plus)
###############################################################################


def section_mm(quick: bool) -> None:
    """Issue 23: the real pymmcore-plus core with Python devices rendering the simulator."""
    try:
        sys.path.insert(0, str(ROOT / "tests"))
        import mm_devices  # noqa: PLC0415 - needs pymmcore-plus (pip install .[mm])
    except ImportError as exc:
        print(f"\n## Micro-Manager\n\n_skipped: {exc}_\n")
        target("focus() on the real pymmcore-plus core: within 0.5 um at 20x (STEP 4 um ~ 1 DOF)", "not run", None)
        return
    mm_accuracy(mm_devices, quick)
    mm_frames_after_move(mm_devices, quick)


def mm_accuracy(mm_devices, quick: bool) -> None:
    seeds = (0, 1) if quick else (0, 1, 2)
    offsets = [k / 10 for k in range(0, 10, 2 if quick else 1)]
    steps = (0.004, 0.002)
    header("Micro-Manager (a): focus() on the real core, 20x",
           f"UniMMCore (pymmcore-plus) with Python devices, camera rendering the simulator (20x / 0.40, DOF 4.2 um, "
           f"320x200, photons 1000, cells, Gaussian defocus), focal plane 12.31 mm + offsets {offsets} STEP off the "
           f"grid, seeds {seeds}, range 12.26..12.36 mm; error = |answer - focal plane|; 'same' = the simulator "
           "driven directly gives the identical answer and frame count")
    rows = []
    for step in steps:
        for search in ("sweep", "fast"):
            errs, frames, same, ms = [], [], 0, []
            for seed in seeds:
                for off in offsets:
                    focus_mm = round(12.31 + off * step, 9)
                    with mm_devices.microscope(focus_mm=focus_mm, seed=seed) as scope:
                        stage = af.MMStage(scope.core, limits_mm=(0, 25))
                        with af.MMCamera(scope.core) as camera:
                            t0 = time.perf_counter()
                            r = af.focus(stage, camera, 12.26, 12.36, step, search=search)
                            ms.append((time.perf_counter() - t0) * 1000 / r.frames)
                    plain = af.focus(*af.simulated_microscope(objective="20x", focus_mm=focus_mm, seed=seed,
                                                              width=320, height=200, time_scale=0, start_mm=12.3),
                                     12.26, 12.36, step, search=search)
                    same += (r.best_mm, r.frames, r.verdict.kind) == (plain.best_mm, plain.frames, plain.verdict.kind)
                    errs.append(abs(r.best_mm - focus_mm) * 1000 if r.verdict.kind == "focused" else float("inf"))
                    frames.append(r.frames)
            n = len(errs)
            rows.append([f"{step * 1000:g} um", search, n, sum(e < float("inf") for e in errs), f"{same}/{n}",
                         fmt(med(errs), 3), fmt(sorted(errs)[int(0.9 * (n - 1))], 3), fmt(max(errs), 3),
                         f"{sum(e <= 0.5 for e in errs)}/{n}", fmt(med(frames), 0), fmt(med(ms), 2)])
            if step == 0.004:
                target(f"focus() on the real pymmcore-plus core ({search}): within 0.5 um at 20x (STEP 4 um ~ 1 DOF), "
                       "every off-grid offset", f"{sum(e <= 0.5 for e in errs)}/{n}; median {med(errs):.3f} um, "
                       f"worst {max(errs):.3f} um; identical to the simulator {same}/{n}", max(errs) <= 0.5)
    table(["STEP", "search", "runs", "focused", "same as simulator", "error med (um)", "error p90 (um)",
           "error worst (um)", "within 0.5 um", "frames med", "ms per frame"], rows)


def mm_frames_after_move(mm_devices, quick: bool) -> None:
    """snapImage vs a running sequence acquisition: how long after a move the frame comes, and
    whether it shows the position before the move (exposed, or begun, before the move ended)."""
    import pymmcore  # noqa: PLC0415

    moves = 20 if quick else 60
    exposure_ms = 10.0

    header("Micro-Manager (b): the frame after a move, snapImage vs sequence acquisition",
           f"UniMMCore with Python devices: the camera exposes {exposure_ms:g} ms (slept) after rendering "
           f"320x200 at the position it reads at the start of its exposure; {moves} moves of 4 um, each after a wait "
           "spread over a frame period (else the moves lock to the camera's phase); "
           "'previous position' = the frame shows where the drive was before the move")
    rows = []
    with mm_devices.microscope() as scope:
        core = scope.core
        scope.camera.exposure_s = exposure_ms / 1000.0
        z0 = scope.focus.z_um

        def move(i: int) -> tuple[float, float]:
            """Move i (alternating 4 um steps): the target and when the move ended."""
            z = z0 + 4.0 * (i % 2 + 1)
            time.sleep((i * 7 % 10) / 10 * exposure_ms / 1000.0)
            core.setPosition("Z", z)
            core.waitForDevice("Z")
            return z, time.perf_counter()

        lat, stale = [], 0
        for i in range(moves):
            z, t_end = move(i)
            core.snapImage()
            core.getImage()
            lat.append((time.perf_counter() - t_end) * 1000)
            stale += scope.camera.snaps[-1].z_um != z
        rows.append(["snapImage + getImage (MMCamera)", fmt(med(lat), 1), f"{stale}/{moves}"])
        core.startContinuousSequenceAcquisition(0)
        try:
            first, second, stale1, stale2 = [], [], 0, 0
            for i in range(moves):
                z, t_end = move(i)
                while core.getRemainingImageCount():  # drop what came before (clearCircularBuffer races UniMMCore's
                    core.popNextImage()                # acquisition thread: "No pending slot to finalize")
                got = []
                while len(got) < 2:
                    if core.getRemainingImageCount():
                        md = pymmcore.Metadata()
                        core.popNextImageMD(md)
                        got.append(((time.perf_counter() - t_end) * 1000, float(md.GetSingleTag("z_um").GetValue())))
                    else:
                        time.sleep(0.0002)
                first.append(got[0][0])
                second.append(got[1][0])
                stale1 += abs(got[0][1] - z) > 1e-3
                stale2 += abs(got[1][1] - z) > 1e-3
        finally:
            core.stopSequenceAcquisition()
        rows.append(["sequence: first frame after the move", fmt(med(first), 1), f"{stale1}/{moves}"])
        rows.append(["sequence: second frame after the move", fmt(med(second), 1), f"{stale2}/{moves}"])
    table(["frame", "ms after the move (median)", "previous position"], rows)
    target("MMCamera (snapImage): every frame after a move shows the new position", f"{stale}/{moves} stale",
           stale == 0)


###############################################################################
# 7. The decision: false focus, error bar, sub-step accuracy (issue 20)
###############################################################################

SHARED_TEXTURES = {  # in-focus slices of the shared stacks, as the simulator's specimen
    "dfnn slice 15": "dfnn_microtubules_lightsheet/slice_015.png",
    "zaber_gif slice 17": "zaber_gif/slice_017.png",
}
BASELINE: object = None  # --baseline OLD_AUTOFOCUS.py: the same runs through an earlier decision


def load_baseline(path: str) -> object:
    """An earlier autofocus.py as a module (its own decision; this one's simulator and stacks)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("autofocus_baseline", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["autofocus_baseline"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def decide_with(module: object, stage, camera, start: float, end: float, step: float, **kw):
    """focus() of ``module`` with the keywords it knows."""
    import inspect

    known = inspect.signature(module.focus).parameters  # type: ignore[attr-defined]
    return module.focus(stage, camera, start, end, step, **{k: v for k, v in kw.items() if k in known})  # type: ignore[attr-defined]


class Lamp:
    """A lamp's relative brightness per frame (SimCamera.lamp): before shot noise, fixed gain."""

    def __init__(self, kind: str, seed: int) -> None:
        self.kind, self.rng = kind, np.random.default_rng(seed + 7)
        self.phase = float(self.rng.uniform(0, 2 * np.pi))

    def __call__(self, k: int) -> float:
        if self.kind == "jitter":  # +-3% flicker, frame to frame
            return 1.0 + float(self.rng.uniform(-0.03, 0.03))
        if self.kind == "warming":  # 10% dimmer at first, warming up over the first ~third of the run
            return 1.0 - 0.10 * float(np.exp(-k / 25.0))
        if self.kind == "periodic":  # +-6%, slow (a 50-frame period)
            return 1.0 + 0.06 * float(np.sin(2 * np.pi * k / 50.0 + self.phase))
        return 1.0


def write_blank_kind_stack(folder: Path, kind: str, seed: int, size: tuple[int, int] = (320, 200),
                           n: int = 81, step: float = 0.05) -> None:
    """A recorded stack of an empty field: noise, an illumination gradient, fixed-pattern sensor
    noise, a flickering lamp or a warming one (seeded)."""
    folder.mkdir(parents=True, exist_ok=True)
    stage, camera = af.simulated_microscope(specimen="blank", width=size[0], height=size[1], time_scale=0, seed=seed,
                                            start_mm=10.0)
    if kind == "gradient":  # uneven illumination: 40% brighter on one side, 15% toward the bottom
        yy, xx = np.mgrid[0:size[1], 0:size[0]].astype(np.float32)
        camera.illumination = (0.8 + 0.4 * xx / size[0] + 0.15 * yy / size[1]).astype(np.float32)
    if kind in ("jitter", "warming"):
        camera.lamp = Lamp(kind, seed)
    pattern = np.random.default_rng(seed + 99).normal(0, 2.0, (size[1], size[0])) if kind == "fixed pattern" else None
    lines = ["z_mm,file"]
    for i in range(n):
        z = round(10.0 + i * step, 9)
        stage.move_to(z)
        frame = camera.capture()
        if pattern is not None:  # a fixed offset per pixel (dark-signal non-uniformity), the same every frame
            frame = np.clip(frame.astype(np.float32) + pattern, 0, 255).astype(np.uint8)
        name = f"slice_{i:03d}.png"
        cv2.imwrite(str(folder / name), frame)
        lines.append(f"{z:.6f},{name}")
    (folder / "stack.csv").write_text("\n".join(lines) + "\n")


def false_focus(quick: bool) -> None:
    sizes = {(160, 100): 10 if quick else 70, (320, 200): 6 if quick else 70, (640, 400): 2 if quick else 10,
             (1280, 800): 1 if quick else 4, (1920, 1200): 1 if quick else 4}  # seeds per size
    kinds = ("noise", "gradient", "fixed pattern", "jitter", "warming")
    stacks = 2 if quick else 10
    header("False focus on empty fields",
           f"every metric x both searches; the simulator's blank field at {', '.join(f'{w}x{h} ({s} seeds)' for (w, h), s in sizes.items())}, "
           f"10->14 mm every 0.05 mm (81 positions); and {stacks} recorded stacks each (320x200, 81 slices, "
           f"replayed) of {', '.join(kinds)} (gradient: uneven illumination, 0.8..1.35 across the field; fixed "
           "pattern: +-2 DN per pixel; jitter: +-3% lamp per frame; warming: 10% dimmer at first); a monotonic drift "
           "may read as edge, never as focused")
    rows, total, focused_total, baseline_focused, baseline_total = [], 0, 0, 0, 0
    examples = []
    for size, seeds in sizes.items():
        counts: dict[str, int] = {}
        base_counts: dict[str, int] = {}
        for seed in range(seeds):
            for metric in af.METRICS:
                for search in ("sweep", "fast"):
                    for module, into in ((af, counts), (BASELINE, base_counts)):
                        if module is None:
                            continue
                        stage, camera = af.simulated_microscope(specimen="blank", width=size[0], height=size[1],
                                                                time_scale=0, seed=seed, start_mm=10.0)
                        r = decide_with(module, stage, camera, 10.0, 14.0, 0.05, search=search, metric=metric)
                        into[r.verdict.kind] = into.get(r.verdict.kind, 0) + 1
                        if module is af and r.verdict.kind == "focused":
                            examples.append(f"simulator {size[0]}x{size[1]} seed {seed} {metric} {search}: {r.verdict.reason}")
        n = sum(counts.values())
        total += n
        focused_total += counts.get("focused", 0)
        base = (f"{base_counts.get('focused', 0)}/{sum(base_counts.values())}" if base_counts else "-")
        baseline_focused += base_counts.get("focused", 0)
        baseline_total += sum(base_counts.values())
        rows.append([f"simulator blank {size[0]}x{size[1]}", n, counts.get("focused", 0), counts.get("edge", 0),
                     counts.get("no_peak", 0), base])
        print(f"- {rows[-1]}", file=sys.stderr, flush=True)  # progress, not the report
    with tempfile.TemporaryDirectory(prefix="af_blank_stacks_") as tmp:
        for kind in kinds:
            counts = {}
            base_counts = {}
            for seed in range(stacks):
                folder = Path(tmp) / f"{kind.replace(' ', '_')}_{seed}"
                write_blank_kind_stack(folder, kind, seed)
                for metric in af.METRICS:
                    for search in ("sweep", "fast"):
                        for module, into in ((af, counts), (BASELINE, base_counts)):
                            if module is None:
                                continue
                            if module is af:
                                stage, camera = af.replay_microscope(folder)
                            else:
                                stack = module.ReplayStack(folder)  # type: ignore[attr-defined]
                                lo, hi = stack.range_mm
                                stage = module.SimStage(travel_mm=(lo, hi), position_mm=lo,  # type: ignore[attr-defined]
                                                        timing=module.SimTiming(scale=0.0))  # type: ignore[attr-defined]
                                camera = module.ReplayCamera(stage, stack)  # type: ignore[attr-defined]
                            r = decide_with(module, stage, camera, 10.0, 14.0, 0.05, search=search, metric=metric)
                            into[r.verdict.kind] = into.get(r.verdict.kind, 0) + 1
                            if module is af and r.verdict.kind == "focused":
                                examples.append(f"stack {kind} seed {seed} {metric} {search}: {r.verdict.reason}")
                shutil.rmtree(folder)
            n = sum(counts.values())
            total += n
            focused_total += counts.get("focused", 0)
            baseline_focused += base_counts.get("focused", 0)
            baseline_total += sum(base_counts.values())
            rows.append([f"replayed stack: {kind}", n, counts.get("focused", 0), counts.get("edge", 0),
                         counts.get("no_peak", 0),
                         f"{base_counts.get('focused', 0)}/{sum(base_counts.values())}" if base_counts else "-"])
            print(f"- {rows[-1]}", file=sys.stderr, flush=True)
    table(["empty field", "runs", "focused", "edge", "no_peak", "baseline: focused/runs"], rows)
    for e in examples:
        print(f"- false focus: {e}")
    target(f"false focus on empty fields <= 1/1000 over >= 2000 runs (simulator blank at 5 frame sizes incl. "
           f"1920x1200, 5 kinds of replayed blank stacks, every metric, both searches)",
           f"{focused_total}/{total}" + (f" (baseline: {baseline_focused}/{baseline_total})" if baseline_total else ""),
           total >= (200 if quick else 2000) and focused_total <= total / 1000)


def accuracy_case(objective: str, photons: float, offset: float, defocus: str, texture: str | None, search: str,
                  size: tuple[int, int] = (320, 200), seed: int = 0, lamp: str | None = None,
                  module: object = None) -> tuple[str, float, float, int, bool, bool]:
    """One run on an 81-position grid, STEP ~ one depth of field, the focal plane ``offset``
    STEPs off the grid position in the middle: (verdict, signed error in STEPs, uncertainty in
    STEPs (nan: none), frames, narrower than STEP, one frame wide)."""
    step = OBJECTIVE_STEPS_MM[objective]
    focus = 10.0 + (40 + offset) * step
    options = dict(objective=objective, photons=photons, focus_mm=focus, width=size[0], height=size[1],
                   time_scale=0, seed=seed, start_mm=10.0, defocus=defocus)
    if texture is not None:
        options["specimen_image"] = str(SHARED_STACKS / texture)
    stage, camera = af.simulated_microscope(**options)
    if lamp is not None:
        camera.lamp = Lamp(lamp, seed)
    r = decide_with(module or af, stage, camera, 10.0, 10.0 + 80 * step, step, search=search)
    u = getattr(r, "uncertainty_mm", None)
    one_frame = any("one frame wide" in note for note in getattr(r, "notes", ()))
    return (r.verdict.kind, (r.best_mm - focus) / step, float("nan") if u is None else u / step, r.frames,
            bool(getattr(r.verdict, "narrow", False)), one_frame)


def error_bar_and_accuracy(quick: bool) -> None:
    photons = (100, 1000) if quick else (100, 400, 1000, 3000)
    offsets = (0.31, -0.37) if quick else (0.13, 0.31, -0.22, 0.44, -0.37)
    textures = {"cells (synthetic)": None}
    if SHARED_STACKS.is_dir():
        textures.update(SHARED_TEXTURES)
    if quick:
        textures = dict(list(textures.items())[:2])
    header("Error bar and sub-step accuracy",
           f"simulator 320x200, 81 positions, STEP ~ one depth of field ({', '.join(f'{o} {s * 1000:g} um' for o, s in OBJECTIVE_STEPS_MM.items())}), "
           f"focal plane {offsets} STEPs off the middle grid position, photons {photons}, defocus gaussian and "
           f"pillbox, specimens {', '.join(textures)}, seed 0; errors and error bars in STEPs; 'resolved' leaves "
           "out peaks the tool reports narrower than STEP (one frame wide: +-STEP/2; neighbours far down it: "
           "at least +-0.15 STEP; each with a note)")
    runs = []  # (objective, search, defocus, texture, photons, verdict, err, U, frames, narrow, baseline err)
    for objective in OBJECTIVE_STEPS_MM:
        for search in ("sweep", "fast"):
            for defocus in ("gaussian", "pillbox"):
                for name, texture in textures.items():
                    for ph in photons:
                        for offset in offsets:
                            kind, err, u, frames, narrow, one = accuracy_case(objective, ph, offset, defocus,
                                                                              texture, search)
                            base = float("nan")
                            if BASELINE is not None:
                                bkind, berr, *_ = accuracy_case(objective, ph, offset, defocus, texture, search,
                                                                module=BASELINE)
                                base = abs(berr) if bkind == "focused" else float("nan")
                            runs.append((objective, search, defocus, name, ph, kind, err, u, frames, narrow, base,
                                         offset, one))
        print(f"- {objective} done", flush=True)

    def summary(sel: list) -> list[object]:
        f = [r for r in sel if r[5] == "focused"]
        e = [abs(r[6]) for r in f]
        res = [abs(r[6]) for r in f if not r[9]]
        cov = [abs(r[6]) <= r[7] for r in f if r[7] == r[7]]
        width = [r[7] for r in f if r[7] == r[7]]
        base = [r[10] for r in sel if r[10] == r[10]]
        return [len(sel), len(f), f"{sum(r[12] for r in f)} / {sum(r[9] for r in f)}", fmt(med(e), 3),
                fmt(max(e) if e else float("nan"), 3),
                fmt(med(res), 3), fmt(max(res) if res else float("nan"), 3),
                f"{sum(cov) / len(cov):.0%}" if cov else "-", fmt(med(width), 3),
                f"{fmt(med(base), 3)} / {fmt(max(base) if base else float('nan'), 3)}" if base else "-"]

    headers = ["", "runs", "focused", "one frame wide / narrower than STEP", "|err| median", "|err| worst",
               "resolved: median", "resolved: worst", "error bar covers", "error bar median",
               "baseline |err| median / worst"]
    rows = [[f"{o} {s}", *summary([r for r in runs if r[0] == o and r[1] == s])]
            for o in OBJECTIVE_STEPS_MM for s in ("sweep", "fast")]
    print("Per objective and search (all photons, both defocus models, every specimen):\n")
    table(["objective, search", *headers[1:]], rows)
    rows = [[f"{d}, {n}", *summary([r for r in runs if r[2] == d and r[3] == n])] for d in ("gaussian", "pillbox")
            for n in textures]
    rows += [[f"photons {p}", *summary([r for r in runs if r[4] == p])] for p in photons]
    rows += [[f"all {s}", *summary([r for r in runs if r[1] == s])] for s in ("sweep", "fast")]
    print("Per defocus model and specimen, per photon level, and per search:\n")
    table(["group", *headers[1:]], rows)
    focused = [r for r in runs if r[5] == "focused"]
    print("The largest errors, and those outside their error bar:\n")
    worst = sorted(focused, key=lambda r: -abs(r[6]))[:8] + [r for r in focused if abs(r[6]) > r[7]][:12]
    table(["objective", "search", "defocus", "specimen", "photons", "offset", "error", "error bar",
           "narrower than STEP"],
          [[r[0], r[1], r[2], r[3], r[4], r[11], fmt(r[6], 3), fmt(r[7], 3), r[9]] for r in dict.fromkeys(worst)])
    cov = [abs(r[6]) <= r[7] for r in focused]
    widths = [r[7] for r in focused]
    target("error bar: 85-95% of focused runs within it, median width <= 0.35 STEP (objectives 4x-60x, photons "
           "100-3000, off-grid, gaussian and pillbox defocus, real textures, both searches)",
           f"{sum(cov) / len(cov):.1%} of {len(cov)}, median {med(widths):.3f} STEP",
           0.85 <= sum(cov) / len(cov) <= 0.95 and med(widths) <= 0.35)
    narrow_ok = all(r[7] >= 0.5 - 1e-9 for r in focused if r[12])
    target("a peak one frame wide gets at least +-STEP/2", f"{sum(r[12] for r in focused)} such runs, "
           f"{'all' if narrow_ok else 'not all'} >= STEP/2", narrow_ok)
    bright = [p for p in photons if p >= 400]
    for s in ("sweep", "fast"):
        e = [abs(r[6]) for r in focused if r[1] == s and r[4] in bright and not r[12]]
        res = [abs(r[6]) for r in focused if r[1] == s and r[4] in bright and not r[9]]
        pill = [abs(r[6]) for r in focused if r[1] == s and r[4] in bright and not r[9] and r[2] == "pillbox"]
        target(f"{s}: sub-step accuracy median <= 0.05, worst <= 0.15 STEP (STEP ~ 1 DOF, off-grid, both defocus "
               f"models, real textures, photons {'-'.join(map(str, (bright[0], bright[-1])))}; peaks not narrower "
               "than STEP)",
               f"median {med(res):.3f}, worst {max(res):.3f} over {len(res)} runs (pillbox {med(pill):.3f} / "
               f"{max(pill):.3f}; with peaks narrower than STEP: {med(e):.3f} / {max(e):.3f})",
               med(res) <= 0.05 and max(res) <= 0.15)
    missed = [r for r in runs if r[5] != "focused"]
    target("every run with the focal plane in the range is focused (matrix above)", f"{len(runs) - len(missed)}/{len(runs)}",
           not missed)


def fast_frames_on_real_textures(quick: bool) -> None:
    textures = dict(SHARED_TEXTURES) if SHARED_STACKS.is_dir() else {}
    textures["cells (synthetic)"] = None
    offsets = (0.13, -0.31) if quick else (0.13, -0.31, 0.42)
    header("Fast search on real textures with a drifting lamp",
           f"simulator 320x200, 81 positions, STEP ~ 1 DOF, 400 photons, lamp +-6% periodic (50-frame period), "
           f"specimens {', '.join(textures)}, defocus gaussian and pillbox, focal plane {offsets} STEPs off the grid")
    rows, ratios, errs = [], [], {"sweep": [], "fast": []}
    for objective in OBJECTIVE_STEPS_MM:
        frames, e = [], {"sweep": [], "fast": []}
        for name, texture in textures.items():
            for defocus in ("gaussian", "pillbox"):
                for seed, offset in enumerate(offsets):
                    res = {s: accuracy_case(objective, 400, offset, defocus, texture, s, seed=seed, lamp="periodic")
                           for s in ("sweep", "fast")}
                    frames.append(res["fast"][3])
                    ratios.append(res["fast"][3] / res["sweep"][3])
                    for s in res:
                        if res[s][0] == "focused" and not res[s][4]:  # peaks not narrower than STEP
                            e[s].append(abs(res[s][1]))
                            errs[s].append(abs(res[s][1]))
        rows.append([objective, len(frames), fmt(med(frames), 0), max(frames), f"{med(frames) / 81:.0%}",
                     fmt(med(e["sweep"]), 3), fmt(med(e["fast"]), 3)])
    table(["objective", "runs", "fast frames median", "fast frames max", "of the sweep's 81", "sweep |err| median",
           "fast |err| median"], rows)
    target("fast search <= 20% of the sweep's frames on an 81-position grid (real textures, +-6% periodic lamp drift, "
           "400 photons; median)", f"median {med(ratios):.1%} ({med(ratios) * 81:.0f} frames; stretch <= 12)",
           med(ratios) <= 0.20)
    target("fast search as accurate as the sweep there (median |err| within 0.02 STEP of the sweep's, resolved peaks)",
           f"sweep {med(errs['sweep']):.3f}, fast {med(errs['fast']):.3f} STEP",
           med(errs["fast"]) <= med(errs["sweep"]) + 0.02)


def score_peak_widths(quick: bool) -> None:
    """How wide the score's peak is at STEP ~ one depth of field: what a sweep's frames can resolve."""
    textures = {"cells (synthetic)": None}
    if SHARED_STACKS.is_dir():
        textures.update(SHARED_TEXTURES)
    objectives = ("4x", "60x") if quick else tuple(OBJECTIVE_STEPS_MM)
    offsets = np.round(np.arange(-4.0, 4.0001, 0.04), 2)  # in STEPs from the focal plane
    header("Score peak width at STEP ~ one depth of field",
           f"simulator 320x200, 3000 photons, the default score, focal plane on a grid position; the mean of 2 "
           f"frames every 0.04 STEP over +-4 STEPs; height above the floor (the median beyond +-3 STEPs); specimens "
           f"{', '.join(textures)}; defocus gaussian and pillbox")
    rows, widths, halves = [], [], []
    scorer = af.Scorer()
    for objective in objectives:
        step = OBJECTIVE_STEPS_MM[objective]
        for name, texture in textures.items():
            for defocus in ("gaussian", "pillbox"):
                options = dict(objective=objective, photons=3000, focus_mm=10.0, width=320, height=200,
                               time_scale=0, seed=0, start_mm=10.0, defocus=defocus)
                if texture is not None:
                    options["specimen_image"] = str(SHARED_STACKS / texture)
                _, camera = af.simulated_microscope(**options)
                curve = np.array([np.mean([scorer(camera.render(10.0 + d * step)) for _ in range(2)])
                                  for d in offsets])
                floor = float(np.median(curve[np.abs(offsets) >= 3.0]))
                rise = (curve - floor) / (curve.max() - floor)
                above = offsets[rise >= 0.5]
                at = {d: float(rise[int(np.argmin(np.abs(offsets - d)))]) for d in (0.25, 0.5, 1.0)}
                widths.append(float(above.max() - above.min()))
                halves.append((at[0.5] + float(rise[int(np.argmin(np.abs(offsets + 0.5)))])) / 2)
                rows.append([objective, name, defocus, fmt(widths[-1], 2),
                             *(fmt((at[d] + float(rise[int(np.argmin(np.abs(offsets + d)))])) / 2, 2) for d in at)])
    table(["objective", "specimen", "defocus", "width at half height (STEPs)", "height at +-0.25 STEP",
           "at +-0.5 STEP", "at +-1 STEP"], rows)
    print(f"Narrower than STEP in {sum(w < 1.0 for w in widths)} of {len(widths)} configurations (widths "
          f"{min(widths):.2f}-{max(widths):.2f} STEP). A frame half a STEP from the focal plane sees "
          f"{min(halves):.0%}-{max(halves):.0%} of the peak's height: with the focal plane midway between two grid "
          "positions, a sweep's frames show only the flanks of the sharpest peaks; the fast search then also "
          "measures half a STEP either side of its best frame.\n")


def section_decision(quick: bool) -> None:
    false_focus(quick)
    error_bar_and_accuracy(quick)
    fast_frames_on_real_textures(quick)
    score_peak_widths(quick)


###############################################################################
# The report: tests/BENCHMARKS.md
###############################################################################
# A run prints Markdown; with --write its sections also go into tests/BENCHMARKS.md, replacing those
# sections only (each section is rerun on its own when the machine is quiet), and the file's Targets
# table is rebuilt from every section in it.  Each section's printout is framed by HTML comments that
# carry its targets, so a saved printout can be written in later (--merge PRINTOUT).

BENCHMARKS_MD = ROOT / "tests" / "BENCHMARKS.md"
BLOCK = re.compile(r"<!-- section (\w+) -->\n(.*?)<!-- targets \1: (.*?) -->\n<!-- end of section \1 -->\n", re.S)
RUN_LINE = re.compile(r"^_`python tests/benchmark\.py.*_$", re.M)
# Why a target that fails on every machine does (matched by a part of its name): a limit, not a regression.
KNOWN_LIMITS = {
    "focal plane 1 mm outside the range gives edge":
        "at 100-300 photons per pixel nothing in the range carries a usable signal from a focal plane 1 mm "
        "(14 depths of field at 4x) beyond it: the verdict is no_peak, and the stage goes back to its start",
    "focus() on the real pymmcore-plus core":
        "the three-point fit's bias at STEP ~ one depth of field (up to ~0.19 STEP, as on the simulator driven "
        "directly: the core adds nothing); STEP ~ half the depth of field meets 0.5 um",
}
PREAMBLE = """# Benchmarks

Written by `tests/benchmark.py` (run by hand, never in CI; edit that file, not this one).
`python tests/benchmark.py --write` runs every section and writes it here; `--section NAME --write`
reruns one section and keeps the others; `--quick` uses fewer seeds, repeats and steps;
`--merge PRINTOUT --write` writes in the saved printout of an earlier run. Sections therefore come
from different runs: each ends with the command, date, versions and commit it ran, and says how busy
the machine was (timings on a busy machine are inflated). Timings are medians, ratios are measured
within one run, and each accuracy figure states its conditions (objective, STEP, photons, defocus
model, specimen, frame size, seeds).
"""


class Tee:
    """stdout that is also kept: a section's printout, for the report."""

    def __init__(self, out: object) -> None:
        self.out, self.parts = out, []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return self.out.write(text)  # type: ignore[attr-defined]

    def flush(self) -> None:
        self.out.flush()  # type: ignore[attr-defined]

    def text(self) -> str:
        return "".join(self.parts)


def targets_json(run: str, targets: list[Target]) -> str:
    """A section's targets (and the run they came from) as one line of JSON, for the report."""
    doc = {"run": run, "targets": [[t.name, t.measured, t.ok] for t in targets]}
    return json.dumps(doc, ensure_ascii=False).replace("--", "-\\u002d")  # no "--" inside an HTML comment


PROGRESS_LINE = re.compile(r"^- \[.*\]\n", re.M)  # a row as it was measured: progress in older printouts


def section_block(name: str, text: str, run: str, targets: list[Target]) -> str:
    """One section as the report holds it: its printout, the run it came from, its targets."""
    text = re.sub(r"\n{3,}", "\n\n", PROGRESS_LINE.sub("", text))
    return (f"<!-- section {name} -->\n{text.strip()}\n\n_Run: {run.strip('_')}_\n\n"
            f"<!-- targets {name}: {targets_json(run, targets)} -->\n<!-- end of section {name} -->\n")


def parse_printout(text: str) -> dict[str, str]:
    """The sections of a saved printout of this benchmark, as report blocks.  A printout from before
    the sections were framed must be of one section (``--section NAME``): its targets are that section's."""
    runs = RUN_LINE.findall(text)
    if not runs:
        raise SystemExit("--merge: not a printout of tests/benchmark.py (no line starting _`python tests/benchmark.py)")
    run = runs[0]
    framed = re.findall(r"<!-- section (\w+) -->\n(.*?)<!-- targets \1: (.*?) -->", text, re.S)
    if framed:
        return {name: section_block(name, body.replace(f"<!-- end of section {name} -->", ""), run,
                                    [Target(*t) for t in json.loads(doc)["targets"]])
                for name, body, doc in framed}
    names = re.findall(r"--section (\w+)", run)
    if len(names) != 1 or names[0] not in SECTIONS:
        raise SystemExit("--merge: a printout without section frames must be of exactly one --section")
    body, _, tail = text.partition("\n## Targets\n")
    body = body[body.index("\n## ") + 1:]
    targets = []
    for line in tail.splitlines():
        cells = [c.replace("\\|", "|").strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 3 and cells[2] in ("PASS", "FAIL", "SKIP"):
            targets.append(Target(cells[0], cells[1], {"PASS": True, "FAIL": False, "SKIP": None}[cells[2]]))
    return {names[0]: section_block(names[0], body, run, targets)}


def run_label(run: str) -> str:
    """'2026-12-03 f68957b --quick': when, on which commit and how a section was run."""
    when = re.search(r"— (\d{4}-\d\d-\d\d)", run)
    commit = re.search(r"commit ([0-9a-f]+)", run)
    return " ".join(x for x in (when and when.group(1), commit and commit.group(1),
                                "--quick" if " --quick" in run.split("`")[1] else "") if x)


def report(blocks: dict[str, str]) -> str:
    """tests/BENCHMARKS.md: the preamble, every target of every section, then the sections."""
    rows, failed, notes = [], 0, []
    for name in SECTIONS:
        if name not in blocks:
            continue
        doc = json.loads(BLOCK.search(blocks[name]).group(3))  # type: ignore[union-attr]
        for target_name, measured, ok in doc["targets"]:
            rows.append([target_name, measured, passfail(ok), f"[{name}](#{name}) {run_label(doc['run'])}"])
            failed += ok is False
            notes += [f"- {target_name}: {why}." for key, why in KNOWN_LIMITS.items()
                      if ok is False and key in target_name]
    skipped = sum(1 for r in rows if r[2] == "SKIP")
    missing = [n for n in SECTIONS if n not in blocks]
    lines = [PREAMBLE, "## Targets\n", md_table(["target", "measured", "result", "section, run"], rows), "",
             f"{len(rows) - failed - skipped} PASS, {failed} FAIL, {skipped} SKIP"
             + (f"; not yet run: {', '.join(missing)}" if missing else "") + ".", ""]
    if notes:
        lines += ["Known limits (failing by design of the measurement, not regressions):", "", *notes, ""]
    for name in SECTIONS:
        if name in blocks:
            lines += [f"<a name=\"{name}\"></a>", "", blocks[name]]
    return "\n".join(lines).rstrip() + "\n"


def write_report(path: Path, new: dict[str, str]) -> None:
    """Put these sections into the report at ``path``, keeping its other sections."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    blocks = {m.group(1): m.group(0) for m in BLOCK.finditer(old)}
    blocks.update(new)
    path.write_text(report(blocks), encoding="utf-8")
    print(f"\nwrote {', '.join(new)} into {path} (sections there: {', '.join(n for n in SECTIONS if n in blocks)})",
          file=sys.stderr)


###############################################################################
# Main
###############################################################################


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer seeds, repeats and steps (< 2 minutes)")
    p.add_argument("--section", action="append", choices=SECTIONS,
                   help="run only this section (repeatable); default: all")
    p.add_argument("--baseline", metavar="OLD_AUTOFOCUS_PY",
                   help="decision section: also run an earlier autofocus.py's decision on the same frames "
                        "(e.g. git show main:autofocus.py > /tmp/old.py)")
    p.add_argument("--write", metavar="FILE", nargs="?", const=BENCHMARKS_MD, type=Path,
                   help=f"also write the sections run into FILE (default {BENCHMARKS_MD.relative_to(ROOT)}), "
                        "keeping its other sections, and rebuild its Targets table")
    p.add_argument("--merge", metavar="PRINTOUT", type=Path,
                   help="run nothing: write the sections of this saved printout of an earlier run (needs --write)")
    args = p.parse_args(argv)
    global BASELINE
    BASELINE = load_baseline(args.baseline) if args.baseline else None
    if args.merge is not None:
        if args.write is None:
            p.error("--merge needs --write [FILE]")
        write_report(args.write, parse_printout(args.merge.read_text(encoding="utf-8")))
        return 0
    sections = args.section or list(SECTIONS)
    t0 = time.perf_counter()
    run = (f"_`python tests/benchmark.py{' --quick' if args.quick else ''}"
           f"{''.join(' --section ' + s for s in args.section or [])}` — {now()}; autofocus {af.__version__}, "
           f"Python {platform.python_version()}, numpy {np.__version__}, OpenCV {cv2.__version__}, "
           f"{os.cpu_count()} CPUs, {platform.machine()} {platform.system()}, {git_describe()}_")
    print(f"# autofocus.py benchmark{' (--quick)' if args.quick else ''}\n")
    print(run)
    blocks: dict[str, str] = {}
    for name in SECTIONS:
        if name in sections:
            s0, first = time.perf_counter(), len(TARGETS)
            print(f"\n<!-- section {name} -->")
            tee, stdout = Tee(sys.stdout), sys.stdout
            sys.stdout = tee
            try:
                with BackgroundMonitor() as monitor:
                    globals()[f"section_{name}"](args.quick)
                note = background_note(name, monitor, own_children=name == "memory")
                print(f"_section {name}: {time.perf_counter() - s0:.0f} s{note}_", flush=True)
            finally:
                sys.stdout = stdout
            blocks[name] = section_block(name, tee.text(), run, TARGETS[first:])
            print(f"<!-- targets {name}: {targets_json(run, TARGETS[first:])} -->\n<!-- end of section {name} -->")
    print("\n## Targets\n")
    table(["target", "measured", "result"], [[t.name, t.measured, passfail(t.ok)] for t in TARGETS])
    failed = sum(1 for t in TARGETS if t.ok is False)
    print(f"{len(TARGETS) - failed - sum(1 for t in TARGETS if t.ok is None)} PASS, {failed} FAIL, "
          f"{sum(1 for t in TARGETS if t.ok is None)} SKIP; total {time.perf_counter() - t0:.0f} s")
    for t in TARGETS:
        for key, why in KNOWN_LIMITS.items():
            if t.ok is False and key in t.name:
                print(f"- known limit, {t.name}: {why}.")
    busy = [f"{n} {share:.0%}" for n, share in BUSY if share > 0.10]
    if busy:
        print(f"\nNote: other processes took a noticeable share of the machine during: {', '.join(busy)}; "
              "rerun on a quiet machine before quoting those timings.")
    if args.write is not None:
        write_report(args.write, blocks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
