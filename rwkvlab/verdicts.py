"""Verdicts on a benchmark history: did the output change, and did a speed change beyond noise?

Input is :func:`rwkvlab.history.read_history`'s DataFrame; :func:`verdicts` returns a frame
with the same index. Every verdict comes with a reason string that names what it compared.

This module is the one verdict rule of the lab: ``rwkvlab bench``, the panel, ``rwkvlab
history``, reports, sweeps and ``rwkvlab compare`` all ask it (a run not yet saved is judged
with :func:`judge_new`, as if appended to the history).

Output (``output``, ``output_reason``)
    The quality hash covers the first 32 greedy tokens after the prompt, so equal hashes mean
    equal output for the same model and prompt. Runs are grouped by their *output key*: the
    model (its content fingerprint where the run recorded one, else its file name), the prompt
    length and the generation length (from the sidecar; unknown for the seed files' runs, which
    then group by model alone). Each group has one baseline run: the earliest run filed under a
    ``##`` title containing "Baseline" when there is one, since that is the author saying "this
    is the reference state", else the group's earliest run. Other runs are "same" or "changed"
    against it; runs without a hash or model are "unknown". The groups span history files: a
    per-file baseline would let a file that starts with a broken run bless it. GPUs share the
    baseline too: greedy tokens should not depend on the GPU, and when they do (float rounding
    flipping an argmax) that is worth seeing; the reason names the baseline's file.

Speed (``{m}_vs_title``, ``{m}_vs_history`` for m in ``METRICS``: prefill, generation, load,
and the micro-benchmarks' bandwidth, throughput and kernel_time)
    Each run's value is compared with the median of a reference set of earlier runs with the
    same *speed key*: output key, GPU, and the options that change the work itself rather than
    how it is done, the weight policy (f16 at load reads other bytes) and the backend; load
    time is better when lower, throughput when higher. Fusions, kernel path, chunk and tuning
    are what experiments vary, so runs differing in them are compared: that is the question.
    ``vs_title``: earlier runs under the same ``##`` title of the same file (the before/after
    workflow). ``vs_history``: the earlier runs of the current regime of the speed-key
    series, i.e. those since the last change point before this run (at most
    ``HISTORY_WINDOW``). Runs whose output changed are never part of a reference or of the
    series: a speed reached with wrong output is not a state anyone can keep, and measuring a
    correct run against it would call it a regression. Those runs still get verdicts (against
    correct runs), with the reason flagging that their speed does not count.
    Delta ``d = value / reference - 1``; with ``k`` reference runs the noise band is
    ``Z * sigma * sqrt(1 + 1/k)`` (the spread of one run around the mean of ``k``): inside it
    the verdict is "within noise", outside it "improvement" or "regression".
    A micro-benchmark run's model names the kernel and the problem (e.g. "matvec Q8_0
    2560x2560", "gemm F16 ffn.key 10240x2560 T=512"), so its speed key is that problem on one
    GPU and backend, and its kernel path and tuning (in its change text) are compared like
    an engine run's. It has no quality hash (its check against NumPy is a row of its own, and
    a failed check is never recorded), so its output is "unknown" and its speed counts.

Noise (``sigma``, relative standard deviation of one run)
    Estimated from the history itself. Runs of one setup (same model, GPU, change text and
    quality hash: e.g. the seeds' "Testing Metal V7" x9 or "No fusion" under "Baseline 1/2/3")
    are taken in time order and the relative differences of consecutive ones collected.
    ``sigma = median(|d|) / 0.6745 / sqrt(2)``: the median absolute deviation about zero
    (repeats of one setup differ by zero on average, so centring on a sample median would only
    add error), scaled to a normal standard deviation, divided by sqrt(2) because a difference
    of two runs carries the noise of both. The median ignores the occasional wild repeat (the
    seeds hold a 10% one). Per GPU when that GPU has ``MIN_PAIRS`` pairs, else pooled over all
    GPUs, else ``DEFAULT_SIGMA``; never below ``SIGMA_FLOOR``.
    On the seeds (M2 Max, 25 pairs): prefill 0.37%, generation 0.44%, load 2.0%.
    Mann-Whitney U on per-repeat samples is not used: with 3 samples a side its smallest
    possible p-value is 0.1, so it can never confirm anything at this sample size.

Change points (``{m}_change_point``)
    Found with Pelt (ruptures' recursion, vectorised here) on the log of each speed-key
    series (correct-output runs, time order), L1 cost (a median fit, as asv's step detection,
    so one wild run does not become a step), segments of at least 2 runs (a step must persist:
    the newest run becomes a change point once the next run confirms it), penalty
    ``sigma * (4 + 2 ln n)`` (grows with n like BIC). In simulation (Gaussian noise, sigma
    0.4%, one fit per series, ruptures) it flagged nothing in 520 pure-noise series of 30 to
    300 runs, found a 4-sigma step halfway through a series at the right run in 94% of cases
    (within one run: over 99%), and a step seen by only the last two runs once it is 8 sigma
    or more. Series longer than ``PELT_WINDOW`` runs are fitted in overlapping windows of that
    many runs, each deciding its middle half with the whole series' penalty: one fit costs
    O(n^2) segment medians, which a lab with thousands of runs per series cannot wait for.
    A change point's history verdict judges the step between the
    medians of the regimes before and after it.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = [
    "DEFAULT_SIGMA", "HISTORY_WINDOW", "METRICS", "MICRO_METRICS", "MIN_PAIRS", "PELT_WINDOW", "RUN_METRICS", "SIGMA_FLOOR", "Z",
    "GATES", "Noise", "change_points", "describe_key", "estimate_noise", "gate_failures", "judge", "judge_new",
    "output_verdicts", "speed_keys", "verdicts",
]

# metric name -> (column, +1 when higher is better / -1 when lower is better, unit)
# What `rwkvlab bench` measures: every engine run has these three.
RUN_METRICS = {
    "prefill": ("prefill_tps", +1, "tok/s"),
    "generation": ("generation_tps", +1, "tok/s"),
    "load": ("load_ms", -1, "ms"),
}
# The figures of the micro-benchmarks (rwkvlab.micro_records: kernel_bench, gemm_bench,
# wkv_bench), read from their runs' extra metric rows. A run has at most one of them; the
# others are missing there, as these are in engine runs, and a missing value is never judged.
MICRO_METRICS = {
    "bandwidth": ("bandwidth", +1, "GB/s"),
    "throughput": ("throughput", +1, "TFLOP/s"),
    "kernel_time": ("kernel_time", -1, "us"),
}
METRICS = {**RUN_METRICS, **MICRO_METRICS}
Z = 3.0  # band half-width in standard deviations: ~0.3% false alarms per comparison
MIN_PAIRS = 5  # repeat pairs needed before a noise estimate is trusted
DEFAULT_SIGMA = 0.02  # a cautious 2% until the history holds repeats
SIGMA_FLOOR = 0.0025  # timings quoted to 2 decimals and a few pairs cannot support finer claims
HISTORY_WINDOW = 10  # most recent runs of the regime that form the history reference
PELT_WINDOW = 128  # longer series are segmented in overlapping windows of this many runs

_BASELINE_WORD = "baseline"


@dataclass(frozen=True)
class Noise:
    """Relative noise of one run of a metric, and where the estimate came from."""

    sigma: float
    pairs: int
    source: str  # e.g. "12 repeat pairs on Apple M2 Max"


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

def verdicts(df: pd.DataFrame) -> pd.DataFrame:
    """Output and speed verdicts for every run of ``df`` (same index), each with its reason.

    Columns: ``output``, ``output_reason``, then for each m in :data:`METRICS` (prefill,
    generation, load, bandwidth, throughput, kernel_time; a run without m's value gets "no
    reference" for it, whether or not the frame has m's column):
    ``{m}_vs_title``, ``{m}_vs_title_reason``, ``{m}_vs_history``, ``{m}_vs_history_reason``
    (verdicts: "improvement", "regression", "within noise", "no reference") and the boolean
    ``{m}_change_point``. The method is described in this module's docstring.
    """
    runs = df.reset_index(drop=True)
    order = _chronological(runs)
    cols = _Columns.of(runs)
    out = pd.DataFrame(index=runs.index)
    out["output"], out["output_reason"] = _output_verdicts(cols, order)
    usable = (out["output"] != "changed").to_numpy()
    for name, (column, sign, unit) in METRICS.items():
        values = (runs[column].to_numpy(dtype=float) if column in runs.columns
                  else np.full(len(runs), np.nan))
        if not (values > 0).any():
            # No run has this figure (an engine-only history has no micro-benchmark figure):
            # what the comparisons below would say of every run, without their loops.
            for reference in ("title", "history"):
                out[f"{name}_vs_{reference}"] = "no reference"
                out[f"{name}_vs_{reference}_reason"] = f"no {column} value in this run"
            out[f"{name}_change_point"] = False
            continue
        noise = estimate_noise(runs, column)
        cp = np.zeros(len(runs), dtype=bool)
        segment = np.full(len(runs), -1)
        for idx in _series(cols, order, usable, values):
            sigma = _noise_for(noise, cols.gpu[idx[0]]).sigma
            flags = change_points(values[idx], sigma)
            cp[idx] = flags
            segment[idx] = np.cumsum(flags)
        title = _compare_vs_title(cols, order, usable, values, column, sign, unit, noise)
        history = _compare_vs_history(cols, order, usable, values, column, sign, unit, noise, cp, segment)
        out[f"{name}_vs_title"], out[f"{name}_vs_title_reason"] = title
        out[f"{name}_vs_history"], out[f"{name}_vs_history_reason"] = history
        out[f"{name}_change_point"] = cp
    out.index = df.index
    return out


def judge_new(history: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """Verdicts of the runs in ``new`` (same columns as :func:`rwkvlab.history.read_history`'s,
    e.g. :func:`rwkvlab.history.frame_of_run`) as if appended to ``history``: the rule
    :func:`verdicts` applies to saved runs, applied before saving. Index: ``new``'s."""
    both = pd.concat([history, new], ignore_index=True) if len(history) else new.reset_index(drop=True)
    judged = verdicts(both).iloc[len(both) - len(new):]
    judged.index = new.index
    return judged


def speed_keys(df: pd.DataFrame) -> list[tuple]:
    """Each run's speed key (module docstring): runs with equal keys are compared for speed."""
    return _Columns.of(df.reset_index(drop=True)).speed_key


# What `--fail-on` can name, and the verdict columns each one reads.
GATES = {
    "output": ("output",),
    "regression": tuple(f"{m}_vs_{ref}" for m in METRICS for ref in ("title", "history")),
}


def gate_failures(judged: pd.Series, gates: set[str]) -> list[str]:
    """Why one judged run (a row of :func:`verdicts` / :func:`judge_new`) fails the gates named
    in ``gates`` ("output": its output changed; "regression": a speed regressed beyond noise
    against its title or its history); empty when it passes."""
    unknown = sorted(set(gates) - set(GATES))
    if unknown:
        raise ValueError(f"unknown gate(s) {unknown}; available: {', '.join(GATES)}")
    failed = []
    if "output" in gates and judged["output"] == "changed":
        failed.append(f"output changed: {judged['output_reason']}")
    if "regression" in gates:
        for column in GATES["regression"]:
            if judged[column] == "regression":
                failed.append(f"{column.replace('_vs_', ' vs ')} regression: {judged[column + '_reason']}")
    return failed


@dataclass
class _Columns:
    """The columns verdicts read, as plain lists and masks, taken from the frame once.

    Looking values up with ``DataFrame.at`` inside the per-run loops copied the frame's
    ``attrs`` on every call; with the loops over earlier runs that made 2,000 runs take 50 s.
    """

    file: list
    title: list
    model: list  # values as read (missing: NaN)
    gpu: list
    quality_hash: list
    line: list
    timestamp: list
    no_time: np.ndarray
    no_model: np.ndarray
    no_hash: np.ndarray
    output_key: list  # (model identity, prompt tokens, generated tokens): see the module docstring
    speed_key: list  # output key + GPU, weight policy and backend
    labels: dict

    @classmethod
    def of(cls, runs: pd.DataFrame) -> "_Columns":
        model, gpu = runs["model"].tolist(), runs["gpu"].tolist()
        n = len(runs)

        def column(name: str, default) -> list:
            return runs[name].tolist() if name in runs.columns else [default] * n

        output_key = [describe_key(m, f, p, g) for m, f, p, g in zip(
            model, column("fingerprint", None), column("prompt_tokens", None), column("generate_tokens", None))]
        options = column("options", {})
        speed_key = [(*k, str(g), str(o.get("weights", "?")) if isinstance(o, dict) else "?",
                      str(o.get("backend", "?")) if isinstance(o, dict) else "?")
                     for k, g, o in zip(output_key, gpu, options)]
        return cls(
            file=runs["file"].tolist(), title=runs["title"].tolist(), model=model, gpu=gpu,
            quality_hash=runs["quality_hash"].tolist(), line=runs["line"].tolist(),
            timestamp=runs["timestamp"].tolist(), no_time=runs["timestamp"].isna().to_numpy(),
            no_model=runs["model"].isna().to_numpy(), no_hash=runs["quality_hash"].isna().to_numpy(),
            output_key=output_key, speed_key=speed_key, labels={},
        )

    def label(self, i: int) -> str:
        """How a reason names a run: file, title, timestamp."""
        if i not in self.labels:
            stamp = "no timestamp" if self.no_time[i] else self.timestamp[i].strftime("%Y-%m-%d %H:%M:%S")
            where = f"line {self.line[i]}" if self.line[i] else "not saved"
            self.labels[i] = f"{self.file[i]} '{self.title[i]}' {stamp} ({where})"
        return self.labels[i]


def describe_key(model, fingerprint, prompt_tokens, generate_tokens) -> tuple[str, str, str]:
    """A run's output key as text: (model identity, prompt length, generation length); "?" for
    what the run did not record. The identity is the fingerprint where there is one."""
    def known(value) -> bool:
        return value is not None and not (isinstance(value, float) and math.isnan(value)) and value is not pd.NA \
            and str(value) not in ("", "nan", "<NA>")

    identity = f"#{fingerprint}" if known(fingerprint) else str(model)
    return (identity, str(int(prompt_tokens)) if known(prompt_tokens) else "?",
            str(int(generate_tokens)) if known(generate_tokens) else "?")


def _key_text(key: tuple, model: object) -> str:
    """How a reason names a group: the model (and its content), then the lengths it recorded."""
    identity, prompt, generate = key[:3]
    name = f"{model} (content {identity[1:]})" if identity.startswith("#") else identity
    lengths = "" if (prompt, generate) == ("?", "?") else f", prompt {prompt} / generate {generate} tokens"
    return name + lengths


def _chronological(runs: pd.DataFrame) -> list[int]:
    """Row positions in time order; equal or missing timestamps keep their file order."""
    keyed = pd.DataFrame({"t": runs["timestamp"], "pos": np.arange(len(runs))})
    return keyed.sort_values(["t", "pos"], na_position="last", kind="stable")["pos"].tolist()



# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def output_verdicts(df: pd.DataFrame) -> tuple[list[str], list[str]]:
    """``output`` ("baseline" | "same" | "changed" | "unknown") and its reason for every row."""
    runs = df.reset_index(drop=True)
    return _output_verdicts(_Columns.of(runs), _chronological(runs))


def _output_verdicts(c: _Columns, order: list[int]) -> tuple[list[str], list[str]]:
    baselines = _baselines(c, order)
    verdict, reason = [], []
    for i in range(len(c.file)):
        h = c.quality_hash[i]
        if c.no_hash[i] or c.no_model[i]:
            verdict.append("unknown")
            reason.append("no quality hash recorded" if c.no_hash[i] else "no model recorded, so no baseline")
            continue
        b, why = baselines[c.output_key[i]]
        h0 = c.quality_hash[b]
        if i == b:
            verdict.append("baseline")
            reason.append(f"baseline of {_key_text(c.output_key[i], c.model[i])}: {why}; hash {h}")
        elif h == h0:
            verdict.append("same")
            reason.append(f"hash {h} equals hash {h0} of baseline {c.label(b)}")
        else:
            verdict.append("changed")
            reason.append(f"hash {h} differs from hash {h0} of baseline {c.label(b)}")
    return verdict, reason


def _baselines(c: _Columns, order: list[int]) -> dict[tuple, tuple[int, str]]:
    """Per output key: the baseline row position and why it was chosen."""
    chosen: dict[tuple, tuple[int, str]] = {}
    fallback: dict[tuple, int] = {}
    for i in order:
        if c.no_model[i] or c.no_hash[i]:
            continue
        model = c.output_key[i]
        fallback.setdefault(model, i)
        if model not in chosen and _BASELINE_WORD in str(c.title[i]).lower():
            chosen[model] = (i, f"its earliest run under a title containing 'Baseline', {c.label(i)}")
    for model, i in fallback.items():
        chosen.setdefault(model, (i, f"its earliest run (no title names a baseline), {c.label(i)}"))
    return chosen


# --------------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------------

def estimate_noise(df: pd.DataFrame, column: str) -> dict[str | None, Noise]:
    """Relative noise of ``column`` per GPU (key: GPU name) and pooled (key: None).

    See the module docstring for the estimator; GPUs with too few repeat pairs are absent
    (callers fall back to the pooled entry, which itself falls back to ``DEFAULT_SIGMA``).
    """
    runs = df.reset_index(drop=True)
    if column not in runs.columns:  # a figure no run of this history has: no repeats either
        runs = runs.assign(**{column: np.nan})
    order = _chronological(runs)
    ranked = runs.iloc[order]
    diffs: dict[str, list[float]] = {}
    setup = ["model", "gpu", "change", "quality_hash"]
    for _, group in ranked.groupby(setup, sort=False, dropna=False):
        values = group[column].to_numpy(dtype=float)
        values = values[np.isfinite(values) & (values > 0)]
        if len(values) > 1:
            gpu = str(group["gpu"].iloc[0])
            diffs.setdefault(gpu, []).extend(values[1:] / values[:-1] - 1.0)
    noise: dict[str | None, Noise] = {}
    for gpu, d in diffs.items():
        if len(d) >= MIN_PAIRS:
            noise[gpu] = Noise(_sigma(d), len(d), f"{len(d)} repeat pairs on {gpu}")
    pooled = [x for d in diffs.values() for x in d]
    if len(pooled) >= MIN_PAIRS:
        noise[None] = Noise(_sigma(pooled), len(pooled), f"{len(pooled)} repeat pairs, all GPUs")
    else:
        noise[None] = Noise(DEFAULT_SIGMA, len(pooled),
                            f"default {DEFAULT_SIGMA:.1%}: only {len(pooled)} repeat pairs")
    return noise


def _sigma(relative_diffs: list[float]) -> float:
    """Standard deviation of one run from differences of consecutive repeats (MAD about zero)."""
    mad = float(np.median(np.abs(relative_diffs)))
    return max(mad / 0.6745 / math.sqrt(2.0), SIGMA_FLOOR)


def _noise_for(noise: dict[str | None, Noise], gpu: object) -> Noise:
    return noise.get(str(gpu), noise[None])


# --------------------------------------------------------------------------------------------
# Change points
# --------------------------------------------------------------------------------------------

def change_points(values: np.ndarray, sigma: float) -> np.ndarray:
    """Boolean per value: True where a new level starts (see the module docstring).

    ``values`` is one time-ordered series of positive measurements; ``sigma`` its relative noise.
    """
    n = len(values)
    flags = np.zeros(n, dtype=bool)
    if n < 4:  # two segments of two runs is the smallest series with a step
        return flags
    signal = np.log(np.asarray(values, dtype=float))
    penalty = max(sigma, SIGMA_FLOOR) * (4.0 + 2.0 * math.log(n))
    if n <= PELT_WINDOW:
        flags[[e for e in _pelt_l1(signal, penalty) if e < n]] = True
        return flags
    # Pelt costs O(n^2) segment medians on a series without steps, so a long series is cut
    # into overlapping windows; each window decides only its middle half, where it sees at
    # least PELT_WINDOW / 4 runs on either side. The penalty keeps the whole series' n, so
    # false alarms stay as rare as in one long fit.
    step, margin = PELT_WINDOW // 2, PELT_WINDOW // 4
    start = 0
    while True:
        stop = min(start + PELT_WINDOW, n)
        low = 0 if start == 0 else start + margin
        high = n if stop == n else stop - margin
        for end in _pelt_l1(signal[start:stop], penalty):
            if low <= start + end < high:
                flags[start + end] = True
        if stop == n:
            break
        start += step
    # Two windows may each flag one side of a seam; a level must last two runs.
    last = -2
    for k in np.flatnonzero(flags):
        if k - last < 2:
            flags[k] = False
        else:
            last = k
    return flags


def _l1_costs(x: np.ndarray) -> np.ndarray:
    """``cost[s, t]``: sum of |x - median| over ``x[s:t]`` (inf for fewer than two values).

    Computed for all segments of one length at a time, with the same NumPy reductions as
    ruptures' CostL1, so the results agree bit for bit (a test checks it against ruptures).
    """
    n = len(x)
    cost = np.full((n + 1, n + 1), np.inf)
    for length in range(2, n + 1):
        windows = np.lib.stride_tricks.sliding_window_view(x, length)
        # np.median's own result (middle value, or the mean of the middle two), without its
        # per-call overhead, which dominated: ~40,000 calls for a 10,000-run history.
        m = length // 2
        if length % 2:
            medians = np.partition(windows, m, axis=1)[:, m]
        else:
            middle = np.partition(windows, (m - 1, m), axis=1)
            medians = (middle[:, m - 1] + middle[:, m]) / 2.0
        starts = np.arange(n - length + 1)
        cost[starts, starts + length] = np.abs(windows - medians[:, None]).sum(axis=1)
    return cost


def _pelt_l1(x: np.ndarray, penalty: float) -> list[int]:
    """Segment ends of the optimal L1 segmentation (segments of 2 or more), last one ``len(x)``.

    The Pelt recursion of ruptures' ``Pelt(model="l1", min_size=2, jump=1)``, step for step
    (same candidate order, same ties, same pruning), vectorised over the candidates.
    """
    n = len(x)
    cost = _l1_costs(x)
    best = np.full(n + 1, np.inf)  # best[t]: penalised cost of the best segmentation of x[:t]
    best[0] = 0.0
    previous = np.zeros(n + 1, dtype=int)
    admissible = np.zeros(0, dtype=int)
    for t in range(2, n + 1):
        admissible = np.append(admissible, t - 2)
        admissible = admissible[np.isfinite(best[admissible])]  # x[:1] has no segmentation
        loss = best[admissible] + (cost[admissible, t] + penalty)
        k = int(np.argmin(loss))
        best[t], previous[t] = loss[k], admissible[k]
        admissible = admissible[loss <= best[t] + penalty]
    ends, t = [], n
    while t > 0:
        ends.append(t)
        t = int(previous[t])
    return sorted(ends)


def _series(c: _Columns, order: list[int], usable: np.ndarray, values: np.ndarray) -> list[list[int]]:
    """Row positions of each speed-key series in time order: correct output, timed, positive."""
    groups: dict[tuple, list[int]] = {}
    for i in order:
        if usable[i] and not c.no_time[i] and values[i] > 0:
            groups.setdefault(c.speed_key[i], []).append(i)
    return list(groups.values())


# --------------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------------

def judge(value: float, reference: list[float], sign: int, sigma: float, k_new: int = 1) -> tuple[str, float, float]:
    """Verdict of ``value`` against the median of ``reference``: (verdict, delta, band).

    ``delta`` is relative (``value / median - 1``); ``band`` is ``Z * sigma * sqrt(1/k_new + 1/k)``
    where ``value`` stands for ``k_new`` runs (1 for a single run, more for a regime median).
    ``sign`` is +1 when higher is better, -1 when lower is better.
    """
    return _judge_median(value, float(np.median(reference)), len(reference), sign, sigma, k_new)


def _judge_median(value: float, ref: float, k: int, sign: int, sigma: float, k_new: int = 1) -> tuple[str, float, float]:
    delta = value / ref - 1.0
    band = Z * sigma * math.sqrt(1.0 / k_new + 1.0 / k)
    if abs(delta) <= band:
        return "within noise", delta, band
    return ("improvement" if sign * delta > 0 else "regression"), delta, band


def _sorted_median(ordered: list[float]) -> float:
    # np.median's value on the same numbers: the middle one, or the mean of the middle two.
    m = len(ordered) // 2
    return ordered[m] if len(ordered) % 2 else (ordered[m - 1] + ordered[m]) / 2.0


def _describe(delta: float, band: float, ref: float, unit: str, noise: Noise) -> str:
    return (f"{delta:+.1%} vs {ref:.2f} {unit}; noise band ±{band:.1%} "
            f"(sigma {noise.sigma:.2%} from {noise.source}, z={Z:g})")


def _unusable_note(usable: bool) -> str:
    return "" if usable else "; output changed, so this speed does not count"


def _missing(c: _Columns, values: np.ndarray, i: int, column: str) -> str | None:
    """Why run ``i`` cannot be compared at all, or None."""
    if not values[i] > 0:  # also NaN
        return f"no {column} value in this run"
    if c.no_time[i]:
        return "no timestamp, so which runs came before is unknown"
    return None


def _compare_vs_title(c: _Columns, order, usable, values, column, sign, unit, noise) -> tuple[list[str], list[str]]:
    """Each run against the earlier correct runs under its title (same file and speed key)."""
    verdict = ["no reference"] * len(values)
    reason = [""] * len(values)
    # Per title key: the earlier usable runs (the first one, and their values kept sorted for
    # the median) and how many earlier runs were excluded for changed output.
    first: dict[tuple, int] = {}
    ordered: dict[tuple, list[float]] = {}
    excluded: dict[tuple, int] = {}
    for i in order:
        key = (str(c.file[i]), str(c.title[i]), c.speed_key[i])
        refs = ordered.setdefault(key, [])
        dropped = excluded.setdefault(key, 0)
        why = _missing(c, values, i, column)
        if why:
            reason[i] = why
            continue
        if not refs:
            reason[i] = (f"no earlier run of this model, GPU and lengths under '{c.title[i]}' in "
                         f"{c.file[i]}" + (f" with unchanged output ({dropped} changed excluded)" if dropped else ""))
        else:
            nz = _noise_for(noise, c.gpu[i])
            ref = _sorted_median(refs)
            verdict[i], delta, band = _judge_median(float(values[i]), ref, len(refs), sign, nz.sigma)
            reason[i] = (_describe(delta, band, ref, unit, nz)
                         + f"; reference: median of {len(refs)} earlier run(s) under '{c.title[i]}', "
                         f"first {c.label(first[key])}"
                         + (f"; {dropped} run(s) with changed output excluded" if dropped else ""))
        reason[i] += _unusable_note(usable[i])
        if usable[i]:
            first.setdefault(key, i)
            bisect.insort(refs, float(values[i]))
        else:
            excluded[key] = dropped + 1
    return verdict, reason


def _compare_vs_history(c: _Columns, order, usable, values, column, sign, unit, noise, cp, segment
                        ) -> tuple[list[str], list[str]]:
    """Each run against the current regime of its speed-key series, or, at a change point,
    the step between the regimes on either side (``segment``: regime number per series run)."""
    verdict = ["no reference"] * len(values)
    reason = [""] * len(values)
    series: dict[tuple, list[int]] = {}  # usable runs of each speed key seen so far, in time order
    members: dict[tuple, dict[int, list[int]]] = {}  # all series members per segment, for steps
    for i in order:
        if segment[i] >= 0:
            members.setdefault(c.speed_key[i], {}).setdefault(int(segment[i]), []).append(i)
    for i in order:
        key = c.speed_key[i]
        seen = series.setdefault(key, [])
        why = _missing(c, values, i, column)
        if why:
            reason[i] = why
            continue
        nz = _noise_for(noise, c.gpu[i])
        if not seen:
            reason[i] = f"no earlier run of {_key_text(key, c.model[i])} on {key[3]} with unchanged output"
        elif cp[i]:
            before = members[key][int(segment[i]) - 1][-HISTORY_WINDOW:]
            after = members[key][int(segment[i])]
            new = [float(values[j]) for j in after]
            old = [float(values[j]) for j in before]
            verdict[i], delta, band = judge(float(np.median(new)), old, sign, nz.sigma, k_new=len(new))
            reason[i] = (f"change point: the level moves from the median of {len(old)} run(s) to the median "
                         f"of the {len(new)} run(s) from here on; " + _describe(delta, band, float(np.median(old)), unit, nz)
                         + f"; previous regime ends at {c.label(before[-1])}")
        else:
            # seen is in time order and regimes only grow along it: the reference is its tail.
            regime = int(segment[seen[-1]])
            ref_rows = []
            for j in reversed(seen):
                if int(segment[j]) != regime or len(ref_rows) == HISTORY_WINDOW:
                    break
                ref_rows.append(j)
            ref_rows.reverse()
            ref_values = sorted(float(values[j]) for j in ref_rows)
            ref = _sorted_median(ref_values)
            verdict[i], delta, band = _judge_median(float(values[i]), ref, len(ref_values), sign, nz.sigma)
            reason[i] = (_describe(delta, band, ref, unit, nz)
                         + f"; reference: median of the last {len(ref_values)} run(s) of {_key_text(key, c.model[i])} on {key[3]} "
                         f"since the last change point, from {c.label(ref_rows[0])}")
        reason[i] += _unusable_note(usable[i])
        if segment[i] >= 0:
            seen.append(i)
    return verdict, reason
