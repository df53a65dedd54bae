"""Where the project's files live, and the one reader of prompt files.

Everything the code reads from the checkout (the embedded model, calibration prompts) or writes by default
(ratings, caches, outputs, results) is found from one root: the checkout that holds this package, or
`$LAB_ROOT` when the package is installed elsewhere (a wheel carries code, not `assets/`).
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(os.environ.get("LAB_ROOT") or Path(__file__).resolve().parent.parent)
ASSETS = ROOT / "assets"
EMBEDDED_DIR = ASSETS / "demo_model"
CALIBRATION_PROMPTS = ASSETS / "calibration_prompts.txt"


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Prompt file not found: {path}")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def app_version() -> str:
    """The installed package's version (`pip install -e .`, which `make` does)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("audio-dit-ptq-lab")
    except PackageNotFoundError:
        return "0+unknown"
