"""Inspecting on several local processes: order, fallbacks, and the CLI's output."""

from __future__ import annotations

import json
import os
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import cli_fit
from typer.testing import CliRunner

from defectkit.cli import app
from defectkit.errors import DefectkitError, ImageError
from defectkit.pipeline.inspection import inspect_batch as _real_inspect_batch
from defectkit.pipeline.scoring import worker_model as _real_worker_model
from defectkit.report.collect import score_batch as _real_score_batch
from defectkit.scale.local_pool import (
    MAX_AUTO_JOBS,
    MIN_IMAGES_FOR_WORKERS,
    WorkerPool,
    _cgroup_cpu_quota,
    auto_jobs,
    ordered_batches,
    single_threaded,
)

runner = CliRunner()


# -- work run in spawned processes: module-level, so they pickle by name -----------
def _model(factor: int, flag: str | None = None) -> dict[str, int]:
    if flag is not None:
        Path(flag).write_text("loaded")
    return {"factor": factor, "pid": os.getpid()}


def _work(model: dict[str, int], batch: int) -> tuple[int, int]:
    """(result, pid of the process that did it)."""
    return model["factor"] * batch, model["pid"]


def _wait_for(flag: Path) -> None:
    deadline = time.monotonic() + 120
    while not flag.exists():
        assert time.monotonic() < deadline, "the worker process never loaded its model"
        time.sleep(0.02)


def _local_after(flag: str, model: dict[str, int], batch: int) -> tuple[int, int]:
    """This process's work: the first batch waits until the worker has loaded its
    model, the others take a little time, so the worker surely gets batches."""
    if batch == 0:
        _wait_for(Path(flag))
    time.sleep(0.02)
    return _work(model, batch)


def _broken_model() -> None:
    raise ValueError("cannot load this model")


def _dies(model: dict[str, int], batch: int) -> tuple[int, int]:
    os._exit(3)  # a worker killed mid-batch (e.g. by the OOM killer)


def _refuses(model: dict[str, int], batch: int) -> tuple[int, int]:
    raise DefectkitError(f"batch {batch}: model and backbone disagree")


def _run(tmp_path: Path, setup, work, n: int = 30) -> tuple[list, WorkerPool]:
    flag = str(tmp_path / "loaded")
    with WorkerPool(1, partial(setup, 3, flag) if setup is _model else setup) as pool:
        out = list(
            ordered_batches(list(range(n)), partial(_local_after, flag, _model(3)), pool, work)
        )
    return out, pool


def test_results_come_back_in_order_from_both_processes(tmp_path: Path) -> None:
    out, pool = _run(tmp_path, _model, _work)
    assert [r for r, _ in out] == [3 * b for b in range(30)]
    assert {pid for _, pid in out} == {os.getpid(), out[-1][1]} and len({p for _, p in out}) == 2
    assert pool.failure is None


def test_a_worker_that_cannot_start_leaves_every_batch_to_this_process() -> None:
    here = _model(3)
    with WorkerPool(1, _broken_model) as pool:

        def local(batch: int) -> tuple[int, int]:
            deadline = time.monotonic() + 120
            while batch == 0 and not pool.failure:  # until the worker's failure is known
                assert time.monotonic() < deadline
                pool.ready()
                time.sleep(0.02)
            return _work(here, batch)

        out = list(ordered_batches(list(range(30)), local, pool, _work))
    assert out == [(3 * b, os.getpid()) for b in range(30)]
    assert pool.failure is not None and "failed to start" in pool.failure
    assert "cannot load this model" in pool.failure


def test_batches_of_a_worker_that_died_are_redone_here(tmp_path: Path) -> None:
    out, pool = _run(tmp_path, _model, _dies)
    assert out == [(3 * b, os.getpid()) for b in range(30)]
    assert pool.failure is not None and "stopped" in pool.failure


def test_a_defectkit_error_in_a_worker_is_raised_here(tmp_path: Path) -> None:
    with pytest.raises(DefectkitError, match="model and backbone disagree"):
        _run(tmp_path, _model, _refuses)


def _unusable(model: dict[str, int], batch: int) -> tuple[int, int]:
    raise ImageError(f"{batch}.png", "too large")


def test_an_image_error_in_a_worker_is_raised_here_whole(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="too large") as caught:
        _run(tmp_path, _model, _unusable)
    assert caught.value.problem == "too large" and caught.value.path.endswith(".png")


def test_without_a_pool_everything_runs_here() -> None:
    here = _model(4)
    out = list(ordered_batches([1, 2, 3], partial(_work, here), None))
    assert out == [(4, os.getpid()), (8, os.getpid()), (12, os.getpid())]


