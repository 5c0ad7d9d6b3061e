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
# # Fusion lab: fewer dispatches, faster, and still the same output?
#
# A *fusion* rewrites the engine's kernel plan: several dispatches become one kernel that does
# the same arithmetic. Each fusion keeps its unfused equivalent, so the question is always the
# same: did it get faster, and is the output still right?
#
# 1. **The panel**: pick a model, weight policy, kernel path, backend and fusions, press
#    **Run**. Each run is a fresh worker process (`rwkvlab bench --json --no-save`), so a GPU
#    driver crash costs that run, never this kernel. The result table shows the run beside its
#    baseline (by default the latest earlier run of the same model on the same GPU) with the
#    verdicts: faster or slower beyond noise, output the same or changed, logit error against
#    the NumPy reference. The star lands on the history plot; **Save to history** appends it.
# 2. **Fusions on vs off**: the same panel driven from code, one run per fusion.
# 3. **Where the time goes**: the GPU time of every kernel of one generation step.

# %%
# Figures are stored as plotly's JSON (a few kB each; JupyterLab draws them with its own
# plotly.js). `rwkvlab report --notebooks` turns them into offline HTML with plotly.js once.
import plotly.io as pio

pio.renderers.default = "plotly_mimetype"

import plotly.graph_objects as go

from rwkvlab import plots
from rwkvlab.lab import Panel, prepare_kernel
from rwkvlab.options import FUSIONS

prepare_kernel()  # keeps Mesa's adapter-scan noise out of cell outputs (see its docstring)

# %%
# NBVAL_IGNORE_OUTPUT
# The engine's fusions and what each replaces (the list grows as kernels are added).
for name, what in FUSIONS.items():
    print(f"{name:<11} {what}")

# %% [markdown]
# ## The panel

# %%
# NBVAL_IGNORE_OUTPUT
# A live widget: its ids and this machine's adapter names differ from run to run.
panel = Panel()
panel

# %% [markdown]
# ## Fusions on vs off
# One run with no fusion, one per fusion, one with all of them, each compared with the
# unfused run (the panel's baseline `session:1`). Short lengths keep this quick on a software
# GPU; on a real one, use the panel's defaults (128 prompt tokens, 64 generated, 3 repeats).

# %%
configs = {"none": "none", **{name: [name] for name in FUSIONS}, "all": "all"}
panel.configure(model="tiny", fmt="f32", path="webgpu", weights="native", backend="auto",
                prefill=32, generate=32, warmup=1, repeat=3, baseline="none")
for label, fusions in configs.items():
    panel.configure(fusions=fusions)
    panel.run()
    panel.configure(baseline="session:1")  # every later run against the unfused one
runs = panel.session_table()
runs.index = list(configs)

# %%
# NBVAL_IGNORE_OUTPUT
# Speeds: the machine's, different on every run.
runs[["dispatches/token", "prefill tok/s", "generation tok/s", "generation verdict", "output", "logits"]].round(1)

# %%
# What must hold whatever fusions the engine has: each one reproduces the unfused tokens, keeps
# the logits within tolerance of the NumPy reference, and adds no dispatch; all together give
# the fewest.
unfused, fused = runs.loc["none"], runs.drop(index="none")
print("hash of the unfused plan:", unfused["quality hash"])
print("every fusion gives the same tokens:", bool((fused["output"] == "same").all()))
print("every run's logits within tolerance:", bool((runs["logits"] == "ok").all()))
print("no fusion adds dispatches:", bool((fused["dispatches/token"] <= unfused["dispatches/token"]).all()))
print("all fusions together give the fewest:", runs.loc["all", "dispatches/token"] == runs["dispatches/token"].min())

# %%
# NBVAL_IGNORE_OUTPUT
# Figure JSON is plotly-version specific and the bars are this machine's timings; the cell
# below prints what the figure draws.
fig = go.Figure([
    go.Bar(name=f"{metric} (tok/s)", x=runs.index, y=runs[f"{metric} tok/s"], text=runs[f"{metric} tok/s"].round(1))
    for metric in ("prefill", "generation")
])
fig.update_layout(title=dict(text=f"Fusions on vs off: {unfused['model']}",
                              subtitle=dict(text=f"on {panel.last_record.gpu}")), barmode="group",
                  yaxis_title="tok/s (median of the repeats)", xaxis_title="fusions", template="plotly_white",
                  height=420)
fig.show()

# %%
print(plots.describe(fig))

# %% [markdown]
# ## Where the time goes: per-kernel GPU time
# `rwkvlab.profile` writes a GPU timestamp before every dispatch of one generation step and
# reports microseconds per token for each kernel (summed over layers). Unfused and with every
# fusion, side by side: the fused kernels replace groups of the unfused ones.

# %%
import rwkvlab
from rwkvlab.options import Options
from rwkvlab.profile import profile

profiles = {}
for label, fusions in (("none", frozenset()), ("all", frozenset(FUSIONS))):
    engine = rwkvlab.load("tiny", Options(fusions=fusions), progress=False)
    profiles[label] = profile(engine, n_tokens=16)
    del engine

# %%
# NBVAL_IGNORE_OUTPUT
# Microseconds are the machine's.
for label, p in profiles.items():
    print(f"fusions {label}:", p.text(top=10), sep="\n", end="\n\n")

# %%
# NBVAL_IGNORE_OUTPUT
# Figure JSON is plotly-version specific; the cell below prints what the figure draws.
fig = go.Figure()
for label, p in profiles.items():
    if p.has_timestamps:
        t = p.table.sort_values("us_per_token")
        fig.add_trace(go.Bar(name=f"fusions {label}", y=t["kernel"] + " · " + t["label"], x=t["us_per_token"],
                             orientation="h"))
fig.update_layout(title="GPU time per generated token, per kernel (summed over layers)", barmode="group",
                  xaxis_title="µs per token", template="plotly_white", height=820, margin=dict(l=220))
fig.show()

# %%
for label, p in profiles.items():
    covered = (not p.has_timestamps) or int(p.table["calls"].sum()) == p.dispatches_per_token
    print(f"fusions {label}: the profile accounts for every dispatch of the step: {covered}")
print("fused step has fewer dispatches:", profiles["all"].dispatches_per_token < profiles["none"].dispatches_per_token)

# %% [markdown]
# ## Saving
# Nothing above was saved. In the panel, type a title and a change and press **Save to
# history** (or call `panel.save(title=..., change=...)`): the run is appended to
# `data/benchmarks/<gpu>.md` with every sample in the `.jsonl` beside it, and `01_history`
# and `rwkvlab report` will judge it with everything else.
#
# A static picture of the panel, for exported reports (the live panel needs a kernel):

# %%
# NBVAL_IGNORE_OUTPUT
# Timings and plotly figure JSON: different on every run.
panel.show_snapshot()
