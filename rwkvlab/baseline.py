"""A run against its baseline: the verdicts the panel shows, and the table and HTML that show them.

The output verdict is the lab's one rule (:func:`rwkvlab.verdicts.judge_new`, what ``rwkvlab
bench``, ``history``, reports and sweeps say of the same run). Speed is judged against the
baseline the user picked (by default the latest earlier run of the same model file on the same
GPU): this run's median against the baseline's with :func:`rwkvlab.verdicts.judge`, the noise the
larger of the history's estimate for the GPU and the spread of the repeats in hand.
"""
from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rwkvlab import bench
from rwkvlab.bench import BenchRecord
from rwkvlab.verdicts import RUN_METRICS, Noise, judge

SPEED_ROWS = {"load": "load (ms)", "prefill": "prefill (tok/s)", "generation": "generation (tok/s)"}
# Red means "output changed / wrong" everywhere in the lab; a slower run is orange, not red.
VERDICT_COLOURS = {
    "improvement": "#22863a", "regression": "#c05600", "within noise": "#5a6473",
    "same": "#22863a", "ok": "#22863a", "first run": "#5a6473",
    "changed": "#b01c1c", "too large": "#b01c1c", "failed": "#b01c1c",
}



@dataclass(frozen=True)
class Baseline:
    """A run to compare with, from the history or from this session, in one shape."""

    key: str  # "history:<file>:<line>" or "session:<n>"
    label: str
    model: str
    gpu: str
    timestamp: pd.Timestamp | None
    load_ms: float | None
    prefill_tps: float | None
    generation_tps: float | None
    samples: dict[str, list[float]]  # per-repeat values by history column name, when known
    quality_hash: str | None
    logit_error: float | None
    dispatches_per_token: int | None
    options: str  # "path=... weights=... fusions=..." as far as it was recorded

    def value(self, column: str) -> float | None:
        v = getattr(self, column)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _number(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def baseline_from_history(row: pd.Series) -> Baseline:
    """A history row (``read_history``) as a baseline."""
    name = Path(str(row["file"])).name
    samples = row.get("samples")
    samples = {k: list(v) for k, v in samples.items()} if isinstance(samples, dict) else {}
    recorded = [f"{k}={row[k]}" for k in ("path", "weights", "fusions")
                if k in row.index and isinstance(row[k], str) and row[k]]
    dispatches = _number(row.get("dispatches_token"))
    gen = _number(row.get("generation_tps"))
    change = str(row["change"])
    label = f"{name}:{int(row['line'])} · {row['title']} · {change[:48]}" + (f" ({gen:.1f} tok/s gen)" if gen else "")
    stamp = row["timestamp"] if pd.notna(row["timestamp"]) else None
    h = row["quality_hash"]
    return Baseline(
        key=f"history:{name}:{int(row['line'])}", label=label, model=str(row["model"]), gpu=str(row["gpu"]),
        timestamp=stamp, load_ms=_number(row["load_ms"]), prefill_tps=_number(row["prefill_tps"]),
        generation_tps=gen, samples=samples, quality_hash=None if pd.isna(h) else str(h),
        logit_error=_number(row.get("logit_error")),
        dispatches_per_token=None if dispatches is None else int(dispatches),
        options=" ".join(recorded) or "options not recorded",
    )


def baseline_from_record(record: BenchRecord, key: str, label: str) -> Baseline:
    """A run of this session as a baseline."""
    o = record.options
    return Baseline(
        key=key, label=label, model=record.model, gpu=record.gpu, timestamp=pd.Timestamp(record.timestamp),
        load_ms=record.load_ms, prefill_tps=record.prefill_tps, generation_tps=record.generation_tps,
        samples={"prefill_tps": record.prefill_tps_samples, "generation_tps": record.generation_tps_samples},
        quality_hash=record.quality_hash, logit_error=record.logit_error,
        dispatches_per_token=record.dispatches_per_token,
        options=o.text(),
    )


@dataclass(frozen=True)
class Check:
    """One verdict and the reason for it (speed checks also carry delta and noise band)."""

    verdict: str
    reason: str
    delta: float | None = None
    band: float | None = None


@dataclass
class Comparison:
    """A run against its baseline: speed per metric, output, logits; and the table to show."""

    baseline: Baseline | None
    speed: dict[str, Check]  # "load", "prefill", "generation"
    output: Check
    logits: Check
    table: pd.DataFrame = field(repr=False)

    @property
    def reasons(self) -> dict[str, str]:
        out = {name: c.reason for name, c in self.speed.items()}
        out.update(output=self.output.reason, logits=self.logits.reason)
        return out


def repeat_sigma(sample_sets: Sequence[Sequence[float]]) -> tuple[float, int] | None:
    """Pooled relative spread of one measurement from the repeats of one or more runs.

    The standard deviation of log(value) within each run, pooled over runs (weighted by
    degrees of freedom): (sigma, degrees of freedom), or None with fewer than two repeats.
    """
    squares, dof = 0.0, 0
    for samples in sample_sets:
        x = np.log([float(v) for v in samples if v and float(v) > 0])
        if len(x) >= 2:
            squares += float(((x - x.mean()) ** 2).sum())
            dof += len(x) - 1
    return (math.sqrt(squares / dof), dof) if dof else None


def speed_noise(column: str, gpu: str, history_noise: dict[str, dict] | None,
                sample_sets: Sequence[Sequence[float]]) -> Noise:
    """The noise of one run of ``column`` on ``gpu``: the larger of the history's estimate
    (rwkvlab.verdicts: repeat pairs on this GPU, else pooled, else its default) and the spread
    of the repeats in hand. Repeats inside one run see less noise than separate runs do, so
    they can only raise the history's figure (a busy machine), never lower it."""
    from rwkvlab.verdicts import DEFAULT_SIGMA

    table = (history_noise or {}).get(column) or {}
    hist = table.get(gpu) or table.get(None) or Noise(DEFAULT_SIGMA, 0, f"default {DEFAULT_SIGMA:.1%}: no history")
    runs = repeat_sigma(sample_sets)
    if runs and runs[0] > hist.sigma:
        return Noise(runs[0], runs[1], f"the spread of these runs' repeats ({runs[1]} degrees of freedom)")
    return hist


def compare(record: BenchRecord, baseline: Baseline | None,
            history_noise: dict[str, dict] | None = None, history: pd.DataFrame | None = None) -> Comparison:
    """Verdicts of ``record``: its output by the lab's one rule, its speed against ``baseline``.

    Output: what ``rwkvlab bench`` says of the same run (:func:`rwkvlab.bench.judge`'s rule,
    ``rwkvlab.verdicts.judge_new``): the quality hash against the earliest run in ``history``
    (the panel passes the history and this session's unsaved runs) with the same model content,
    prompt and generation lengths; "first run" when there is none. Speed (load, prefill,
    generation): ``rwkvlab.verdicts.judge`` of this run's median against the chosen baseline's,
    with the noise of :func:`speed_noise`; "not comparable" when the baseline ran another model
    file or GPU, and a run whose output changed has its speed flagged (a speed reached with wrong
    output is not a speed-up). Logits: max |logit error| against the NumPy reference, within
    bench's tolerance ("ok"), beyond it ("too large"), or "not checked".
    """
    comparable = baseline is not None and baseline.model == record.model
    same_gpu = comparable and baseline.gpu == record.gpu

    output = Check(*bench.judge_output(record, history if history is not None else pd.DataFrame())[:2])
    if not record.consistent:
        output = Check(output.verdict, output.reason + "; the timed generations did not all give the "
                                                       "same tokens: the engine is not deterministic")

    if record.logit_error is None:
        logits = Check("not checked", "not checked against the NumPy reference (reference check off)")
    elif record.logit_ok:
        logits = Check("ok", f"max |logit error| {record.logit_error:.3g} vs the NumPy reference "
                             f"({record.reference}), within tolerance {record.logit_tolerance:g}")
    else:
        logits = Check("too large", f"LOGIT ERROR {record.logit_error:.3g} vs the NumPy reference exceeds "
                                    f"tolerance {record.logit_tolerance:g}: the output is wrong")

    samples_now = {"prefill_tps": record.prefill_tps_samples, "generation_tps": record.generation_tps_samples}
    speed: dict[str, Check] = {}
    for name, (column, sign, unit) in RUN_METRICS.items():
        new = float(getattr(record, column))
        old = baseline.value(column) if baseline is not None else None
        if baseline is None:
            speed[name] = Check("no baseline", "no baseline run")
        elif not same_gpu:
            speed[name] = Check("not comparable", f"the baseline ran {baseline.model} on {baseline.gpu}; "
                                                  f"this run {record.model} on {record.gpu}")
        elif old is None or old <= 0:
            speed[name] = Check("no reference", f"the baseline has no {column} value")
        else:
            sets = [s for s in (samples_now.get(column), baseline.samples.get(column)) if s]
            noise = speed_noise(column, record.gpu, history_noise, sets)
            verdict, delta, band = judge(new, [old], sign, noise.sigma)
            reason = (f"{delta:+.1%} vs {old:.2f} {unit}; noise band ±{band:.1%} "
                      f"(sigma {noise.sigma:.2%} from {noise.source})")
            if output.verdict == "changed":
                reason += "; output changed, so this speed does not count"
            speed[name] = Check(verdict, reason, delta, band)

    return Comparison(baseline, speed, output, logits, _result_table(record, baseline, speed, output, logits))


def _result_table(record: BenchRecord, baseline: Baseline | None, speed: dict[str, Check],
                  output: Check, logits: Check) -> pd.DataFrame:
    """This run beside its baseline, one row per quantity; cells are display text."""
    b = baseline
    o = record.options

    def num(value: float | None, digits: int = 2) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    def delta(check: Check) -> str:
        return "" if check.delta is None else f"{check.delta:+.1%}"

    rows = {
        "model": (record.model, b.model if b else "", "", ""),
        "GPU": (f"{record.gpu} ({record.adapter.get('backend', o.backend)})", b.gpu if b else "", "", ""),
        "options": (o.text(),
                    b.options if b else "", "", ""),
    }
    for name, (column, _, _) in RUN_METRICS.items():
        rows[SPEED_ROWS[name]] = (num(getattr(record, column)), num(b.value(column)) if b else "",
                                  delta(speed[name]), speed[name].verdict)
    rows["dispatches/token"] = (
        "" if record.dispatches_per_token is None else str(record.dispatches_per_token),
        "" if b is None or b.dispatches_per_token is None else str(b.dispatches_per_token), "", "")
    rows["quality hash"] = (record.quality_hash, (b.quality_hash or "") if b else "", "", output.verdict)
    rows["logit error"] = ("not checked" if record.logit_error is None else f"{record.logit_error:.3g}",
                           "" if b is None or b.logit_error is None else f"{b.logit_error:.3g}",
                           f"tolerance {record.logit_tolerance:g}", logits.verdict)
    return pd.DataFrame.from_dict(rows, orient="index", columns=["this run", "baseline", "change", "verdict"])


def result_html(comparison: Comparison, run_number: int) -> str:
    """The result table and the reasons as HTML (verdicts coloured: red = wrong output)."""
    table = comparison.table
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ("", *table.columns))
    reasons = {SPEED_ROWS[k]: v for k, v in comparison.speed.items()}
    reasons.update({"quality hash": comparison.output, "logit error": comparison.logits})
    body = []
    for metric, row in table.iterrows():
        check = reasons.get(metric)
        tip = html.escape(check.reason, quote=True) if check else ""
        cells = [f"<th style='text-align:left'>{html.escape(metric)}</th>"]
        for column, value in row.items():
            style = "padding:2px 8px;"
            if column == "verdict" and value:
                style += f"color:{VERDICT_COLOURS.get(value, '#333')};font-weight:bold;"
            cells.append(f"<td style='{style}' title='{tip}'>{html.escape(str(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    notes = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in comparison.reasons.items())
    base = comparison.baseline.label if comparison.baseline else "none"
    return (f"<div class='rwkvlab-result-table' data-run='{run_number}'>"
            f"<div><b>Run {run_number}</b> against baseline: {html.escape(base)}</div>"
            f"<table style='border-collapse:collapse;font-size:12px'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>"
            f"<details><summary>why</summary><ul style='font-size:11px'>{notes}</ul></details></div>")