def test_auto_jobs_uses_every_core_only_for_long_lists() -> None:
    assert auto_jobs(MIN_IMAGES_FOR_WORKERS - 1, cores=4) == 1
    assert auto_jobs(MIN_IMAGES_FOR_WORKERS, cores=4) == 4
    assert auto_jobs(10_000, cores=1) == 1
    assert auto_jobs(10_000, cores=64) == MAX_AUTO_JOBS  # each process holds a model


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "200000 100000\n"}, 2.0),  # cgroup v2, 2 CPUs
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),  # v2, no quota
        ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),  # no cgroup files
    ],
)
def test_cgroup_cpu_quota_is_read_from_v1_and_v2(
    tmp_path: Path, files: dict[str, str], expected: float | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert _cgroup_cpu_quota(tmp_path) == expected


def test_single_threaded_restores_the_thread_count() -> None:
    before = torch.get_num_threads()
    with single_threaded():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.fixture(scope="module")
def fitted(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tmp_path_factory.mktemp("model") / "stone.dkm"
    return cli_fit(demo_root, model, "-p", "image_size=96", "-p", "coreset_ratio=0.1")


def _worker_model_flagged(*args):
    det = _real_worker_model(*args)
    Path(os.environ["DK_TEST_DIR"], "worker-loaded").write_text("")
    return det


def _inspect_batch_noted(det, batch, **options):
    """The pipeline's batch work; in the test process, it waits for the worker first."""
    where = Path(os.environ["DK_TEST_DIR"])
    if os.getpid() == int(os.environ["DK_TEST_PARENT"]):
        _wait_for(where / "worker-loaded")
        time.sleep(0.2)
    else:
        (where / f"worker-did-{batch[0]}").write_text("")
    return _real_inspect_batch(det, batch, **options)


def test_inspect_with_worker_processes_writes_what_one_process_writes(
    fitted: Path, demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import defectkit.pipeline.inspection as inspection
    import defectkit.pipeline.scoring as scoring

    files = sorted((demo_root / "test").rglob("*.png"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not an image")
    inputs = [*map(str, files[:5]), str(broken), *map(str, files[5:])]
    runs = {}
    for jobs in (1, 2):
        maps = tmp_path / f"maps{jobs}"
        if jobs == 2:
            monkeypatch.setenv("DK_TEST_DIR", str(tmp_path))
            monkeypatch.setenv("DK_TEST_PARENT", str(os.getpid()))
            monkeypatch.setattr(scoring, "worker_model", _worker_model_flagged)
            monkeypatch.setattr(inspection, "inspect_batch", _inspect_batch_noted)
        res = runner.invoke(
            app,
            ["inspect", str(fitted), *inputs, "--jobs", str(jobs), "--batch-size", "2",
             "--maps-out", str(maps), "-q"],
        )  # fmt: skip
        assert res.exit_code == 1, res.output  # the broken file
        runs[jobs] = [json.loads(x) for x in res.stdout.splitlines()]
        assert sorted(p.name for p in maps.iterdir()) == sorted(
            Path(r["overlay"]).name for r in runs[jobs] if r["error"] is None
        )
    assert list(tmp_path.glob("worker-did-*")), "the worker process inspected nothing"
    one, two = runs[1], runs[2]
    assert [r["path"] for r in two] == inputs
    assert two[5]["score"] is None and two[5]["error"]
    for a, b in zip(one, two, strict=True):
        assert a["path"] == b["path"] and a["error"] == b["error"]
        if a["error"] is None:
            assert b["score"] == pytest.approx(a["score"], rel=1e-5)
            assert a["is_defect"] == b["is_defect"]
            assert Path(a["overlay"]).name == Path(b["overlay"]).name


def _score_batch_noted(det, batch):
    """``score_samples``' batch work; in the test process it waits for the worker."""
    where = Path(os.environ["DK_TEST_DIR"])
    if os.getpid() == int(os.environ["DK_TEST_PARENT"]):
        _wait_for(where / "worker-loaded")
        time.sleep(0.2)
    else:
        (where / f"worker-scored-{Path(batch[0]).name}").write_text("")
    return _real_score_batch(det, batch)


def test_evaluate_with_worker_processes_gives_the_same_metrics(
    fitted: Path, demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import defectkit.pipeline.scoring as scoring
    import defectkit.report.collect as collect

    def run(jobs: int) -> dict:
        res = runner.invoke(app, ["evaluate", str(fitted), str(demo_root), "--format", "json",
                                  "-q", "--jobs", str(jobs), "--batch-size", "2"])  # fmt: skip
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)

    one = run(1)
    monkeypatch.setenv("DK_TEST_DIR", str(tmp_path))
    monkeypatch.setenv("DK_TEST_PARENT", str(os.getpid()))
    monkeypatch.setattr(scoring, "worker_model", _worker_model_flagged)
    monkeypatch.setattr(collect, "score_batch", _score_batch_noted)
    two = run(2)
    assert list(tmp_path.glob("worker-scored-*")), "the worker process scored nothing"
    for key in ("image_auroc", "image_ap", "pixel_auroc", "aupro", "n_good", "n_defect"):
        assert two[key] == pytest.approx(one[key], rel=1e-6), key


_ORPHAN_SCRIPT = """
import operator, os, time
from defectkit.scale.local_pool import WorkerPool
if __name__ == "__main__":
    pool = WorkerPool(1, os.getpid)
    print(pool.submit(operator.add, 0).result(timeout=120), flush=True)  # the worker's pid
    time.sleep(600)
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited (nobody has reaped it yet)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_workers_end_when_their_parent_is_killed() -> None:
    import signal
    import subprocess
    import sys

    parent = subprocess.Popen([sys.executable, "-c", _ORPHAN_SCRIPT], stdout=subprocess.PIPE)
    try:
        worker = int(parent.stdout.readline())
        assert _running(worker)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _running(worker):
            assert time.monotonic() < deadline, f"worker {worker} outlived its killed parent"
            time.sleep(0.1)
    finally:
        parent.kill()


def test_jobs_is_refused_for_a_ray_job(fitted: Path, demo_root: Path) -> None:
    res = runner.invoke(
        app, ["inspect", str(fitted), str(demo_root / "test"), "--engine", "ray", "--jobs", "2"]
    )
    assert res.exit_code == 2
    assert "--jobs is for --engine local" in res.output
