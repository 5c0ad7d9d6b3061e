"""`rwkvlab compare A B`: two sets of runs side by side, judged by the lab's rule (as `asv compare`).

A side is picked from the history by a selector:

    FILE.md:LINE          the run whose ``###`` heading is on that line
    title=TEXT            every run under the ``## TEXT`` title
    FIELD=VALUE[,...]     runs whose options or columns match, e.g. ``path=native,fusions=none``
                          (an option of the run's record: backend, path, weights, fusions,
                          chunk, gemm_min_tokens, tuning; or a column: model, gpu, change, ...)

Runs are matched up by speed key (model content, GPU, prompt and generation lengths, weight
policy, backend: :mod:`rwkvlab.verdicts`): each key both sides have becomes one block of rows,
one per metric, with the medians of each side, the change, and the verdict of B's median against
A's runs with that GPU's noise (``rwkvlab.verdicts.judge``). Output: "same" when every run of both
sides has one quality hash, else "changed" with the hashes; "unknown" when neither side recorded
one (micro-benchmark runs). Keys only one side has are listed.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rwkvlab.history import printable
from rwkvlab.options import fusions_text
from rwkvlab.verdicts import METRICS, estimate_noise, judge, speed_keys

OPTION_FIELDS = ("backend", "path", "weights", "fusions", "chunk", "gemm_min_tokens", "tuning")


class SelectorError(ValueError):
    """A selector that names nothing, or is malformed; the message says which."""


def select(df: pd.DataFrame, selector: str) -> pd.DataFrame:
    """The runs of ``df`` a selector (module docstring) names; raises :class:`SelectorError`."""
    text = selector.strip()
    file, colon, line = text.rpartition(":")
    if colon and file.endswith(".md") and line.isdigit():
        picked = df[(df["file"] == file.rsplit("/", 1)[-1]) & (df["line"] == int(line))]
    elif text.startswith("title="):
        picked = df[df["title"] == text[len("title="):].strip()]
    elif "=" in text:
        mask = np.ones(len(df), dtype=bool)
        for item in text.split(","):
            key, eq, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not eq or not key:
                raise SelectorError(f"selector {selector!r}: {item!r} is not FIELD=VALUE")
            mask &= np.array([_field(row, key) == _normal(key, value) for _, row in df.iterrows()], dtype=bool)
        picked = df[mask]
    else:
        raise SelectorError(f"selector {selector!r}: expected FILE.md:LINE, title=TEXT or FIELD=VALUE[,...]")
    if picked.empty:
        raise SelectorError(f"selector {selector!r} names no run of the history read")
    return picked


def _normal(key: str, value: str) -> str:
    if key == "fusions":
        from rwkvlab.options import parse_fusions

        return fusions_text(parse_fusions(value))
    return value


def _field(row: pd.Series, key: str) -> str | None:
    options = row.get("options")
    if key in OPTION_FIELDS and isinstance(options, dict) and key in options:
        value = options[key]
        return fusions_text(set(value)) if key == "fusions" else str(value)
    if key in row.index and not (isinstance(row[key], float) and np.isnan(row[key])):
        value = row[key]
        if key == "fusions":  # the history's own row: "kv, proj" or "none"
            return fusions_text({v.strip() for v in str(value).split(",") if v.strip() and v.strip() != "none"})
        return str(value)
    return None


@dataclass
class Comparison:
    """The side-by-side rows of one compare, and the keys only one side has."""

    rows: pd.DataFrame
    only_a: list[str]
    only_b: list[str]

    def regressed(self) -> bool:
        return bool((self.rows["verdict"] == "regression").any() or (self.rows["verdict"] == "changed").any())


def compare_runs(df: pd.DataFrame, a: pd.DataFrame, b: pd.DataFrame) -> Comparison:
    """B against A, per speed key both have (module docstring); ``df`` gives the noise."""
    noise = {column: estimate_noise(df, column) for column, _, _ in METRICS.values()}
    keys_a = _keys(a)
    keys_b = _keys(b)
    rows = []
    for key in [k for k in keys_a if k in keys_b]:
        ra, rb = keys_a[key], keys_b[key]
        gpu = str(ra["gpu"].iloc[0])
        name = f"{ra['model'].iloc[0]} on {gpu}" + _lengths(key)
        for metric, (column, sign, unit) in METRICS.items():
            if column not in ra.columns:  # a micro-benchmark figure this history has no run of
                continue
            va = ra[column].dropna().to_numpy(dtype=float)
            vb = rb[column].dropna().to_numpy(dtype=float)
            if not len(va) or not len(vb):
                continue
            nz = noise[column].get(gpu, noise[column][None])
            verdict, delta, band = judge(float(np.median(vb)), list(va), sign, nz.sigma, k_new=len(vb))
            rows.append({"runs": name, "metric": f"{metric} ({unit})", "A": float(np.median(va)),
                         "B": float(np.median(vb)), "change": f"{delta:+.1%}", "verdict": verdict,
                         "why": f"median of {len(vb)} vs {len(va)} run(s); noise band ±{band:.1%} "
                                f"(sigma {nz.sigma:.2%} from {nz.source})"})
        hashes_a, hashes_b = set(ra["quality_hash"].dropna()), set(rb["quality_hash"].dropna())
        if not hashes_a and not hashes_b:
            # Micro-benchmark runs (and hand-written ones) record no hash: nothing to compare,
            # which is not a difference.
            rows.append({"runs": name, "metric": "output (quality hash)", "A": "", "B": "", "change": "",
                         "verdict": "unknown", "why": "no quality hash recorded on either side"})
            continue
        same = len(hashes_a | hashes_b) == 1
        rows.append({"runs": name, "metric": "output (quality hash)", "A": ", ".join(sorted(hashes_a)),
                     "B": ", ".join(sorted(hashes_b)), "change": "", "verdict": "same" if same else "changed",
                     "why": "one quality hash on both sides" if same else "the sides' greedy tokens differ"})
    return Comparison(pd.DataFrame(rows, columns=["runs", "metric", "A", "B", "change", "verdict", "why"]),
                      [_describe(keys_a[k]) for k in keys_a if k not in keys_b],
                      [_describe(keys_b[k]) for k in keys_b if k not in keys_a])


def _keys(runs: pd.DataFrame) -> dict[tuple, pd.DataFrame]:
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(speed_keys(runs)):
        groups.setdefault(key, []).append(i)
    flat = runs.reset_index(drop=True)
    return {k: flat.iloc[idx] for k, idx in groups.items()}


def _lengths(key: tuple) -> str:
    prompt, generate = key[1], key[2]
    return "" if (prompt, generate) == ("?", "?") else f", prompt {prompt} / generate {generate}"


def _describe(runs: pd.DataFrame) -> str:
    return f"{len(runs)} run(s) of {runs['model'].iloc[0]} on {runs['gpu'].iloc[0]}"


def format_comparison(c: Comparison, a: str, b: str) -> str:
    """The comparison as a plain-text table for the terminal."""
    lines = [f"A: {printable(a)}", f"B: {printable(b)}", ""]
    if c.rows.empty:
        lines.append("no model, GPU and lengths that both sides ran: nothing to compare")
    else:
        shown = c.rows.copy()
        for col in ("A", "B"):
            shown[col] = [f"{v:,.2f}" if isinstance(v, float) else v for v in shown[col]]
        lines += [printable(line) for line in shown.drop(columns=["why"]).to_string(index=False).splitlines()]
    for side, missing in (("A", c.only_a), ("B", c.only_b)):
        for text in missing:
            lines.append(f"only in {side}: {printable(text)}")
    return "\n".join(lines)


def cli_compare(args: argparse.Namespace) -> int:
    """`rwkvlab compare A B`: exit 0, or 1 with --fail-on-regression when B regressed or its
    output differs; 2 for a selector that names nothing."""
    from rwkvlab.report import load

    try:
        df, _ = load(args.paths)
        a, b = select(df, args.a), select(df, args.b)
    except (FileNotFoundError, ValueError) as err:
        print(f"rwkvlab compare: {printable(str(err))}", file=sys.stderr)
        return 2
    result = compare_runs(df, a, b)
    print(format_comparison(result, args.a, args.b))
    if args.verbose and not result.rows.empty:
        print()
        for _, row in result.rows.iterrows():
            print(printable(f"{row['runs']} · {row['metric']}: {row['why']}"))
    return 1 if args.fail_on_regression and result.regressed() else 0
