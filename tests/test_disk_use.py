"""The suite's disk use stays bounded: checkpoints and exports of passed tests do not pile up in /tmp
(CI once ran out of disk at 43 % of the suite, with 8 GB of temp folders written)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]

INNER = '''
import pytest

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs")
    (path / "last.ckpt").write_bytes(b"x" * 100_000)
    return path

def test_uses_module_folder(run_dir, tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"y" * 100_000)
    assert run_dir.is_dir()

def test_also_passes(run_dir, tmp_path):
    (tmp_path / "export.onnx").write_bytes(b"z" * 100_000)
'''


def _files(base: Path) -> list[Path]:
    return [p for p in base.rglob("*") if p.is_file()]


def _inner(pytester: pytest.Pytester, body: str) -> Path:
    shutil.copy(REPO / "tests" / "conftest.py", pytester.path / "conftest.py")
    shutil.copy(REPO / "pyproject.toml", pytester.path / "pyproject.toml")
    pytester.makepyfile(test_inner=body)
    return pytester.path / "basetemp"


def test_a_passed_module_leaves_no_files_behind(pytester: pytest.Pytester) -> None:
    base = _inner(pytester, INNER)
    # keep the base folder itself (policy "failed" would remove it at the session's end): look inside it
    # from a module that runs after test_inner and sees what the two tests and their module fixture left
    pytester.makepyfile(test_zz_after=f'''
from pathlib import Path
def test_nothing_left():
    left = [p for p in Path({str(base)!r}).rglob("*") if p.is_file()]
    assert left == [], left
''')
    result = pytester.runpytest_subprocess(f"--basetemp={base}", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_a_failed_module_keeps_its_files_for_debugging(pytester: pytest.Pytester) -> None:
    base = _inner(pytester, INNER + "\ndef test_fails(run_dir):\n    assert False\n")
    result = pytester.runpytest_subprocess(f"--basetemp={base}", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    assert any(p.name == "last.ckpt" for p in _files(base))
