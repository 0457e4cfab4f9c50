"""Shared test fixtures: the real samples in ../shared/data and a file-only matplotlib backend."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("WAFERLAB_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="module", autouse=True)
def _free_module_disk(request: pytest.FixtureRequest,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Delete the folders a test module made in the session's temp folder (its module-scoped runs and
    exports, up to a GB each) when it ends without a failure: the suite's disk use stays one module's."""
    base = tmp_path_factory.getbasetemp()
    before, failed = set(base.iterdir()), request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for path in set(base.iterdir()) - before:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real WM-811K samples; CI always has it beside the checkout."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"real samples not found at {SHARED_DATA}")
        pytest.skip(f"real samples not found at {SHARED_DATA} (set WAFERLAB_SHARED_DATA)")
    return SHARED_DATA


def synthetic_cache(root: Path, n: int, size: int = 32) -> Path:
    """``n`` generator maps (seed 0) prepared at ``size`` px under ``root``: the studies' tiny data."""
    from waferlab.data.cache import prepare, save_cache
    from waferlab.data.readers import load_table
    from waferlab.data.synth import write_synthetic

    write_synthetic(root / "maps.npz", n=n, seed=0)
    save_cache(prepare(load_table(root / "maps.npz"), size, progress=False), root / f"maps{size}.npz")
    return root / f"maps{size}.npz"
