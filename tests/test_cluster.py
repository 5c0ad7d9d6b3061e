"""Sweeps on a Dask cluster (rwkvlab.cluster): every run lands once, in one writer's hands.

A LocalCluster of two worker processes (one thread and one GPU resource each) runs real bench
workers on lavapipe with the tiny preset at the smallest lengths (a few seconds a run): four
configurations land exactly four runs; two sweeps from two client processes into one history
lose nothing; killing the worker running a configuration gets it rescheduled once, and killing
it again reports it, while the runs that finished stay saved. The command line's `--workers 2`
(the issue's "done when") runs end to end in a subprocess.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
from distributed import Client

import rwkvlab
from rwkvlab.bench import BenchSettings
from rwkvlab.cli import main
from rwkvlab.cluster import start_local_cluster
from rwkvlab.gpu import ADAPTER_ENV
from rwkvlab.history import HistoryWarning, read_history, sidecar_path
from rwkvlab.options import Options
from rwkvlab.sweep import run_sweep
from rwkvlab.synth import resolve_model

SETTINGS = BenchSettings(prefill=8, generate=4, warmup=0, repeat=1, reference=False, progress=False)
SMALL = ["--prefill", "8", "--generate", "4", "--warmup", "0", "--repeat", "1", "--no-reference", "--no-progress"]
# base path=webgpu: "fusions=none weights=native" is the sweep's baseline, so four configurations run
BASE = Options(path="webgpu")
VARY = {"fusions": ["none", "default"], "weights": ["native", "f16"]}


def _runs(folder: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", HistoryWarning)
        return read_history(folder)


def _sidecar_lines(folder: Path) -> int:
    return sum(len(sidecar_path(md).read_text().splitlines()) for md in folder.glob("*.md"))


@pytest.fixture(scope="module")
def client():
    """Two local worker processes, both told adapter 0 (lavapipe's Vulkan adapter here)."""
    with start_local_cluster(2, adapters=["0"]) as cluster, Client(cluster) as c:
        c.wait_for_workers(2)
        yield c


@pytest.fixture
def two_workers(client):
    client.wait_for_workers(2, timeout=60)  # a test before may have killed one; its nanny restarts it
    # The workers import the package the tests import (not another copy on the path).
    assert set(client.run(lambda: rwkvlab.__file__).values()) == {rwkvlab.__file__}
    return client


def test_four_configurations_land_exactly_four_runs(two_workers, tmp_path):
    seen = []
    result = run_sweep(resolve_model("tiny"), BASE, VARY, SETTINGS, history_dir=tmp_path, client=two_workers,
                       on_row=seen.append, title="Cluster")
    assert len(result.rows) == 4 and not result.baseline_added and all(r.ran for r in result.rows)
    assert len(seen) == 4 and seen[0] is result.baseline  # the baseline ran first, alone
    df = _runs(tmp_path)
    assert len(df) == 4 and _sidecar_lines(tmp_path) == 4
    assert sorted(df["change"]) == sorted(r.config.label for r in result.rows)
    assert list(tmp_path.glob("*.md")) == [Path(r.get("saved")["file"]) for r in result.rows][:1]
    # Each record says where it ran; both workers (one GPU each) took configurations.
    envs = list(df["environment"])
    assert all(e["adapter_index"] == "0" and e["host"] and e["gpu"] == df["gpu"].iloc[0] for e in envs)
    assert len({e["dask_worker"] for e in envs}) == 2
    assert result.output(result.baseline)[0] == "baseline" and result.best is not None
    assert set(result.best_per_gpu()) == {df["gpu"].iloc[0]}


def test_two_clients_sweeping_into_one_history_lose_nothing(two_workers, tmp_path):
    address = two_workers.scheduler.address
    env = {**os.environ, "PYTHONPATH": str(Path(rwkvlab.__file__).parents[1])}
    procs = [subprocess.Popen([sys.executable, "-m", "rwkvlab.cli", "sweep", "--scheduler", address,
                               "--preset", "tiny", "--path", "webgpu", "--vary", "fusions=none,default",
                               "--title", f"Client {name}", "--change", name, "--history-dir", str(tmp_path),
                               *SMALL], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for name in "AB"]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out + err
        # every run was found again in the history, though the other client's runs moved its lines
        assert "not found in the history" not in out and "best correct configuration" in out
    df = _runs(tmp_path)
    assert len(df) == 4 and _sidecar_lines(tmp_path) == 4
    assert sorted(df["title"]) == ["Client A", "Client A", "Client B", "Client B"]
    assert sorted(df["change"]) == ["A: fusions=default", "A: fusions=none", "B: fusions=default", "B: fusions=none"]
    # the second client's runs are judged against the first's baseline (one model, one key)
    assert df["quality_hash"].nunique() == 1


def test_a_killed_worker_loses_no_finished_run_and_its_configuration_is_retried_then_reported(
        two_workers, tmp_path):
    """Kill the worker running one configuration: Dask reschedules it (once); kill the worker
    running it again: it is reported as lost. Every other configuration lands."""
    client = two_workers
    killed: list[tuple[str, str]] = []  # (task key, worker address) per kill

    def processing_of(key: str | None, deadline: float) -> tuple[str, str] | None:
        while time.monotonic() < deadline:
            for address, keys in client.processing().items():
                for k in keys:
                    if key is None or k == key:
                        return k, address
            time.sleep(0.05)
        return None

    def killer() -> None:
        first = processing_of(None, time.monotonic() + 60)
        if first is None:
            return
        for _ in range(2):
            where = processing_of(first[0], time.monotonic() + 60)
            if where is None:
                return
            pid = client.run(os.getpid, workers=[where[1]])[where[1]]
            os.kill(pid, signal.SIGKILL)  # the Dask worker process this test's cluster started
            killed.append(where)
            time.sleep(1.0)  # let the scheduler see it gone before looking for the task again

    def start_killer(row) -> None:
        if row.config.label == "fusions=none weights=native":  # the baseline, run alone first
            threading.Thread(target=killer, daemon=True).start()

    result = run_sweep(resolve_model("tiny"), BASE, VARY, SETTINGS, history_dir=tmp_path, client=client,
                       on_row=start_killer)
    assert len(killed) == 2 and killed[0][0] == killed[1][0] and killed[0][1] != killed[1][1]
    lost = [r for r in result.rows if not r.ran]
    assert len(lost) == 1
    assert lost[0].error.startswith("lost with its Dask worker: ")
    assert "died" in lost[0].error  # Dask's own words: the workers that ran it died
    summary = result.summary()
    assert f"1 configuration(s) failed to run: {lost[0].config.label}" in summary
    assert "FAILED: lost with its Dask worker" in result.table()
    df = _runs(tmp_path)
    assert len(df) == 3 and _sidecar_lines(tmp_path) == 3
    assert sorted(df["change"]) == sorted(r.config.label for r in result.rows if r.ran)
    assert lost[0].config.label not in set(df["change"])


def test_local_cluster_workers_get_their_own_adapter():
    with start_local_cluster(2, adapters=["0", "1"]) as cluster, Client(cluster) as c:
        c.wait_for_workers(2)
        assert sorted(c.run(lambda: os.environ.get(ADAPTER_ENV)).values()) == ["0", "1"]
        assert all(w["resources"] == {"GPU": 1} and w["nthreads"] == 1
                   for w in c.scheduler_info()["workers"].values())


def test_cli_sweep_on_two_local_workers_lands_every_run(tmp_path):
    """The issue's "done when": `rwkvlab sweep --workers 2 --vary fusions=none,default --preset tiny`."""
    proc = subprocess.run([sys.executable, "-m", "rwkvlab.cli", "sweep", "--workers", "2", "--vary",
                           "fusions=none,default", "--preset", "tiny", "--history-dir", str(tmp_path), *SMALL],
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": str(Path(rwkvlab.__file__).parents[1])})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    df = _runs(tmp_path)
    # fusions=none and fusions=default on the default path, and the baseline the sweep adds
    assert len(df) == 3 and _sidecar_lines(tmp_path) == 3
    assert set(df["change"]) == {"baseline (path=webgpu weights=native fusions=none)", "fusions=none",
                                 "fusions=default"}
    assert "best correct configuration: " in proc.stdout and f"runs appended to {tmp_path}" in proc.stdout
    assert proc.stdout.count("\n") >= 6 and "FAILED" not in proc.stdout


@pytest.mark.parametrize("argv, message", [
    (["--scheduler", "tcp://127.0.0.1:1", "--workers", "2"], "--scheduler and --workers: give one"),
    (["--scheduler", "tcp://127.0.0.1:1", "--adapter", "0"], "set it where the worker starts"),
    (["--adapter", "0,1"], "2 adapters for 0 worker(s)"),
    (["--workers", "2", "--adapter", "x"], "expected adapter numbers"),
    (["--workers", "-1"], "--workers -1"),
])
def test_bad_cluster_arguments_exit_2_before_anything_runs(argv, message, tmp_path, capsys):
    assert main(["sweep", "--preset", "tiny", "--vary", "fusions=none", "--history-dir", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_cluster_without_gpu_workers_is_refused_not_waited_on(tmp_path):
    from distributed import LocalCluster

    from rwkvlab.cluster import ClusterError

    with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster, Client(cluster) as c:
        with pytest.raises(ClusterError, match="--resources GPU=1"):
            run_sweep(resolve_model("tiny"), BASE, {}, SETTINGS, history_dir=tmp_path, client=c)
    assert not any(tmp_path.iterdir())
