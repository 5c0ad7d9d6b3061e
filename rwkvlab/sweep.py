"""`rwkvlab sweep`: bench every combination of some options, each in a fresh process.

Each configuration runs in the benchmark worker the panel uses (rwkvlab.worker: ``python -m
rwkvlab.cli bench ... --json --events`` in its own subprocess): a GPU driver that crashes or
hangs takes down one configuration, not the sweep, and every configuration gets a fresh device
and a cold engine, as a user running bench would. Each subprocess appends its own run to the
history as it finishes, so runs done before a crash are kept.

"Best" means the fastest generation among *correct* configurations. A configuration is
correct when its logit error is within tolerance (or was not checked) and the lab's output rule
(:mod:`rwkvlab.verdicts`, as bench, the panel and reports apply it) does not call its output
changed: its quality hash equals that of the earliest run with the same model content, prompt
and generation lengths, in the history or earlier in the sweep. The sweep runs the unfused,
portable (``webgpu``) configuration with the file's own weights (``native``) first, adding it
when the cross product lacks it, so on a fresh history that plain plan is the baseline every
fusion and fast path must reproduce.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rwkvlab.bench import BenchError, BenchSettings, settings_from_args
from rwkvlab.options import Options, OptionsError, from_args, parse_fusions
from rwkvlab.synth import ModelNotFoundError, model_from_args
from rwkvlab.worker import bench_command, run_worker

# Options fields a sweep can vary, with the type of their values.
VARIABLE = {"backend": str, "path": str, "weights": str, "fusions": str, "chunk": int, "gemm_min_tokens": int,
            "tuning": str}


def parse_vary(items: list[str]) -> dict[str, list[str]]:
    """``["path=webgpu,native", "fusions=none,all"]`` -> ``{"path": [...], "fusions": [...]}``.

    Keys are Options fields (``gemm-min-tokens`` is accepted for ``gemm_min_tokens``); each
    value is checked by building an Options from it, so a typo fails before anything runs.
    """
    vary: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values.strip():
            raise OptionsError(f"--vary {item!r}: expected OPTION=V1,V2 (e.g. path=webgpu,native)")
        if key not in VARIABLE:
            raise OptionsError(f"--vary {item!r}: unknown option {key!r}; available: {', '.join(VARIABLE)}")
        if key in vary:
            raise OptionsError(f"--vary {key} given twice; list all its values in one --vary")
        # a tuning is itself a comma-separated list: its sets are separated by ';' ("" = default)
        sep = ";" if key == "tuning" else ","
        vary[key] = [v.strip() for v in values.split(sep) if v.strip() or key == "tuning"]
        for v in vary[key]:
            _with(Options(), key, v)
    return vary


def _with(options: Options, key: str, text: str) -> Options:
    """``options`` with one field set from its command-line text."""
    if key == "fusions":
        return options.with_(fusions=parse_fusions(text))
    if VARIABLE[key] is int:
        try:
            return options.with_(**{key: int(text)})
        except ValueError:
            raise OptionsError(f"--vary {key}={text!r}: expected a whole number") from None
    return options.with_(**{key: text})


@dataclass(frozen=True)
class Config:
    """One configuration of a sweep: its Options and the varied values that name it."""

    options: Options
    label: str  # e.g. "path=native fusions=all"; "baseline" settings are named the same way


def configurations(base: Options, vary: dict[str, list[str]]) -> list[Config]:
    """The cross product of the ``vary`` values applied to ``base``, in the order given."""
    keys = list(vary)
    configs = []
    for combo in itertools.product(*(vary[k] for k in keys)):
        options = base
        for key, text in zip(keys, combo):
            options = _with(options, key, text)
        configs.append(Config(options, " ".join(f"{k}={v}" for k, v in zip(keys, combo)) or "as given"))
    return configs


def baseline_options(base: Options) -> Options:
    """The configuration every other must reproduce: no fusion, portable path, file weights."""
    return base.with_(path="webgpu", weights="native", fusions=frozenset())


def with_baseline(base: Options, configs: list[Config]) -> tuple[list[Config], bool]:
    """``configs`` with the baseline in front when it is missing; and whether it was added."""
    wanted = baseline_options(base)
    if any(c.options == wanted for c in configs):
        return configs, False
    return [Config(wanted, "baseline (path=webgpu weights=native fusions=none)")] + configs, True


@dataclass
class SweepRow:
    """One configuration's outcome: the bench JSON record, or why there is none."""

    config: Config
    result: dict[str, Any] | None
    error: str | None
    returncode: int | None
    seconds: float

    @property
    def ran(self) -> bool:
        return self.result is not None

    def get(self, key: str, default: Any = None) -> Any:
        return (self.result or {}).get(key, default)


