"""--show-images (the live OpenCV window) and the progress bar.

The window tests run autofocus.py as a child process on a private Xvfb (Qt never runs in the
test process: a lost display would abort it), read the window back from the screen with
``xwd -root`` (parsed here with numpy), type into it with xdotool, and press its close button
the way a window manager does: a WM_DELETE_WINDOW message (``xdotool windowclose`` destroys the
X window behind Qt's back, which Qt never notices: it is not a close button).  They skip cleanly
where Xvfb, xwd (x11-apps) or xdotool is missing.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

import autofocus
from conftest import FAKE_PYSPIN_DIR, FAST_SIM, RIGHT, ROOT, small_sim
from fake_zaber import DeviceConfig, FakeZaber

NM = 1_000_000
SCREEN = (1920, 1080)

# --- an X server, its screen, and a window manager's close button ------------------------------


def need_x_tools() -> None:
    if os.name != "posix":
        pytest.skip("the window tests need an X server (Xvfb) and a pseudo-terminal: POSIX only")
    missing = [tool for tool in ("Xvfb", "xwd", "xdotool") if not shutil.which(tool)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install xvfb x11-apps xdotool): the window "
                    "tests need a real X server")


@contextlib.contextmanager
def x_server(width: int, height: int) -> Iterator[str]:
    """A private Xvfb; it picks a free display number itself (-displayfd) and says which.

    -noreset: an X server resets itself whenever its last client leaves, and a client connecting
    meanwhile (the next autofocus.py, its display probe) fails or finds a window it cannot paint."""
    need_x_tools()
    read_fd, write_fd = os.pipe()
    server = subprocess.Popen(["Xvfb", "-displayfd", str(write_fd), "-screen", "0", f"{width}x{height}x24",
                               "-nolisten", "tcp", "-noreset"], pass_fds=(write_fd,), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    os.close(write_fd)
    try:
        number = b""
        while not number.endswith(b"\n") and select.select([read_fd], [], [], 20)[0]:
            if not (chunk := os.read(read_fd, 16)):
                break
            number += chunk
        assert number.strip(), "Xvfb did not start"
        yield f":{number.decode().strip()}"
    finally:
        os.close(read_fd)
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def screen() -> Iterator[str]:
    with x_server(*SCREEN) as display:
        yield display


def x_env(display: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["DISPLAY"] = display
    return env


def xdotool(display: str, *argv: str) -> str:
    return subprocess.run(["xdotool", *argv], env=x_env(display), capture_output=True, text=True,
                          timeout=20).stdout


def read_xwd(dump: bytes) -> np.ndarray:
    """An XWD dump (ZPixmap, depth 24, 24 or 32 bits a pixel) as a BGR array."""
    h = np.frombuffer(dump[:100], ">u4").astype(np.int64)  # the header is big-endian
    header_size, version, pixmap_format, depth, width, height = (int(v) for v in h[:6])
    byte_order, bits_per_pixel, bytes_per_line, ncolors = int(h[7]), int(h[11]), int(h[12]), int(h[19])
    assert (version, pixmap_format, depth) == (7, 2, 24) and bits_per_pixel in (24, 32), h[:12]
    stride = bits_per_pixel // 8
    raw = np.frombuffer(dump, np.uint8, bytes_per_line * height, header_size + 12 * ncolors)
    raw = raw.reshape(height, bytes_per_line)[:, : width * stride].reshape(height, width, stride).astype(np.uint32)
    order = range(stride) if byte_order == 0 else range(stride - 1, -1, -1)  # LSBFirst: byte 0 is the lowest
    value = sum(raw[:, :, i] << (8 * k) for k, i in enumerate(order))
    channels = [(value & int(m)) >> (int(m) & -int(m)).bit_length() - 1 for m in (h[16], h[15], h[14])]
    return np.stack(channels, axis=2).astype(np.uint8)  # blue, green, red masks


def window_id(display: str, child: Child, timeout_s: float = 30) -> int:
    deadline = time.monotonic() + timeout_s
    while not (found := xdotool(display, "search", "--onlyvisible", "--name", "^autofocus$").split()):
        assert child.proc.poll() is None, f"autofocus.py ended without a window: {child.err}"
        assert time.monotonic() < deadline, "no autofocus window appeared"
        time.sleep(0.05)
    return int(found[0])


def geometry(display: str, wid: int) -> tuple[int, int, int, int]:
    """x, y, width, height of the window on the screen."""
    g = dict(line.split("=") for line in xdotool(display, "getwindowgeometry", "--shell", str(wid)).split())
    return int(g["X"]), int(g["Y"]), int(g["WIDTH"]), int(g["HEIGHT"])


def on_screen(display: str, wid: int) -> np.ndarray:
    """The window's pixels as the screen shows them (the whole root window, cut at its place)."""
    dump = subprocess.run(["xwd", "-silent", "-root", "-display", display], capture_output=True, timeout=30,
                          check=True).stdout
    x, y, w, h = geometry(display, wid)
    return read_xwd(dump)[y: y + h, x: x + w]


