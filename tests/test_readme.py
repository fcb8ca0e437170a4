"""The README is the user's manual: it and ``--help`` agree on options, choices and exit codes, its
Python examples are self-contained and each is run by a test, and its commands are the ones CI runs."""
from __future__ import annotations

import ast
import builtins
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import autofocus
from conftest import ROOT
from fake_zaber import DeviceConfig, FakeZaber

README = (ROOT / "README.md").read_text(encoding="utf-8")
HELP = autofocus.build_parser().format_help()
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9]*(?:-[a-z0-9]+)*|-[a-z])(?![\w-])")
# Options of other programs the README quotes (the benchmark script's), never the tool's.
NOT_OURS = {"--section", "--write"}
SIGNAL_NUMBERS = {"SIGINT": 2, "SIGTERM": 15, "SIGHUP": 1, "SIGBREAK": 21}  # SIGBREAK: Windows


def section(title: str) -> str:
    """The text of one ``## title`` section of the README."""
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert found, f"README has no section {title!r}"
    return found.group(1)


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.S)


# --- options and choices ------------------------------------------------------------------------

def test_every_option_of_help_is_in_the_readme_and_every_readme_option_exists() -> None:
    parser = autofocus.build_parser()
    flags = {flag for action in parser._actions for flag in action.option_strings}
    in_help = set(OPTION.findall(HELP))
    assert flags <= in_help, f"--help omits {sorted(flags - in_help)}"
    in_readme = {flag for flag in OPTION.findall(README) if flag not in NOT_OURS}
    assert flags - in_readme == set(), f"README omits {sorted(flags - in_readme)}"
    long_in_readme = {flag for flag in in_readme if flag.startswith("--")}  # -r, -m: pip's and python's
    assert long_in_readme - flags == set(), f"README names options the tool lacks: {sorted(long_in_readme - flags)}"


def test_the_readme_gives_each_choice_list_as_the_parser_has_it() -> None:
    with_choices = [a for a in autofocus.build_parser()._actions if a.choices and a.option_strings]
    assert {"--metric", "--search", "--peak", "--sim-specimen", "--sim-right-specimen", "--sim-objective",
            "--camera", "--sim-defocus"} <= {a.option_strings[0] for a in with_choices}
    for action in with_choices:
        listed = f"{action.option_strings[0]} {{{','.join(action.choices)}}}"
        assert f"`{listed}" in README, f"README should list {listed}"
        assert listed in HELP


def test_every_objective_is_in_the_readme_table_and_in_help() -> None:
    table = section("Choosing START, END and STEP for an objective")
    rows = re.findall(r"^\| `(\w[^`]*)`", table, re.M)
    assert rows == list(autofocus.OBJECTIVES)
    for name in autofocus.OBJECTIVES:
        lens = autofocus.objective_optics(name)
        assert re.search(rf"^\| `{re.escape(name)}`[^|]*\| {lens['magnification']:g}× / {lens['na']:.2f} /", table,
                         re.M), name
        dof_um = autofocus.depth_of_field_um(name)
        dof_text = re.search(rf"^\| `{re.escape(name)}`[^|]*\|[^|]*\| ([\d.]+) µm", table, re.M).group(1)
        assert float(dof_text) == pytest.approx(dof_um, rel=0.05), name
        assert name in HELP.split("--objective NAME")[1].split("--allow-many")[0]


# --- exit codes ---------------------------------------------------------------------------------

def codes_in_epilog() -> set[int]:
    text = " ".join(HELP.split("exit codes:")[1].split("Example:")[0].split())
    return {int(c) for c in re.findall(r"(?:^|, )(\d+) ", text)}


def codes_in_readme() -> set[int]:
    table = section("Verdicts and exit codes").split("| exit | meaning |")[1].split("\n\n")[0]
    return {int(c) for c in re.findall(r"^\| (\d+) \|", table, re.M)}


def test_exit_codes_agree_in_help_readme_docstring_and_code() -> None:
    constants = {v for k, v in vars(autofocus).items() if k.startswith("EXIT_") and isinstance(v, int)}
    signals = {128 + SIGNAL_NUMBERS[name] for name in autofocus.EARLY_SIGNALS}
    expected = constants | signals
    assert {0, 1, 2, 3, 4, 5, 130, 143, 129, 149} <= expected
    assert codes_in_epilog() == expected, "the --help epilog's exit codes"
    assert codes_in_readme() == expected, "the README's exit-code table"
    docstring = autofocus.__doc__.split("Exit codes:")[1].split("With --map")[0]
    assert {int(c) for c in re.findall(r"^    (\d+) ", docstring, re.M)} == expected


def test_the_verdict_table_gives_each_verdicts_exit_code() -> None:
    rows = dict(re.findall(r"^\| `(\w+)` \|.*\| (\d+) \|$", section("Verdicts and exit codes"), re.M))
    assert rows == {"focused": str(autofocus.EXIT_OK), "edge": str(autofocus.EXIT_EDGE),
                    "no_peak": str(autofocus.EXIT_NO_PEAK)}


# --- the quick start and the test command --------------------------------------------------------

