"""Running the tool from a test: in-process (``call_main``, ``run_json``) or as a process (``cli``), and
reading what it wrote (one-line errors, CSV files, the JSON's keys).  Shared by the replay and output tests."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import autofocus
from fake_zaber import FakeZaber

REPO = Path(autofocus.__file__).resolve().parent
JSON_KEYS = {"best_mm", "best_score", "verdict", "frames", "moves", "elapsed_s", "search", "curve", "timing"}
TIMING_KEYS = {"move_s", "capture_s", "score_s"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def call(capfd: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    code = autofocus.main([str(a) for a in argv])
    cap = capfd.readouterr()
    return code, cap.out, cap.err


def url(fake: FakeZaber) -> str:
    return f"tcp://127.0.0.1:{fake.port}"


def strict(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"non-strict JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)
