"""Several processes appending to one history file at once lose nothing and change nothing."""
from __future__ import annotations

import multiprocessing as mp
import shutil
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path

from rwkvlab.history import HistoryWarning, RunRecord, append_run, append_sidecar, read_history

REPO = Path(__file__).resolve().parents[1]
SEED = REPO / "data" / "benchmarks" / "m2max-architecture-opts.md"
WORKERS, APPENDS = 4, 10
# "Baseline" exists in the seed (runs go into the middle of the file), the others are new.
TITLES = ["Baseline", "Concurrent A", "Concurrent B"]


def worker(path: str, worker_id: int, barrier) -> None:
    barrier.wait()  # start together so the appends really contend for the lock
    start = datetime(2026, 5, 1, tzinfo=timezone.utc) + timedelta(hours=worker_id)
    for i in range(APPENDS):
        record = RunRecord(
            title=TITLES[(worker_id + i) % len(TITLES)], change=f"worker {worker_id} run {i}",
            timestamp=start + timedelta(seconds=i), model="2.9b-Q4_K_M.gguf", layers=32,
            embedding=2560, gpu="Apple M2 Max", load_ms=4000.0 + i, prefill_tps=150.0 + worker_id,
            generation_tps=44.0, quality_tokens=[33, 3319, 153, 129] * 8,
        )
        append_run(path, record)
        append_sidecar(path, {"timestamp": record.timestamp, "change": record.change,
                              "samples": {"prefill_tps": [record.prefill_tps] * 3}})


def test_concurrent_appends_from_processes_lose_nothing(tmp_path):
    path = tmp_path / "shared.md"
    shutil.copyfile(SEED, path)
    original = path.read_bytes()
    ctx = mp.get_context("spawn")  # a fresh interpreter per worker: no lock state shared by fork
    barrier = ctx.Barrier(WORKERS)
    procs = [ctx.Process(target=worker, args=(str(path), w, barrier)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0] * WORKERS

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = read_history(path)
    assert [str(w.message) for w in caught if issubclass(w.category, HistoryWarning)] == []
    new = df[df["change"].str.startswith("worker ")]
    assert len(df) == 5 + WORKERS * APPENDS
    assert sorted(new["change"]) == sorted(f"worker {w} run {i}" for w in range(WORKERS) for i in range(APPENDS))
    # every run has its sidecar samples joined: no sidecar line lost either
    assert all(s == {"prefill_tps": [row.prefill_tps] * 3} for s, row in zip(new["samples"], new.itertuples()))
    # each worker's runs under one title keep the order it wrote them in
    for _, group in new.groupby(["title", new["change"].str.split().str[1]]):
        runs = [int(c.split()[-1]) for c in group.sort_values("line")["change"]]
        assert runs == sorted(runs)
    # the seed's own lines are all still there, in order (runs were only inserted)
    text, pos = path.read_bytes(), 0
    for line in original.splitlines(keepends=True):
        pos = text.index(line, pos) + len(line)
    assert len(df[df["title"] == "Baseline"]) == 1 + len(new[new["title"] == "Baseline"])