def test_quick_start_installs_and_runs_and_the_test_command_is_what_ci_runs() -> None:
    quick = section("Quick start")
    assert "pip install -r requirements.txt && python autofocus.py 10 14 0.05 --simulate" in quick
    command = "pip install -r tests/requirements.txt && python -m pytest"
    assert command in quick
    ci_line = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()[-1]
    assert ci_line.replace(" --quiet", "") == command  # CI runs exactly the README's test command
    assert "python autofocus.py 10 14 0.05 COM3" in section("Everyday use")  # the card's command


def test_the_readme_is_a_manual_of_at_most_650_lines_in_the_order_of_use() -> None:
    assert len(README.splitlines()) <= 650
    titles = re.findall(r"^## (.+)$", README, re.M)
    assert titles == ["Quick start", "Everyday use", "Choosing START, END and STEP for an objective",
                      "Verdicts and exit codes", "Troubleshooting", "Hardware set-up", "Python API", "How it works",
                      "Safety", "Development"]
    assert (ROOT / "tests" / "BENCHMARKS.md").exists() and "tests/BENCHMARKS.md" in README
    for picture in re.findall(r"\]\((img/[^)]+)\)", README):
        assert (ROOT / picture).is_file(), picture


def test_the_development_map_names_every_banner_section_in_order() -> None:
    banners = re.findall(r"^# (.+?) #{5,}$", (ROOT / "autofocus.py").read_text(encoding="utf-8"), re.M)
    listed = re.findall(r"`([^`]+)`", " ".join(section("Development").split("<!-- sections -->")[1].split("\n\n")[0].split()))
    assert [name for name in listed if name in banners] == banners, "update the README's map of autofocus.py"


# --- the Python examples ----------------------------------------------------------------------------

def free_names(code: str) -> set[str]:
    """Names a block reads but never binds (nor are they builtins): what it needs from elsewhere."""
    tree = ast.parse(code)
    bound, loaded = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
    return loaded - bound


def test_free_names_sees_a_name_from_another_block() -> None:
    assert free_names("import autofocus\nprint(refocus(stage, camera))") == {"refocus", "stage", "camera"}
    assert free_names("import cv2\nclass A:\n    def f(self, x=1):\n        return [y for y in x]\n") == set()


# Each README python block, by a text only it holds -> the text a test uses to find and run it.
RUN_BY = {
    "def refocus": 'readme_block("def refocus")',
    "from_axis(axis)": 'readme_block("from_axis(axis)")',
    "class UsbCamera": 'readme_block("class UsbCamera")',
    "FlirCamera.from_camera(cam)": 'readme_block("FlirCamera.from_camera(cam)")',
    "autofocus.focus_map(": "<!-- tiling-loop -->",
    "autofocus.mm_autofocus(": '"mm_autofocus" in b',
}


def test_every_python_example_is_self_contained_and_run_by_a_test() -> None:
    tests = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py"))
    blocks = python_blocks()
    assert len(blocks) == len(RUN_BY)
    for block in blocks:
        assert free_names(block) == set(), f"a README example uses names it does not define: {block[:80]!r}"
        markers = [m for m in RUN_BY if m in block]
        assert len(markers) == 1, f"a README example no test runs (or two markers): {block[:80]!r}"
        assert RUN_BY[markers[0]] in tests, f"no test runs the README example with {markers[0]!r}"
    assert re.search(r"<!-- tiling-loop -->\s*```python\n[^`]*autofocus\.focus_map\(", README)


def readme_block(marker: str) -> str:
    (block,) = [b for b in python_blocks() if marker in b]
    return block


def test_readme_flir_from_camera_example(PySpin: ModuleType, sp: ModuleType,  # noqa: N803
                                         capsys: pytest.CaptureFixture[str]) -> None:
    nm = 1_000_000  # the fake's native unit is 1 nm
    _, sim = autofocus.simulated_microscope(objective="20x", focus_mm=12.31, width=320, height=200, time_scale=0)
    with FakeZaber(devices=[DeviceConfig(homed=True, position=round(12.3 * nm))]) as fake:
        # The camera shows the simulated 20x specimen at the fake stage's position when exposed.
        PySpin.fake.reset(cameras=[PySpin.FakeCameraSpec(
            serial="4242", width=320, height=200, exposure_auto="Off", exposure_us=1000.0, readout_s=0.0005,
            render=lambda t: sim.render(fake.position() / nm))])
        before = dict(PySpin.fake.camera("4242").values)
        code = readme_block("FlirCamera.from_camera(cam)")
        assert 'ZaberStage("COM3")' in code
        code = code.replace('ZaberStage("COM3")', f'ZaberStage("tcp://127.0.0.1:{fake.port}", native_unit_nm=1)')
        scope: dict[str, Any] = {}
        exec(compile(code, "README.md (FLIR)", "exec"), scope)  # noqa: S102 - our own README
        assert capsys.readouterr().out == "focused True\n"  # what the README says it prints
        assert abs(fake.position() / nm - 12.31) <= 0.0025  # sent to the focus, within half a STEP
        after = PySpin.fake.camera("4242").values
        assert {k: after[k] for k in ("TriggerMode", "ExposureAuto", "GainAuto") if k in before} == \
               {k: before[k] for k in ("TriggerMode", "ExposureAuto", "GainAuto") if k in before}  # put back


def test_no_readme_example_path_is_missing() -> None:
    for name in re.findall(r"`(tests/[\w/.]+)`", README):
        assert (ROOT / name).exists(), name
    assert Path(ROOT / "tests" / "benchmark.py").exists()
