"""The README's speed table from the history (rwkvlab.speed_table, `history --format speed-table`)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from rwkvlab.bench import BenchRecord, BenchSettings, save_bench
from rwkvlab.cli import main as cli_main
from rwkvlab.options import Options


def record(minute: int, options: Options, generation_tps: float, **changes) -> BenchRecord:
    values = dict(
        title="2.9B Q8_0 speed", change="c", timestamp=datetime(2026, 12, 2, 12, tzinfo=timezone.utc)
        + timedelta(minutes=minute), model="q8.gguf", model_path="/x/q8.gguf", layers=32, embedding=2560,
        gpu="NVIDIA H200", adapter={"name": "NVIDIA H200", "backend": "vulkan", "adapter_type": "DiscreteGPU",
                                    "description": ""},
        options=options, settings=BenchSettings(prefill=512, generate=128, warmup=1, repeat=1),
        prompt=list(range(512)), load_ms=2000.0, engine_load_ms=1900.0, prefill_seconds=[0.1],
        generation_seconds=[128 / generation_tps], warmup_prefill_seconds=[0.1], warmup_generation_seconds=[0.4],
        quality_tokens=list(range(32)), consistent=True, logit_error=None, logit_tolerance=1e-3,
        reference="not checked", dispatches_per_token=260, commit="abc1234", step_weight_bytes=3_000_000_000)
    values.update(changes)
    return BenchRecord(**values)


def test_speed_table_shows_the_newest_default_run_per_runtime(tmp_path, capsys):
    history = tmp_path / "nvidia-h200.md"
    native = Options(path="native")
    save_bench(record(0, native, 300.0), history)
    save_bench(record(1, native, 320.0), history)  # newer: replaces the 300
    save_bench(record(2, native.with_(fusions=frozenset()), 190.0), history)  # not the defaults
    save_bench(record(3, native.with_(runtime="dawn"), 400.0, logit_error=2e-4, step_weight_bytes=None), history)
    assert cli_main(["history", "--format", "speed-table", str(history)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| NVIDIA")]
    assert len(lines) == 2
    wgpu_native, dawn = lines
    assert "| wgpu-native |" in wgpu_native and "**320.0**" in wgpu_native
    assert "0.96 TB/s (20%)" in wgpu_native  # 3e9 bytes x 320 tok/s of 4.8 TB/s
    assert "not checked" in wgpu_native
    assert "| dawn |" in dawn and "**400.0**" in dawn and "| ? |" in dawn and "0.0002" in dawn
    assert "190" not in "".join(lines)