def press(display: str, wid: int, key: str) -> None:
    """Type a key into the window (focus it, then the XTEST keyboard: as a person types)."""
    xdotool(display, "windowfocus", "--sync", str(wid), "key", key)


WM_DELETE = """
import ctypes, sys
x11 = ctypes.cdll.LoadLibrary("libX11.so.6")
x11.XOpenDisplay.restype = ctypes.c_void_p
x11.XOpenDisplay.argtypes = [ctypes.c_char_p]
x11.XInternAtom.restype = ctypes.c_ulong
x11.XInternAtom.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
x11.XFlush.argtypes = x11.XCloseDisplay.argtypes = [ctypes.c_void_p]
class ClientMessage(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("serial", ctypes.c_ulong), ("send_event", ctypes.c_int),
                ("display", ctypes.c_void_p), ("window", ctypes.c_ulong), ("message_type", ctypes.c_ulong),
                ("format", ctypes.c_int), ("data", ctypes.c_long * 5)]
class XEvent(ctypes.Union):
    _fields_ = [("xclient", ClientMessage), ("pad", ctypes.c_long * 24)]
x11.XSendEvent.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_long, ctypes.POINTER(XEvent)]
display = x11.XOpenDisplay(None)
event = XEvent()
event.xclient.type, event.xclient.window, event.xclient.format = 33, int(sys.argv[1]), 32  # ClientMessage
event.xclient.message_type = x11.XInternAtom(display, b"WM_PROTOCOLS", 0)
event.xclient.data[0] = x11.XInternAtom(display, b"WM_DELETE_WINDOW", 0)
assert x11.XSendEvent(display, int(sys.argv[1]), 0, 0, ctypes.byref(event))
x11.XFlush(display)
x11.XCloseDisplay(display)
"""


def close_button(display: str, wid: int) -> None:
    """What a window manager sends when its close button is clicked (ICCCM WM_DELETE_WINDOW)."""
    subprocess.run([sys.executable, "-c", WM_DELETE, str(wid)], env=x_env(display), check=True, timeout=20)


def shows(display: str, wid: int, expected: np.ndarray, timeout_s: float = 20) -> None:
    """Wait until the screen shows ``expected`` in the window, pixel for pixel (Qt paints it soon after).

    Under a bare X server (no window manager) Qt 5.15 sometimes loses the MapNotify of its new
    window, believes it unmapped and never paints it: the window stays black (15 of 60 maps of a
    plain cv2.imshow window here, every one painted after a remap).  A window manager maps
    windows itself; here a window still black after a second is mapped again, as one would."""
    deadline, remapped = time.monotonic() + timeout_s, False
    start = time.monotonic()
    while not np.array_equal(shot := on_screen(display, wid), expected):
        if not remapped and not shot.any() and time.monotonic() - start > 1.0:
            xdotool(display, "windowunmap", "--sync", str(wid))
            xdotool(display, "windowmap", "--sync", str(wid))
            remapped = True
        if time.monotonic() > deadline:
            cv2.imwrite(str(Path(os.environ.get("TMPDIR", "/tmp")) / "autofocus_window_seen.png"), shot)
            differs = np.any(shot != expected, axis=2) if shot.shape == expected.shape else None
            rows, cols = np.nonzero(differs) if differs is not None else ((), ())
            pytest.fail(f"the window shows {shot.shape}, not the expected {expected.shape}" if differs is None else
                        f"{differs.mean():.1%} of the window's pixels differ (rows {min(rows)}-{max(rows)}, "
                        f"columns {min(cols)}-{max(cols)}); what it shows is in autofocus_window_seen.png")
        time.sleep(0.05)


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


