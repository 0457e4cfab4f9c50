"""``waferlab demo``: the ``demo`` study on its synthetic maps (the study: test_study.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from waferlab.cli import main


def test_demo_plans_the_demo_study_on_synthetic_maps(tmp_path: Path) -> None:
    from waferlab.data.cache import load_cache
    from waferlab.demo import prepare_demo_data
    from waferlab.study.runner import plan
    from waferlab.study.spec import load_spec

    cache = prepare_demo_data(tmp_path, 90, 32, progress=False)
    data = load_cache(cache)
    assert len(data) == 90 and data.maps.shape[1:] == (32, 32) and len(np.unique(data.labels)) == 9
    planned = plan(load_spec("demo"), tmp_path, str(cache))
    assert [p.cell.name for p in planned] == [
        f"{m}__seed-{s}" for s in (0, 1) for m in ("resnet34", "cbam", "pan", "spanet")
    ]
    spanet = planned[3].args
    assert spanet[spanet.index("--config") + 1] == "spanet" and spanet[spanet.index("--data") + 1] == str(
        cache
    )
    assert all(p.action == "new" for p in planned)


def test_demo_rejects_too_few_maps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path), "--n", "10"]) == 2
    assert capsys.readouterr().err.strip() == "waferlab: error: demo --n must be >= 90 (10 per class), got 10"
