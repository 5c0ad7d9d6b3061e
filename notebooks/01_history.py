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
# # Benchmark history: faster, and still right?
#
# This notebook reads the benchmark history in `data/benchmarks/` (Markdown run logs), judges
# every run, and plots it. Two questions per run:
#
# * **Is the output still right?** Each run records a *quality hash* of its first 32 greedy
#   tokens. A run whose hash differs from its model's baseline computed something else, so its
#   speed is not comparable: figures mark it with a red **X** ("output changed").
# * **Did it get faster?** Speeds are compared with the title's reference run and with the
#   recent history of the same model and GPU, against a noise band estimated from repeat runs.
#
# Every verdict comes with its reason; the figures' hover text names the change, title, time
# and hash of each point. Below each figure a short text summary says what it draws: that text
# is what the notebook test (nbval) checks, because plotly's figure JSON changes with every
# plotly release.

# %%
# Figures are stored as plotly's JSON (a few kB each; JupyterLab draws them with its own
# plotly.js). `rwkvlab report --notebooks` turns them into offline HTML with plotly.js once.
import plotly.io as pio

pio.renderers.default = "plotly_mimetype"

from pathlib import Path

import pandas as pd

from rwkvlab import plots
from rwkvlab.history import read_history
from rwkvlab.report import format_table, summarize, summary_text
from rwkvlab.verdicts import verdicts

# The four seed files: the M2 Max history of the project this lab grew from. They never change,
# so this notebook's checked outputs stay valid; the last section reads everything recorded since.
HISTORY = sorted(Path("../data/benchmarks").glob("m2max-*.md"))  # relative to this notebook

# %% [markdown]
# ## The runs
# One row per `###` entry of the history files, with its verdicts.

# %%
runs = read_history(HISTORY)
judged = verdicts(runs)
print(summary_text(summarize(runs, judged)))

# %%
print(format_table(runs, judged))

# %% [markdown]
# ## The verdicts in numbers
# `output`: *baseline* (the run the others are compared with), *same* or *changed* output, or
# *unknown* (no usable hash). Speed verdicts count only runs whose output did not change.

# %%
SPEED_ORDER = ["improvement", "within noise", "regression", "no reference"]
OUTPUT_ORDER = ["baseline", "same", "changed", "unknown"]

print(judged["output"].value_counts().reindex(OUTPUT_ORDER, fill_value=0).to_string())
print()
speed = pd.DataFrame({
    f"{metric} vs {ref}": judged[f"{metric}_vs_{ref}"].value_counts().reindex(SPEED_ORDER, fill_value=0)
    for ref in ("title", "history")
    for metric in ("prefill", "generation", "load")
})
print(speed.to_string())

# %% [markdown]
# ## Runs whose output changed
# Their speed numbers measure a different computation; the reason names the baseline they
# were compared with.

# %%
changed = runs[judged["output"] == "changed"]
for i, run in changed.iterrows():
    print(f"{run['file']}:{run['line']}  {run['title']!r}  {run['change']}")
    print(f"    {judged.at[i, 'output_reason']}")

# %% [markdown]
# ## Regressions and improvements
# Runs with unchanged output whose prefill or generation speed moved beyond noise against
# their history (load time has its own figure below).

# %%
for metric in ("prefill", "generation"):
    for verdict in ("regression", "improvement"):
        hits = judged.index[(judged[f"{metric}_vs_history"] == verdict) & (judged["output"] != "changed")]
        print(f"{metric} {verdict}: {len(hits)}")
        for i in hits:
            print(f"    {runs.at[i, 'file']}:{runs.at[i, 'line']}  {runs.at[i, 'change']}")
            print(f"        {judged.at[i, f'{metric}_vs_history_reason']}")

# %% [markdown]
# ## Speed over time
# Prefill and generation tok/s per history file. Red X: output changed. Black diamond: a
# detected change point in speed.

# %%
# NBVAL_IGNORE_OUTPUT
# Figure JSON is plotly-version specific, so nbval skips it; the cell below prints what the
# figure draws.
fig = plots.timeline(runs, judged)
fig.show()

# %%
print(plots.describe(fig))

# %% [markdown]
# ## Before and after, per title
# Each title's runs side by side, bars coloured by the verdict against the title's reference.

# %%
# NBVAL_IGNORE_OUTPUT
# Figure JSON is plotly-version specific; the cell below prints what the figure draws.
fig = plots.before_after(runs, judged)
fig.show()

# %%
print(plots.describe(fig))

# %% [markdown]
# ## Load time
# Load time depends mostly on the model file, so its spread is drawn per model.

# %%
# NBVAL_IGNORE_OUTPUT
# Figure JSON is plotly-version specific; the cell below prints what the figure draws.
fig = plots.load_spread(runs, by="model")
fig.show()

# %%
print(plots.describe(fig))
print()
print(runs.groupby("model")["load_ms"].describe()[["count", "min", "50%", "max"]].round(1).to_string())

# %% [markdown]
# ## Everything recorded since
# The same analysis over the whole folder, including runs this lab recorded (for example on an
# NVIDIA H100: `data/benchmarks/nvidia-*.md`). Its numbers grow with every saved run, so the test
# does not compare them.

# %%
# NBVAL_IGNORE_OUTPUT
all_runs = read_history(Path("../data/benchmarks"))
all_judged = verdicts(all_runs)
print(summary_text(summarize(all_runs, all_judged)))
recent = all_runs[~all_runs["file"].str.startswith("m2max-")]
print(format_table(recent, all_judged.loc[recent.index]))
