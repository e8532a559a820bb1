"""Shared fixtures: small synthetic data the tests make themselves, and the
real datasets in ../shared/data when they are there."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from defectkit.data.synthetic import add_defect, make_surface

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_dataset(name: str) -> Path:
    """Path of a real dataset, or skip the test saying why."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real dataset {name!r} not found at {path} (../shared/data absent)")
    return path


def cli_fit(data: Path, out: Path, *args: str) -> Path:
    """``defectkit fit DATA --out OUT -q ARGS...`` in-process; the model path, or
    the test fails with the command's output."""
    from typer.testing import CliRunner

    from defectkit.cli import app

    res = CliRunner().invoke(app, ["fit", str(data), "--out", str(out), "-q", *args])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="session")
def surface_set() -> dict[str, list[np.ndarray]]:
    """20 good, 6 good test and 6 defective images of one textured surface (96x112)."""
    rng = np.random.default_rng(123)
    size = (96, 112)
    train = [make_surface("brushed_metal", size, rng) for _ in range(20)]
    good = [make_surface("brushed_metal", size, rng) for _ in range(6)]
    bad, masks = [], []
    for i in range(6):
        img, mask = add_defect(
            make_surface("brushed_metal", size, rng), ("hole", "spot", "scratch")[i % 3], rng
        )
        bad.append(img)
        masks.append(mask)
    return {"train": train, "good": good, "bad": bad, "masks": masks}


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MVTec-layout demo dataset (one category) written by the generator."""
    from defectkit.data.synthetic import generate_demo

    out = tmp_path_factory.mktemp("demo")
    paths = generate_demo(
        out,
        seed=7,
        categories=("stone",),
        size=(96, 96),
        n_train=16,
        n_test_good=6,
        n_test_per_defect=3,
    )
    return paths["stone"]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The bad-input table of tests/test_robustness.py, when those tests ran."""
    import sys

    badinputs = sys.modules.get("badinputs")
    if badinputs is not None and badinputs.OUTCOMES:
        terminalreporter.write_sep("=", "bad inputs: outcome per case and entry point")
        terminalreporter.write_line(badinputs.outcome_table())