@dataclass
class SweepResult:
    """All rows of a sweep, which one is the baseline and which is best."""

    rows: list[SweepRow]
    baseline: SweepRow | None
    baseline_added: bool = False
    best: SweepRow | None = field(default=None)
    # row position -> (output verdict, reason) by rwkvlab.verdicts' rule
    judged: dict[int, tuple[str, str]] = field(default_factory=dict)

    def output(self, row: SweepRow) -> tuple[str, str]:
        """The row's output verdict by the lab's rule and its reason (``unknown`` if not run)."""
        return self.judged.get(self.rows.index(row), ("unknown", "did not run"))

    def correct(self, row: SweepRow) -> bool:
        """Ran, logit error within tolerance (or not checked), output not changed (module docstring)."""
        if not row.ran or row.get("logit_ok") is False:
            return False
        return self.output(row)[0] in ("baseline", "same")

    def status(self, row: SweepRow) -> str:
        """One word or phrase for the table's output column."""
        if not row.ran:
            return "FAILED"
        if row.get("logit_ok") is False:
            return "WRONG (logits)"
        verdict = self.output(row)[0]
        if verdict == "changed":
            return "WRONG (tokens)"
        if verdict == "baseline":
            return "baseline" + ("" if row.get("logit_ok") else " (logits not checked)")
        return verdict

    def table(self) -> str:
        """The sweep as a plain-text table, the best configuration marked with ``*``."""
        head = ("", "configuration", "load ms", "prefill tok/s", "gen tok/s", "logit err", "hash", "output")
        lines = []
        for row in self.rows:
            mark = "*" if row is self.best else ""
            if row.ran:
                err = row.get("logit_error")
                cells = (mark, row.config.label, f"{row.get('load_ms'):.1f}", f"{row.get('prefill_tps'):.2f}",
                         f"{row.get('generation_tps'):.2f}", "not checked" if err is None else f"{err:.3g}",
                         row.get("quality_hash"), self.status(row))
            else:
                cells = (mark, row.config.label, "-", "-", "-", "-", "-", f"FAILED: {row.error}")
            lines.append(cells)
        # Pad every column but the last, which holds free text (a failure's message).
        widths = [max(len(str(r[i])) for r in [head] + lines) for i in range(len(head) - 1)]

        def fmt(cells: tuple) -> str:
            return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + "  " + str(cells[-1])

        rule = tuple("-" * w for w in widths) + ("-" * len(head[-1]),)
        return "\n".join([fmt(head), fmt(rule)] + [fmt(r) for r in lines])

    def summary(self) -> str:
        """The verdict line(s): the best correct configuration, or why there is none."""
        out = []
        if self.baseline_added:
            out.append("(the baseline configuration was added to the sweep to judge correctness)")
        failed = [r for r in self.rows if not r.ran]
        if failed:
            out.append(f"{len(failed)} configuration(s) failed to run: " + "; ".join(r.config.label for r in failed))
        if self.best is None:
            out.append("no best configuration: no configuration ran with correct output")
        else:
            b = self.best
            versus = (f"; plain plan {self.baseline.get('generation_tps'):.2f} tok/s generation"
                      if self.baseline is not None and self.baseline.ran else "")
            out.append(f"best correct configuration: {b.config.label}  ({b.get('generation_tps'):.2f} tok/s "
                       f"generation, {b.get('prefill_tps'):.2f} tok/s prefill{versus})")
        return "\n".join(out)


def pick_best(result: SweepResult) -> SweepRow | None:
    """The correct row with the fastest (median) generation."""
    correct = [r for r in result.rows if result.correct(r)]
    return max(correct, key=lambda r: r.get("generation_tps"), default=None)


def run_config(config: Config, cmd: list[str], timeout: float) -> SweepRow:
    """Run one configuration's worker (rwkvlab.worker); its stderr streams through live."""
    result = run_worker(cmd, timeout=timeout, relay=True)
    return SweepRow(config, result.raw, result.error, result.returncode, result.seconds)


