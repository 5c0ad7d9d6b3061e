"""The README's speed table, made from the history: ``rwkvlab history --format speed-table``.

One row per (GPU, model file content, runtime, prompt length, generation length): the newest run of
the *default options* (``Options()`` resolved on the adapter: default fusions, chunk and
weights, the device's own tuning; any kernel path, since ``auto`` resolves per adapter), so the
table shows what a user gets without flags. Beside generation tok/s, the weight bandwidth it
implies: the bytes one generation step reads (``step_weight_bytes``, recorded by bench since
issue 14; older runs show "?") times tok/s, and its share of the GPU's memory bandwidth where
:data:`PEAK_BANDWIDTH` knows the GPU. The output verdict comes from the same rule as every
other view (:func:`rwkvlab.verdicts.verdicts`), so a run whose output changed says so here too;
"logits" is the recorded max |logit error| against the float64 reference, or "not checked".
"""
from __future__ import annotations

import math

import pandas as pd

from rwkvlab.options import RUNTIMES, OptionsError, from_record

# Peak memory bandwidth in bytes/s of the GPUs the lab has run on (vendor figures).
PEAK_BANDWIDTH = {"NVIDIA H200": 4.8e12, "NVIDIA H100 80GB HBM3": 3.35e12}

HEADER = ("| GPU | run (model file) | runtime | prompt / generated | generation tok/s | weights streamed | "
          "prefill tok/s | load | output | logits | commit |")


def _is_default(options: object) -> bool:
    """Whether a recorded options dict is Options() as resolved on some adapter."""
    if not isinstance(options, dict) or not options:
        return False
    try:
        o = from_record(options)
    except (OptionsError, TypeError, ValueError):
        return False
    return o.with_(path="auto", runtime="wgpu-native") == from_record({})


def speed_rows(df: pd.DataFrame, verdicts: pd.DataFrame) -> pd.DataFrame:
    """The newest default-options run per (GPU, model content, runtime, prompt, generated), with its
    output verdict; sorted by GPU, model, prompt length and runtime (in RUNTIMES' order)."""
    runs = df.assign(output=verdicts["output"].to_numpy())
    runs = runs[runs["options"].map(_is_default) & runs["generation_tps"].notna()]
    if runs.empty:
        return runs
    runs = runs.assign(runtime=runs["options"].map(lambda o: o.get("runtime", "wgpu-native")),
                       content=runs["fingerprint"].where(runs["fingerprint"].notna(), runs["model"]))
    key = ["gpu", "content", "runtime", "prompt_tokens", "generate_tokens"]  # one file by content
    newest = runs.sort_values("timestamp", kind="stable").groupby(key, dropna=False, sort=False).tail(1)
    order = newest["runtime"].map(lambda r: RUNTIMES.index(r) if r in RUNTIMES else len(RUNTIMES))
    return (newest.assign(_order=order)
            .sort_values(["gpu", "model", "prompt_tokens", "_order"], kind="stable", ignore_index=True)
            .drop(columns="_order"))


def _count(value: object) -> str:
    return "?" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{int(value)}"


def _bandwidth(row: pd.Series) -> str:
    weight_bytes = row.get("step_weight_bytes")
    if weight_bytes is None or pd.isna(weight_bytes):
        return "?"
    rate = float(weight_bytes) * float(row["generation_tps"])
    peak = PEAK_BANDWIDTH.get(str(row["gpu"]))
    return f"{rate / 1e12:.2f} TB/s" + (f" ({rate / peak:.0%})" if peak else "")


def speed_table(df: pd.DataFrame, verdicts: pd.DataFrame) -> str:
    """The table as Markdown (a header line and a note when no run qualifies)."""
    rows = speed_rows(df, verdicts)
    lines = [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    for _, r in rows.iterrows():
        commit = r.get("commit")
        commit = "" if commit is None or pd.isna(commit) else str(commit)
        error = r.get("logit_error")
        logits = "not checked" if error is None or pd.isna(error) else f"{float(error):.2g}"
        lines.append(
            f"| {r['gpu']} | {r['title']} ({r['model']}) | {r['runtime']} | {_count(r['prompt_tokens'])} / "
            f"{_count(r['generate_tokens'])} | **{r['generation_tps']:,.1f}** | {_bandwidth(r)} | "
            f"{r['prefill_tps']:,.0f} | {r['load_ms'] / 1000:.1f} s | {r['output']} | {logits} | {commit} |")
    if rows.empty:
        lines.append("| (no run with the default options in these files) |" + " |" * HEADER.count(" | "))
    return "\n".join(lines)