CHILDREN: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def no_child_left() -> Iterator[None]:
    """A failed test's autofocus.py (a window held open, say) must not outlive it."""
    yield
    while CHILDREN:
        proc = CHILDREN.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


class Child:
    """autofocus.py on an X display: stdin and stdout on a pseudo-terminal (an interactive run)
    or not (a script); stderr collected as it comes."""

    def __init__(self, display: str, *argv: str | Path, tty: bool = False, env: dict[str, str] | None = None) -> None:
        self.err, self.out, self._master = "", b"", None
        cmd = [sys.executable, "autofocus.py", *map(str, argv)]
        if tty:
            import pty  # noqa: PLC0415  (POSIX)

            master, slave = pty.openpty()
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**x_env(display), **(env or {})}, stdin=slave,
                                         stdout=slave, stderr=subprocess.PIPE)
            os.close(slave)
            out_fd = self._master = master
        else:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**x_env(display), **(env or {})},
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out_fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        CHILDREN.append(self.proc)
        self._readers = [threading.Thread(target=self._read, args=(out_fd, "out"), daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stderr.fileno(), "err"), daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read(self, fd: int, name: str) -> None:
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the pseudo-terminal closes with the child
                chunk = b""
            if not chunk:
                return
            if name == "err":
                self.err += chunk.decode(errors="replace")
            else:
                self.out += chunk

    def wait_for(self, text: str, timeout_s: float = 30) -> None:
        wait_until(lambda: text in self.err or self.proc.poll() is not None, f"{text!r} on stderr", timeout_s)
        assert text in self.err, self.err

    def finish(self, timeout_s: float = 20) -> int:
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"autofocus.py did not end within {timeout_s} s: {self.err}")
        for reader in self._readers:
            reader.join(timeout=5)
        if self._master is not None:
            os.close(self._master)
        return code


def final_view_of(argv: list[str], screen_px: tuple[int, int]) -> np.ndarray:
    """What the window held open at the end of ``autofocus.py argv`` (a simulator run) must show:
    the same run, done here without a window, and its final view drawn by the tool's own code."""
    args = autofocus.build_parser().parse_intermixed_args(argv)
    stage, camera = autofocus.simulated_microscope(**autofocus.sim_options(args))
    result = autofocus.focus(stage, camera, args.start_mm, args.end_mm, args.step_mm)
    frame = camera.capture()  # where the run left the stage
    return autofocus.final_view(frame, result.best_mm, result, blur=args.blur,
                                positions=autofocus.plan_positions(args.start_mm, args.end_mm, args.step_mm),
                                height=autofocus.fit_view_height(frame.shape, screen_px))


# --- the window under a real X server ----------------------------------------------------------


def test_the_window_held_at_the_end_is_the_view_at_its_own_size_on_the_screen(screen: str, tmp_path: Path) -> None:
    argv = ["10", "14", "0.05", *FAST_SIM, "--show-images", "--save-curve", str(tmp_path / "curve.csv")]
    child = Child(screen, *argv, tty=True)  # a terminal on stdin and stdout: an interactive run
    child.wait_for("the window stays open")
    wid = window_id(screen, child)
    expected = final_view_of(argv, SCREEN)
    assert expected.shape[:2] == (264, 1536)  # the view's own size: 4 panels 240 high (320x200 frames), status
    assert geometry(screen, wid)[2:] == (expected.shape[1], expected.shape[0])
    shows(screen, wid, expected)
    press(screen, wid, "s")  # s saves what is on the screen, and the window stays
    child.wait_for("saved the view as")
    assert np.array_equal(cv2.imread(str(tmp_path / "autofocus_view_001.png")), expected)
    assert child.proc.poll() is None
    press(screen, wid, "x")  # any other key ends it
    assert child.finish() == 0
    assert b"best focus at 12.34" in child.out


