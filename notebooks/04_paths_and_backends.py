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
# # Kernel paths and backends: same output everywhere?
#
# The engine has two kernel paths: **webgpu**, portable WGSL that any WebGPU implementation
# runs, and **native**, which also uses what the adapter offers beyond WebGPU (f16 arithmetic,
# subgroup operations). And wgpu can reach a GPU through several backends (Vulkan, Metal,
# DX12, OpenGL). Whatever the route, the greedy tokens must be the same and the logits must
# stay within tolerance of the NumPy reference; only the speed may differ.
#
# Every combination below runs as `rwkvlab bench` in its own process (`rwkvlab.sweep`): a fresh
# device each, and a driver crash would cost one row, not the notebook.

# %%
# Figures are stored as plotly's JSON (a few kB each; JupyterLab draws them with its own
# plotly.js). `rwkvlab report --notebooks` turns them into offline HTML with plotly.js once.
import plotly.io as pio

pio.renderers.default = "plotly_mimetype"

import pandas as pd
import plotly.graph_objects as go

from rwkvlab import plots
from rwkvlab.bench import BenchSettings
from rwkvlab.gpu import NATIVE_FEATURES, NoAdapterError, available_backends, list_adapters, resolve_options
from rwkvlab.lab import prepare_kernel
from rwkvlab.options import Options, OptionsError
from rwkvlab.sweep import run_sweep
from rwkvlab.synth import resolve_model

prepare_kernel()  # keeps Mesa's adapter-scan noise out of cell outputs (see its docstring)

# %% [markdown]
# ## Adapters on this machine

# %%
# NBVAL_IGNORE_OUTPUT
# Adapter names and driver versions are this machine's.
adapters = list_adapters()
for a in adapters:
    print(f"{a.backend:<7} {a.label}  [{a.description}]")
backends = [b for b in available_backends() if b != "auto"]
print("backends:", ", ".join(backends))

# %%
print("at least one WebGPU adapter:", bool(adapters))
print("every adapter's backend is offered:", sorted({a.backend for a in adapters}) == sorted(backends))

# %% [markdown]
# A backend the machine lacks is refused up front with what is available (here: Metal, which
# wgpu uses on Apple GPUs only).

# %%
# NBVAL_IGNORE_OUTPUT
# The message names this machine's system and backends.
try:
    resolve_options(Options(backend="metal"))
    print("metal is available here")
except (NoAdapterError, OptionsError) as err:
    print(err)

# %% [markdown]
# ## webgpu vs native, on every backend
# Short lengths keep this quick on a software GPU. Nothing is saved to the history.

# %%
# NBVAL_IGNORE_OUTPUT
# The sweep's log and summaries carry this machine's timings.
settings = BenchSettings(prefill=32, generate=32, warmup=1, repeat=3, progress=False)
sweep = run_sweep(resolve_model("tiny"), Options(), {"backend": backends, "path": ["webgpu", "native"]},
                  settings, save=False, timeout=600)
print(sweep.table())

# %%
rows = []
for row in sweep.rows:
    o = row.config.options
    rows.append({"backend": o.backend, "path": o.path, "ran": row.ran,
                 "quality hash": row.get("quality_hash"), "logits within tolerance": row.get("logit_ok"),
                 "output vs baseline": sweep.status(row),
                 "prefill tok/s": row.get("prefill_tps"), "generation tok/s": row.get("generation_tps")})
runs = pd.DataFrame(rows).set_index(["backend", "path"])
ran = runs[runs["ran"]]
# A configuration the adapter cannot run (the native path on an OpenGL adapter without f16 or
# subgroups, say) is refused before any GPU work, with what is available (bench's exit 2).
refused = [r for r in sweep.rows if not r.ran]
print("baseline:", sweep.baseline.config.label, "ran:", sweep.baseline.ran)
print("every configuration ran or was refused up front with a reason:",
      all(r.returncode == 2 and "available" in r.error for r in refused))
print("one quality hash wherever it ran:", ran["quality hash"].nunique() == 1, ran["quality hash"].iloc[0])
print("logits within tolerance wherever it ran:", bool(ran["logits within tolerance"].all()))

# %%
# NBVAL_IGNORE_OUTPUT
# Which configurations this machine refused, and the timings: this machine's.
print("the native path uses:", ", ".join(NATIVE_FEATURES))
for r in refused:
    print(f"refused: {r.config.label}: {r.error}")
runs[["output vs baseline", "prefill tok/s", "generation tok/s"]].round(1)

# %%
# NBVAL_IGNORE_OUTPUT
# Figure JSON is plotly-version specific and the bars are this machine's timings; the cell
# below prints what the figure draws.
labels = [f"{b} · {p}" for b, p in ran.index]
fig = go.Figure([go.Bar(name=f"{m} (tok/s)", x=labels, y=ran[f"{m} tok/s"], text=ran[f"{m} tok/s"].round(1))
                 for m in ("prefill", "generation")])
fig.update_layout(title="Speed per backend and kernel path (tiny synthetic model)", barmode="group",
                  xaxis_title="backend · path", yaxis_title="tok/s (median of the repeats)",
                  template="plotly_white", height=420)
fig.show()

# %%
print(plots.describe(fig).replace(f": {len(ran)} points", ": one point per configuration that ran"))
