"""The reference-equivalence tests pass unchanged on every reference-written fixture, not just one.

tests/data/ holds more than one fixture written by the reference Stem code (another gene count,
condition width, architecture, seed and checkpoint step; see scripts/make_reference_fixture.py).
The equivalence modules read the fixture named by ``NAPARI_STEM_REFERENCE_FIXTURE``; here they run
on each other fixture in a fresh pytest, which must run them all and pass them all.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

from reference_fixture import DATA_DIR, DEFAULT_REFERENCE_DIR, FIXTURE_VARIABLE

ROOT = Path(__file__).parent.parent
#: The modules whose tests read the fixture through tests/reference_fixture.py.
EQUIVALENCE_MODULES = ("tests/test_diffusion.py", "tests/test_checkpoint.py", "tests/test_cli_import.py")
OTHER_FIXTURES = sorted(
    folder for folder in DATA_DIR.iterdir() if (folder / "cases.npz").is_file() and folder != DEFAULT_REFERENCE_DIR
)


def test_there_is_another_fixture_to_run_on() -> None:
    assert OTHER_FIXTURES, f"no reference fixture besides {DEFAULT_REFERENCE_DIR.name} in {DATA_DIR}"


@pytest.mark.parametrize("fixture", OTHER_FIXTURES, ids=lambda folder: folder.name)
def test_the_equivalence_tests_pass_on_another_reference_fixture(fixture: Path, tmp_path: Path) -> None:
    env = {**os.environ, FIXTURE_VARIABLE: str(fixture)}
    seen = subprocess.run(
        [sys.executable, "-c", "import reference_fixture as f; print(f.REFERENCE_PT)"],
        cwd=ROOT / "tests",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert Path(seen.stdout.strip()).parent == fixture, seen.stderr[-2000:]

    report = tmp_path / "report.xml"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *EQUIVALENCE_MODULES],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    assert counts["tests"] > 0 and counts["failures"] == counts["errors"] == counts["skipped"] == 0, counts