def test_on_a_small_screen_the_window_fits_and_its_close_button_ends_the_hold() -> None:
    argv = ["10", "11", "0.05", *FAST_SIM, "--show-images"]
    with x_server(1024, 600) as small:
        child = Child(small, *argv, tty=True)
        child.wait_for("the window stays open")
        wid = window_id(small, child)
        expected = final_view_of(argv, (1024, 600))
        assert expected.shape[1] <= 1024 - autofocus.SCREEN_MARGIN_PX[0] < 1536  # drawn smaller, to fit
        assert geometry(small, wid)[2:] == (expected.shape[1], expected.shape[0])
        shows(small, wid, expected)
        close_button(small, wid)
        assert child.finish() == 3  # the run's own code: no focus in 10..11 mm (the stage went back)
        assert b"no focus found" in child.out


@pytest.mark.parametrize("how, said", [("Escape", "Esc"), ("close", "the close button")])
def test_esc_or_the_close_button_stops_the_sweep_as_ctrl_c_does(screen: str, tmp_path: Path, how: str,
                                                                 said: str) -> None:
    curve = tmp_path / "curve.csv"
    child = Child(screen, "10", "14", "0.05", "--simulate", "--sim-size", "320x200", "--sim-time-scale", "1",
                  "--show-images", "--json", "--save-curve", curve)
    wid = window_id(screen, child)
    wait_until(lambda: geometry(screen, wid)[2] == 1536, "the first frame is shown")
    if how == "close":
        close_button(screen, wid)
    else:
        press(screen, wid, how)
    assert child.finish() == 130  # Ctrl-C's code: the user stopped the run
    assert f"stopped from the --show-images window ({said}); stage returned to its start, 0.0000 mm" in child.err
    result = json.loads(child.out)
    assert result["exit_code"] == 130 and result["error"] == f"stopped from the --show-images window ({said})"
    assert 1 <= result["frames"] < 81 and len(curve.read_text().splitlines()) - 1 == result["frames"]


def test_space_pauses_a_real_stage_and_camera_s_saves_q_stops_and_returns(screen: str, tmp_path: Path) -> None:
    # The real ZML on the fake Zaber device, the real simple-pyspin on the fake PySpin: a pause longer
    # than the camera's frame timeout (500 ms at the least) must leave both standing, and time nothing out.
    curve = tmp_path / "curve.csv"
    camera = {"cameras": [{"serial": "1", "width": 320, "height": 240}]}
    env = {"PYTHONPATH": str(FAKE_PYSPIN_DIR), "FAKE_PYSPIN_CONFIG": json.dumps(camera)}
    with FakeZaber(devices=[DeviceConfig(homed=True, position=5 * NM)]) as fake:
        child = Child(screen, "10", "14", "0.005", f"tcp://127.0.0.1:{fake.port}", "--native-unit-nm", "1",
                      "--camera", "flir", "--camera-timeout-ms", "1", "--show-images", "--save-curve", curve, env=env)
        wid = window_id(screen, child)
        wait_until(lambda: len(fake.move_targets()) >= 5, "the sweep has begun")
        press(screen, wid, "space")
        child.wait_for("paused")
        moves, position = len(fake.move_targets()), fake.position()
        time.sleep(1.0)
        assert (len(fake.move_targets()), fake.position(), fake.is_busy()) == (moves, position, False)
        press(screen, wid, "s")
        child.wait_for("saved the view as")
        shows(screen, wid, cv2.imread(str(tmp_path / "autofocus_view_001.png")))  # what the screen shows
        press(screen, wid, "space")
        child.wait_for("resumed")
        wait_until(lambda: len(fake.move_targets()) >= moves + 3, "the sweep goes on")
        press(screen, wid, "q")
        code = child.finish()
        assert code == 130, child.err
        assert "stopped from the --show-images window (q); stage returned to its start, 5.0000 mm" in child.err
        assert "stop" in fake.commands() and fake.position() == 5 * NM
    frames = len(curve.read_text().splitlines()) - 1  # the partial curve is written
    assert moves + 2 <= frames < 801