def run_sweep(model: str | os.PathLike, base: Options, vary: dict[str, list[str]],
              settings: BenchSettings | None = None, *, title: str = "", change: str = "",
              file: str | None = None, history_dir: str | os.PathLike = "data/benchmarks", save: bool = True,
              timeout: float = 1800.0, log=print) -> SweepResult:
    """Bench every configuration of ``vary`` over ``base`` in fresh subprocesses (module docstring).

    ``model`` is a GGUF path (resolve presets first with ``rwkvlab.synth.resolve_model``).
    ``log`` receives one line as each configuration starts.
    """
    settings = settings or BenchSettings()
    model = Path(model)
    configs, added = with_baseline(base, configurations(base, vary))
    title = title or f"Sweep {model.stem}: " + (", ".join(vary) or "as given")
    rows = []
    for i, config in enumerate(configs, 1):
        log(f"[{i}/{len(configs)}] {config.label}")
        row_change = f"{change}: {config.label}" if change else config.label
        cmd = bench_command(["--model", str(model)], config.options, settings, title=title, change=row_change,
                            file=file, history_dir=history_dir, save=save)
        rows.append(run_config(config, cmd, timeout))
    wanted = baseline_options(base)
    baseline = next(r for r in rows if r.config.options == wanted)
    result = SweepResult(rows, baseline, added, judged=judge_rows(rows, history_dir, save))
    result.best = pick_best(result)
    return result


def judge_rows(rows: list[SweepRow], history_dir: str | os.PathLike, saved: bool) -> dict[int, tuple[str, str]]:
    """Each run's output verdict by the lab's rule: saved runs as the history now holds them,
    unsaved ones as if appended after the history in the order they ran."""
    import warnings

    import pandas as pd

    from rwkvlab.bench import BenchRecord, history_frame
    from rwkvlab.history import HistoryWarning, read_history
    from rwkvlab.verdicts import judge_new, verdicts

    folder = Path(history_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HistoryWarning)  # `rwkvlab history` reports those
        history = read_history(folder) if folder.is_dir() else pd.DataFrame()
    ran = [(i, r) for i, r in enumerate(rows) if r.ran]
    out: dict[int, tuple[str, str]] = {}
    if saved:
        judged = verdicts(history) if len(history) else pd.DataFrame()
        for i, r in ran:
            where = r.get("saved") or {}
            match = history[(history["file"] == Path(str(where.get("file", ""))).name)
                            & (history["line"] == where.get("line", -1))] if len(history) else history
            if len(match):
                row = judged.loc[match.index[0]]
                out[i] = (str(row["output"]), str(row["output_reason"]))
            else:
                out[i] = ("unknown", f"not found in the history: {where.get('error', 'not saved')}")
        return out
    frames = [history_frame(BenchRecord.from_dict(r.result), "this sweep") for _, r in ran]
    if frames:
        judged = judge_new(history, pd.concat(frames, ignore_index=True))
        for (i, _), (_, row) in zip(ran, judged.iterrows()):
            out[i] = (str(row["output"]), str(row["output_reason"]))
    return out


def cli_sweep(args: argparse.Namespace) -> int:
    """`rwkvlab sweep`: exit 0 when every configuration ran and one is correct, else 1 (2: bad arguments)."""
    try:
        vary = parse_vary(args.vary)
        base = from_args(args)
        settings = settings_from_args(args)
        model = model_from_args(args)
    except (BenchError, ModelNotFoundError, OptionsError) as err:
        print(f"rwkvlab sweep: {err}", file=sys.stderr)
        return 2
    result = run_sweep(model, base, vary, settings, title=args.title or "", change=args.change or "",
                       file=args.file, history_dir=args.history_dir, save=not args.no_save,
                       timeout=args.timeout, log=lambda line: print(f"sweep {line}", file=sys.stderr))
    print(result.table())
    print()
    print(result.summary())
    saved = sorted({r.get("saved", {}).get("file") for r in result.rows if r.get("saved")})
    if saved:
        print(f"runs appended to {', '.join(saved)}")
    ok = result.best is not None and all(r.ran for r in result.rows)
    return 0 if ok else 1

