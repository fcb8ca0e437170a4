"""tests/BENCHMARKS.md is written by tests/benchmark.py (--write, --merge PRINTOUT): sections replace
their own kind only, the Targets table is rebuilt from every section, saved printouts of either
format are read back.  No benchmark is run here: the report is built from small printouts."""
from __future__ import annotations

from pathlib import Path

import benchmark as bm
from conftest import ROOT


def run_line(sections: str, when: str = "2026-12-03T18:00:00", commit: str = "abc1234") -> str:
    return (f"_`python tests/benchmark.py{sections}` — {when}; autofocus 1.0.0, Python 3.11.7, numpy 2.4.6, "
            f"OpenCV 5.1.0, 2 CPUs, x86_64 Linux, commit {commit}_")


def framed(run: str, name: str, body: str, targets: list[bm.Target]) -> str:
    """A section as main() prints it."""
    return (f"\n<!-- section {name} -->\n{body}\n<!-- targets {name}: {bm.targets_json(run, targets)} -->\n"
            f"<!-- end of section {name} -->\n")


def test_merge_writes_framed_and_old_printouts_and_rebuilds_the_targets(tmp_path: Path) -> None:
    report = tmp_path / "BENCHMARKS.md"
    run = run_line(" --section score --section bracketing")
    printout = (f"# autofocus.py benchmark\n\n{run}\n"
                + framed(run, "score", "## Score speed\n\n| score | ms |\n| --- | ---: |\n| `laplacian` | 4.3 |\n",
                         [bm.Target("--transparent scores within the frame period", "4.3 ms", True)])
                + framed(run, "bracketing", "## Bracketing every frame\n\n- [progress, 1, 2]\n\n\n\nrow\n",
                         [bm.Target("bracketing: loop wall <= 1.05 x", "1.06x", False)])
                + "\n## Targets\n\n| target | measured | result |\n")
    bm.write_report(report, bm.parse_printout(printout))
    # A printout from before sections were framed: one --section, its targets from its Targets table.
    old_run = run_line(" --section decision", "2026-12-03T17:35:51", "64c5d31")
    old = (f"# autofocus.py benchmark\n\n{old_run}\n\n## False focus on empty fields\n\n- ['blank', 700, 0]\n"
           "| empty field | runs |\n| --- | ---: |\n| blank | 700 |\n\n## Targets\n\n| target | measured | result |\n"
           "| --- | ---: | ---: |\n| focal plane 1 mm outside the range gives edge | 12/24 \\| 6 no_peak | FAIL |\n")
    bm.write_report(report, bm.parse_printout(old))
    text = report.read_text(encoding="utf-8")
    assert text.startswith(bm.PREAMBLE)
    # every section, in the benchmark's order, each with the run it came from
    assert text.index("<!-- section score -->") < text.index("<!-- section bracketing -->") \
        < text.index("<!-- section decision -->")
    assert "_Run: `python tests/benchmark.py --section decision` — 2026-12-03T17:35:51" in text
    # the Targets table: every section's targets, linked to their section and run
    assert "| --transparent scores within the frame period | 4.3 ms | PASS | [score](#score) 2026-12-03 abc1234 |" in text
    assert "| bracketing: loop wall <= 1.05 x | 1.06x | FAIL | [bracketing](#bracketing) 2026-12-03 abc1234 |" in text
    assert "| focal plane 1 mm outside the range gives edge | 12/24 \\| 6 no_peak | FAIL | [decision](#decision)" in text
    assert "1 PASS, 2 FAIL, 0 SKIP; not yet run: accuracy, timing, memory, map, mm." in text
    assert "Known limits" in text and "- focal plane 1 mm outside the range gives edge: at 100-300 photons" in text
    # progress lines and runs of blank lines do not reach the report
    assert "- [progress" not in text and "- ['blank'" not in text and "\n\n\n" not in text
    # writing a section again replaces that section only
    new_run = run_line(" --section score", "2026-12-04T09:00:00", "def5678")
    bm.write_report(report, bm.parse_printout(f"{new_run}\n" + framed(
        new_run, "score", "## Score speed\n\n| `laplacian` | 3.9 |\n", [bm.Target("score target", "3.9 ms", True)])))
    again = report.read_text(encoding="utf-8")
    assert "| 3.9 |" in again and "| 4.3 |" not in again and again.count("<!-- section score -->") == 1
    assert "<!-- section bracketing -->" in again and "<!-- section decision -->" in again
    assert "[score](#score) 2026-12-04 def5678" in again and "abc1234 |" in again  # bracketing's run kept


def test_the_committed_report_is_the_writers_own() -> None:
    """tests/BENCHMARKS.md parses back into its sections, and rewriting it changes nothing."""
    path = ROOT / "tests" / "BENCHMARKS.md"
    text = path.read_text(encoding="utf-8")
    blocks = {m.group(1): m.group(0) for m in bm.BLOCK.finditer(text)}
    assert set(blocks) == set(bm.SECTIONS), f"sections missing from tests/BENCHMARKS.md: {set(bm.SECTIONS) - set(blocks)}"
    assert bm.report(blocks) == text, "tests/BENCHMARKS.md was edited by hand: rerun tests/benchmark.py --write"