def test_live_window_runs_a_whole_sweep_and_does_not_wait_in_a_script(screen: str, tmp_path: Path) -> None:
    child = Child(screen, "10", "14", "0.05", *FAST_SIM, "--show-images", "--save-images", tmp_path)
    assert child.finish(timeout_s=60) == 0, child.err  # no terminal: nothing holds the window open
    assert b"best focus at 12.3" in child.out and "stays open" not in child.err
    assert len(list(tmp_path.glob("frame_*.png"))) == 81


def test_unreachable_display_is_one_line_not_a_crash() -> None:
    # A stale DISPLAY (e.g. an SSH session that ended) would make Qt abort the process.
    env = x_env(":4321")
    proc = subprocess.run([sys.executable, "autofocus.py", "10", "14", "0.05", "--simulate", "--show-images"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "cannot open a window on DISPLAY=:4321" in proc.stderr and "--save-images" in proc.stderr


# --- without a window: the decision to hold, the view's marks, its size, the stop ----------------


@pytest.mark.parametrize("argv, stdin_tty, stdout_tty, holds", [
    ([], True, True, True),  # a terminal on both: an interactive run
    ([], False, True, False),  # input from a pipe or a file: a script
    ([], True, False, False),  # output into a pipe: a script
    (["--json"], True, True, False),  # --json is for programs
    (["--no-hold-window"], True, True, False),
    (["--hold-window"], False, False, True),
    (["--hold-window", "--json"], False, False, True),
])
def test_the_window_is_held_only_in_an_interactive_run(monkeypatch: pytest.MonkeyPatch, argv: list[str],
                                                       stdin_tty: bool, stdout_tty: bool, holds: bool) -> None:
    monkeypatch.setattr(sys.stdin, "isatty", lambda: stdin_tty)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: stdout_tty)
    args = autofocus.build_parser().parse_intermixed_args(["10", "11", "0.1", "--simulate", "--show-images", *argv])
    assert autofocus.hold_window(args) is holds


def test_hold_window_without_show_images_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert autofocus.main(["10", "11", "0.1", "--simulate", "--hold-window"]) == 2
    assert "--hold-window keeps the --show-images window open at the end: add --show-images" in capsys.readouterr().err


def test_compose_view_is_one_picture_of_four_panels_and_a_status_line() -> None:
    from conftest import sim_frame

    curve = [autofocus.Sample(z, 1.0 + z) for z in (0.0, 0.1, 0.2)]
    view = autofocus.compose_view(sim_frame(0.0), 9, curve, height=120)
    assert view.shape == (120, 4 * 192, 3)  # frame, filtered, Laplacian (each 1.6:1) and the curve
    with_status = autofocus.compose_view(sim_frame(0.0), 9, curve, height=120, status="frame 3 of 3")
    assert with_status.shape[:2] == autofocus.view_size_px((200, 320), 120)[::-1] == (120 + 16, 768)
    assert np.array_equal(with_status[:120], view)


def columns(panel: np.ndarray, bgr: tuple[int, int, int], rows: slice, share: float = 0.0) -> np.ndarray:
    """The columns where more than ``share`` of ``rows`` are exactly this colour."""
    return np.nonzero(np.all(panel[rows] == bgr, axis=2).mean(axis=0) > share)[0]


def result_of(samples: list[autofocus.Sample], fit: autofocus.PeakFit, uncertainty_mm: float) -> autofocus.FocusResult:
    verdict = autofocus.Verdict("focused", 1.0, 0.01, 0.05, "a peak")
    best = autofocus.best_sample(samples)
    return autofocus.FocusResult("sweep", "laplacian", tuple(samples), best.z_mm, best.score, fit, verdict,
                                 fit.z_mm, 0.0, len(samples), 1.0, autofocus.Timing(),  # type: ignore[arg-type]
                                 uncertainty_mm=uncertainty_mm)


def test_the_curve_marks_the_best_frame_the_fit_and_the_range_still_to_go() -> None:
    positions = autofocus.plan_positions(10.0, 14.0, 0.1)  # 41 planned, 21 measured so far
    peak = [autofocus.Sample(z, float(np.exp(-((z - 11.02) / 0.3) ** 2)) + 0.01) for z in positions[:21]]
    panel = autofocus.draw_curve(peak, 240, span_mm=(10.0, 14.0), todo_mm=positions[21:])
    # The plot's geometry as draw_curve lays it out at 240 px: text lines, the score scale's margin.
    line_px = int(cv2.getTextSize("Ag", autofocus.VIEW_FONT, 0.5, 1)[0][1] * 1.9)
    top, bottom = int(3.3 * line_px), 240 - int(1.3 * line_px)
    scores = [s.score for s in peak]
    left = 10 + max(cv2.getTextSize(f"{v:.3g}", autofocus.VIEW_FONT, 0.425, 1)[0][0] for v in (max(scores), min(scores)))
    right = panel.shape[1] - 8
    below_legend = slice(3 * line_px - 2, None)

    def px(z: float) -> float:
        return left + (z - 10.0) / 4.0 * (right - left)

    grey = columns(panel, (225, 225, 225), slice(top + 1, bottom), share=0.5)  # 12.1..14.0: to go
    assert abs(grey.min() - px(12.05)) <= 1.5 and abs(grey.max() - px(14.05)) <= 1.5
    assert len(grey) == grey.max() - grey.min() + 1  # one band, nothing measured inside it
    red = columns(panel, (0, 0, 220), below_legend)  # the best frame's ring
    assert abs(red.mean() - px(11.0)) <= 1 and red.max() - red.min() <= 16
    fit = autofocus.fit_peak(peak)
    assert fit.used and fit.z_mm is not None and abs(fit.z_mm - 11.02) < 0.01
    assert list(columns(panel, (0, 140, 0), below_legend)) == [round(px(fit.z_mm))]  # the fit's dashed line
    done = autofocus.draw_curve(peak, 240, span_mm=(10.0, 14.0), todo_mm=positions[21:],
                                result=result_of(peak, fit, 0.2))
    assert not len(columns(done, (225, 225, 225), slice(top + 1, bottom), share=0.5))  # nothing to go
    bar = columns(done, (0, 140, 0), below_legend)  # the +-0.2 mm error bar through the fitted peak
    assert abs(bar.min() - px(fit.z_mm - 0.2)) <= 1.5 and abs(bar.max() - px(fit.z_mm + 0.2)) <= 1.5


@pytest.mark.parametrize("screen_px", [None, (1920, 1080), (1024, 600), (1280, 400), (640, 480)])
def test_the_view_is_drawn_at_the_largest_size_that_fits_the_screen(screen_px: tuple[int, int] | None) -> None:
    height = autofocus.fit_view_height((200, 320), screen_px)  # 320x200 frames: 1536x264 at the own size
    w, h = autofocus.view_size_px((200, 320), height)
    if screen_px is None or screen_px == (1920, 1080):
        assert (height, w, h) == (240, 1536, 264)
        return
    room_w, room_h = (screen_px[0] - autofocus.SCREEN_MARGIN_PX[0], screen_px[1] - autofocus.SCREEN_MARGIN_PX[1])
    larger = autofocus.view_size_px((200, 320), height + 1)
    assert w <= room_w and h <= room_h and (larger[0] > room_w or larger[1] > room_h)
    assert abs(w / (h - autofocus.status_bar_px(height)) - 1536 / 240) < 0.03  # the aspect is kept


def test_a_relative_run_places_the_planned_range_on_its_first_frame() -> None:
    view = autofocus.LiveView(9, positions=autofocus.plan_positions(-0.1, 0.1, 0.05), relative=True)  # no window yet
    view.offer(0, 7.21, np.full((8, 8), 9, np.uint8), 1.0)  # START (-0.1 mm) from a stage that was at 7.31 mm
    view.offer(1, 7.26, np.full((8, 8), 9, np.uint8), 2.0)
    assert view.positions == pytest.approx([7.21, 7.26, 7.31, 7.36, 7.41])  # the curve spans these
    best = view.best_frame()
    assert best is not None and best[1] == 7.26


def test_a_stop_from_the_window_is_handled_as_ctrl_c() -> None:
    stage, camera = autofocus.simulated_microscope(width=64, height=48, time_scale=0, start_mm=5.0)

    class StopAtFifth:
        count = 0

        def capture(self) -> np.ndarray:
            self.count += 1
            if self.count == 6:  # (the first: the look before the first move)
                raise autofocus.WindowStop("q")
            return camera.capture()

    with pytest.raises(autofocus.WindowStop) as stopped:
        autofocus.focus(stage, StopAtFifth(), 10, 11, 0.05)
    assert isinstance(stopped.value, KeyboardInterrupt) and autofocus.interrupt_code(stopped.value) == 130
    assert stopped.value.partial.frames == 4 and stage.position_mm() == 5.0  # kept, and back at the start
    assert autofocus.interrupt_text(stopped.value) == "stopped from the --show-images window (q)"


# --- the progress bar ----------------------------------------------------------------------------


def test_progress_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code = autofocus.main(["10", "11", "0.05", "--simulate", "--sim-time-scale", "0", "--sim-size", "64x48",
                           "--sim-focus-mm", "10.5"])
    err = capsys.readouterr().err
    assert code == 0 and "autofocus:" in err and "/21 [" in err and "frame/s" in err


def test_no_progress_bar_when_piped_or_verbose(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["10", "11", "0.05", "--simulate", "--sim-time-scale", "0", "--sim-size", "64x48", "--sim-focus-mm", "10.5"]
    assert autofocus.main(argv) == 0
    assert "/21 [" not in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert autofocus.main([*argv, "--verbose"]) == 0
    assert "/21 [" not in capsys.readouterr().err


# --- the progress bar ----------------------------------------------------------------------------------

class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_fault_while_the_progress_bar_is_drawn_starts_its_own_line(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    real_capture = autofocus.SimCamera.capture
    frames = []

    def capture(self: autofocus.SimCamera) -> Any:
        frames.append(1)
        if len(frames) == 6:
            raise autofocus.CameraError("camera timed out")
        return real_capture(self)

    monkeypatch.setattr(autofocus.SimCamera, "capture", capture)
    code = autofocus.main(["10", "11", "0.05", *FAST_SIM])
    text = terminal.getvalue()
    assert code == 5 and "autofocus:" in text  # the bar was drawn
    line = next(seg for seg in text.split("\n") if "autofocus.py:" in seg)
    assert line.split("\r")[-1].startswith("autofocus.py: camera timed out")  # not glued to the bar


def test_live_view_outlines_the_roi() -> None:
    stage, camera = small_sim(focus_mm=12.0, start_mm=12.0)
    frame = camera.capture()
    curve = [autofocus.Sample(12.0, 1.0)]

    def yellow(view: np.ndarray) -> np.ndarray:
        return np.all(view == (0, 255, 255), axis=2)

    plain = autofocus.compose_view(frame, 9, curve, height=200)
    outlined = autofocus.compose_view(frame, 9, curve, height=200, roi=RIGHT)
    assert not yellow(plain).any()
    rows, cols = np.nonzero(yellow(outlined))
    # The outline on the frame panel (the first 320 columns at this height) is where the ROI is.
    first = cols < 320
    assert cols[first].min() == RIGHT[0] and cols[first].max() == RIGHT[0] + RIGHT[2] - 1
    assert rows[first].min() == RIGHT[1] and rows[first].max() == RIGHT[1] + RIGHT[3] - 1
    assert (cols >= 640).any()  # ... and on the filtered and Laplacian panels too
