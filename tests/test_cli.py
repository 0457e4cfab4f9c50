"""The top-level command: help at every level, one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from waferlab.cli import build_parser, main


def _subcommand_paths() -> list[list[str]]:
    parser = build_parser()
    paths: list[list[str]] = [[]]

    def walk(p, prefix):
        for action in p._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for name, child in action.choices.items():
                    paths.append(prefix + [name])
                    walk(child, prefix + [name])

    walk(parser, [])
    return paths


@pytest.mark.parametrize("path", _subcommand_paths(), ids=lambda p: " ".join(p) or "waferlab")
def test_help_at_every_level(path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*path, "--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_unknown_subcommand_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "waferlab.cli", "frobnicate"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "invalid choice" in proc.stderr


def test_building_the_cli_does_not_import_torch():
    """`waferlab --help` must be instant: command modules import torch only inside their handlers."""
    code = ("import sys, waferlab.cli as c; c.build_parser(); "
            "print(sorted({'torch', 'matplotlib'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_predict_summary_keeps_a_slow_rate_readable():
    """One map in 22 s read '(0 maps/s)'; slow rates keep two significant digits, fast ones are whole."""
    from waferlab.deploy.commands import predict_summary

    s = {"maps": 1, "seconds": 22.4, "quantization": "none", "defect": 0, "unknown": 0, "low_confidence": 0}
    assert "(0.045 maps/s)" in predict_summary(s, "p.csv", None)
    fast = predict_summary({**s, "maps": 9000, "quantization": "int8"}, "p.csv", "g.html")
    assert "(402 maps/s)" in fast and "(int8 model)" in fast and fast.endswith("; gallery -> g.html")
