# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Weight formats: what each costs in speed and in accuracy
#
# The same synthetic tiny RWKV-7 (same random weights, seed 0) written in every GGUF format the
# lab knows, from full f32 down to 4-bit blocks. For each file:
#
# * **what the GPU really reads**: the engine keeps a tensor in its file format when its
#   kernels can decode it, and otherwise dequantizes it to f16 at load, with a warning
#   (`Engine.weight_formats` records the choice, so a benchmark never claims a format it did not
#   run);
# * **kernel error**: max |logit difference| against the NumPy reference run on the *same file's*
#   dequantized weights. This checks the kernels: it must stay within bench's tolerance (1e-3
#   when the GPU reads every tensor as stored, 0.05 after rounding to f16 at load);
# * **format error**: max |logit difference| between the NumPy reference on this file and on the
#   f32 file (float64, no GPU involved): what the format itself costs;
# * **speed**: prefill and generation tok/s (timings vary by machine: those cells are not
#   compared by the notebook test).

# %%
# Figures are stored as plotly's JSON (a few kB each; JupyterLab draws them with its own
# plotly.js). `rwkvlab report --notebooks` turns them into offline HTML with plotly.js once.
import plotly.io as pio

pio.renderers.default = "plotly_mimetype"

import warnings
from collections import Counter

import numpy as np
import pandas as pd
import plotly.graph_objects as go

import rwkvlab
from rwkvlab import plots
from rwkvlab.bench import BenchSettings, prompt_tokens, run_bench
from rwkvlab.synth import FORMATS as SYNTH_FORMATS
from rwkvlab.gguf import read_model
from rwkvlab.lab import prepare_kernel
from rwkvlab.reference import Reference
from rwkvlab.synth import default_model_path
from rwkvlab.tokenizer import Tokenizer

prepare_kernel()  # keeps Mesa's adapter-scan noise out of cell outputs (see its docstring)
SETTINGS = BenchSettings(prefill=32, generate=16, warmup=1, repeat=3, progress=False)


def mix(types) -> str:
    """'Q4_K x 10, F32 x 31': how many tensors have each type, most common first."""
    return ", ".join(f"{t} x {n}" for t, n in Counter(types).most_common())


# %%
rows, notes, reference_logits = [], [], {}
for fmt in SYNTH_FORMATS:
    path = default_model_path("tiny", fmt)
    model = read_model(path)
    prompt = prompt_tokens(Tokenizer.from_model(model), SETTINGS.prefill)
    reference_logits[fmt] = Reference(model).prefill(prompt).astype(np.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = rwkvlab.load(path, progress=False)
        gpu_reads = dict(engine.weight_formats)
        del engine
        record = run_bench(path, settings=SETTINGS)
    notes += [f"{fmt}: {w.message}" for w in caught if f"{fmt}: {w.message}" not in notes]
    # Matrices the engine uploads (layer 0's value-residual LoRA is in the file but unused).
    matrices = [name for name, t in model.tensors.items() if len(t.shape) == 2 and name in gpu_reads]
    rows.append({
        "format": fmt,
        "file size KiB": path.stat().st_size // 1024,
        "matrices in the file": mix(model.tensors[n].ggml_type for n in matrices),
        "matrices on the GPU": mix(gpu_reads[n] for n in matrices),
        "quality hash": record.quality_hash,
        "tokens": record.quality_tokens,
        "kernel error": record.logit_error,
        "tolerance": record.logit_tolerance,
        "prefill tok/s": record.prefill_tps,
        "generation tok/s": record.generation_tps,
    })
table = pd.DataFrame(rows).set_index("format")
f32 = reference_logits["f32"]
table["format error"] = [float(np.max(np.abs(reference_logits[f] - f32))) for f in table.index]
table["tokens same as f32"] = [sum(a == b for a, b in zip(t, table.at["f32", "tokens"])) for t in table["tokens"]]

# %% [markdown]
# ## What the engine read, and whether its output is right
# `tokens same as f32`: how many of the 32 greedy tokens after the prompt match the f32 file's.
# Random weights give nearly flat logits, so even bf16's rounding flips some greedy choices
# and the sequences then part ways; a trained model agrees far longer. The kernel error is the
# check that matters for the engine: each file's own weights, exactly decoded.

# %%
with pd.option_context("display.width", 200, "display.max_colwidth", 60):
    print(table[["file size KiB", "matrices in the file", "matrices on the GPU"]].to_string())
    print()
    checks = pd.DataFrame({
        "kernel error within tolerance": table["kernel error"] <= table["tolerance"],
        "tolerance": table["tolerance"],
        "format error": table["format error"].map(lambda e: f"{e:.2g}"),
        "tokens same as f32": table["tokens same as f32"].map(lambda n: f"{n}/32"),
        "quality hash": table["quality hash"],
    })
    print(checks.to_string())

# %%
print("formats the engine dequantized to f16 at load:")
for note in notes:
    print("  ", note)
if not notes:
    print("   none: its kernels read every format above as stored")

# %% [markdown]
# ## Speed per format
# On a real GPU generation is bound by memory bandwidth, so fewer bytes per weight should mean
# more tokens per second, as long as the kernels decode the blocks in place. On a software GPU
# (lavapipe) the numbers say more about the decoder's arithmetic than about bandwidth.

# %%
# NBVAL_IGNORE_OUTPUT
# Timings: the machine's, different on every run.
table[["kernel error", "format error", "prefill tok/s", "generation tok/s"]].round(
    {"prefill tok/s": 1, "generation tok/s": 1})

# %%
# NBVAL_IGNORE_OUTPUT
# Figure JSON is plotly-version specific and the bars are this machine's timings; the cell
# below prints what the figure draws.
fig = go.Figure([
    go.Bar(name=f"{m} (tok/s)", x=table.index, y=table[f"{m} tok/s"], text=table[f"{m} tok/s"].round(1))
    for m in ("prefill", "generation")
])
fig.update_layout(title="Speed per weight format (tiny synthetic model)", barmode="group",
                  xaxis_title="file format", yaxis_title="tok/s (median of the repeats)", template="plotly_white",
                  height=420)
fig.show()

# %%
print(plots.describe(fig))

# %%
# NBVAL_IGNORE_OUTPUT
# Figure JSON is plotly-version specific; the cell below prints what the figure draws.
fig = go.Figure(go.Bar(x=table.index[1:], y=table["format error"].iloc[1:], name="format error",
                       text=table["format error"].iloc[1:].map(lambda e: f"{e:.2g}")))
fig.update_layout(title="Accuracy cost of each format: max |logit difference| vs the f32 file (NumPy, float64)",
                  xaxis_title="file format", yaxis_title="max |logit difference|", yaxis_type="log",
                  template="plotly_white", height=380)
fig.show()

# %%
print(plots.describe(fig))
