"""The house rules a reader can rely on (design card, "Standards"): every Python file of the project is at most 300
lines, and every module of the package opens with a docstring that says what it is. The files are the tracked ones
and those git would track, so a new module is checked before its first commit."""
import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 300


def python_files() -> list[Path]:
    """git's list; outside a git checkout (an unpacked archive), every .py file not under a hidden folder or runs/."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return sorted(path for path in ROOT.rglob("*.py") if not any(
            part.startswith(".") or part == "runs" for part in path.relative_to(ROOT).parts[:-1]))
    return sorted(ROOT / name for name in listed if (ROOT / name).is_file())


def test_the_file_list_reaches_every_part_of_the_project():
    folders = {path.relative_to(ROOT).parts[0] if len(path.relative_to(ROOT).parts) > 1 else "." for path in
               python_files()}
    assert {".", "refine_mini", "tests", "bench"} <= folders, folders


@pytest.mark.parametrize("path", python_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_python_file_is_at_most_300_lines(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines; split it (house style: <= 300)"


@pytest.mark.parametrize("path", sorted((ROOT / "refine_mini").glob("*.py")), ids=lambda p: p.name)
def test_a_package_module_opens_with_a_docstring(path):
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    assert docstring and len(docstring.split()) >= 8, f"{path.name} needs a docstring saying what it is"
