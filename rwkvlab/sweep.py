"""`rwkvlab sweep`: bench every combination of some options, each in a fresh process.

Each configuration runs in the benchmark worker the panel uses (rwkvlab.worker: ``python -m
rwkvlab.cli bench ... --json --events`` in its own subprocess): a GPU driver that crashes or
hangs takes down one configuration, not the sweep, and every configuration gets a fresh device
and a cold engine, as a user running bench would. Configurations run one at a time here by
default (one GPU is best measured alone), or as tasks on a Dask cluster (:mod:`rwkvlab.cluster`:
``--workers N`` on this machine, ``--scheduler`` for one spread over machines). Either way the
sweep itself is the one writer: it appends each run to the history as it arrives, to the file
named for the GPU that measured it, so runs done before a crash or a lost worker are kept.

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
import contextlib
import itertools
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rwkvlab.bench import BenchError, BenchRecord, BenchSettings, history_file, save_or_error, settings_from_args
from rwkvlab.history import check_appendable
from rwkvlab.options import Options, OptionsError, from_args, parse_fusions
from rwkvlab.synth import ModelNotFoundError, model_from_args

# Options fields a sweep can vary, with the type of their values.
VARIABLE = {"runtime": str, "backend": str, "path": str, "weights": str, "fusions": str, "chunk": int, "gemm_min_tokens": int,
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

    def gpus(self) -> list[str]:
        """The GPUs the rows ran on, in order of first appearance."""
        return list(dict.fromkeys(r.get("gpu") for r in self.rows if r.ran))

    def best_per_gpu(self) -> dict[str, SweepRow]:
        """The correct row with the fastest generation on each GPU (rows ran on several GPUs
        when the sweep ran on a cluster)."""
        best: dict[str, SweepRow] = {}
        for row in self.rows:
            gpu = row.get("gpu")
            if self.correct(row) and (gpu not in best or row.get("generation_tps") > best[gpu].get("generation_tps")):
                best[gpu] = row
        return best

    def table(self) -> str:
        """The sweep as a plain-text table, the best configuration marked with ``*`` (on several
        GPUs: a GPU column, and ``+`` on the best of each GPU that is not the best overall)."""
        several = len(self.gpus()) > 1
        per_gpu = set(map(id, self.best_per_gpu().values())) if several else set()
        head = ("", "configuration") + (("gpu",) if several else ()) + (
            "load ms", "prefill tok/s", "gen tok/s", "logit err", "hash", "output")
        lines = []
        for row in self.rows:
            mark = "*" if row is self.best else "+" if id(row) in per_gpu else ""
            gpu = (row.get("gpu", "-"),) if several else ()
            if row.ran:
                err = row.get("logit_error")
                cells = (mark, row.config.label, *gpu, f"{row.get('load_ms'):.1f}", f"{row.get('prefill_tps'):.2f}",
                         f"{row.get('generation_tps'):.2f}", "not checked" if err is None else f"{err:.3g}",
                         row.get("quality_hash"), self.status(row))
            else:
                cells = (mark, row.config.label, *gpu, "-", "-", "-", "-", "-", f"FAILED: {row.error}")
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
        unsaved = [r for r in self.rows if (r.get("saved") or {}).get("error")]
        if unsaved:
            out.append(f"{len(unsaved)} run(s) measured but not saved: "
                       + "; ".join(f"{r.config.label} ({r.get('saved')['error']})" for r in unsaved))
        if self.best is None:
            out.append("no best configuration: no configuration ran with correct output")
        else:
            b = self.best
            versus = (f"; plain plan {self.baseline.get('generation_tps'):.2f} tok/s generation"
                      if self.baseline is not None and self.baseline.ran else "")
            out.append(f"best correct configuration: {b.config.label}  ({b.get('generation_tps'):.2f} tok/s "
                       f"generation, {b.get('prefill_tps'):.2f} tok/s prefill{versus})")
        if len(self.gpus()) > 1:
            best = self.best_per_gpu()
            for gpu in self.gpus():
                b = best.get(gpu)
                out.append(f"  on {gpu}: " + (f"{b.config.label}  ({b.get('generation_tps'):.2f} tok/s generation, "
                                               f"{b.get('prefill_tps'):.2f} tok/s prefill)" if b else
                                               "no configuration ran with correct output"))
        return "\n".join(out)


def pick_best(result: SweepResult) -> SweepRow | None:
    """The correct row with the fastest (median) generation."""
    correct = [r for r in result.rows if result.correct(r)]
    return max(correct, key=lambda r: r.get("generation_tps"), default=None)


def run_sweep(model: str | os.PathLike, base: Options, vary: dict[str, list[str]],
              settings: BenchSettings | None = None, *, title: str = "", change: str = "",
              file: str | None = None, history_dir: str | os.PathLike = "data/benchmarks", save: bool = True,
              timeout: float = 1800.0, log=print, model_args: Sequence[str] | None = None,
              workers: int = 0, scheduler: str | None = None, client=None,
              adapters: Sequence[str] | None = None, on_row: Callable[[SweepRow], None] | None = None,
              progress: bool | None = None) -> SweepResult:
    """Bench every configuration of ``vary`` over ``base`` in fresh subprocesses (module docstring).

    ``model`` is a GGUF path (resolve presets first with ``rwkvlab.synth.resolve_model``); the
    workers get ``--model model`` unless ``model_args`` says otherwise (``["--preset", "tiny"]``:
    each remote worker resolves the preset itself). Where the configurations run:
    ``client`` (a connected ``distributed.Client``, left open), else ``scheduler`` (an address
    such as ``tcp://host:8786``), else ``workers`` > 0 (a local cluster of that many worker
    processes, ``adapters`` giving each its GPU), else here, one at a time. ``log`` receives a
    line as each configuration starts (here) or finishes (on a cluster); ``on_row`` each row as it
    arrives, already saved; ``progress`` draws a bar over the tasks (default: on a cluster).
    """
    from rwkvlab.cluster import run_inline, run_on_cluster

    settings = settings or BenchSettings()
    model = Path(model)
    model_args = list(model_args) if model_args is not None else ["--model", str(model)]
    configs, added = with_baseline(base, configurations(base, vary))
    title = title or f"Sweep {model.stem}: " + (", ".join(vary) or "as given")
    if save:
        # Find out before anything runs whether the runs can be saved (as bench does).
        check_appendable(Path(history_dir) / f"{file.removesuffix('.md')}.md" if file else Path(history_dir))
    tasks = [dict(model_args=model_args, options=c.options, settings=settings, history_dir=str(history_dir),
                  title=title, change=f"{change}: {c.label}" if change else c.label, file=file, timeout=timeout)
             for c in configs]
    wanted = baseline_options(base)
    first = next(i for i, c in enumerate(configs) if c.options == wanted)
    rows: list[SweepRow | None] = [None] * len(configs)
    with _cluster_client(client, scheduler, workers, adapters) as dask_client:
        if dask_client is None:
            if adapters:
                if len(adapters) > 1:
                    raise ValueError("one sweep on this machine runs on one adapter; several need workers")
                tasks = [dict(t, adapter=str(adapters[0])) for t in tasks]
            outcomes = run_inline(tasks, log=log)
        else:
            outcomes = run_on_cluster(dask_client, tasks, first)
        bar = _bar(len(tasks), dask_client is not None if progress is None else progress)
        for i, outcome in outcomes:
            row = SweepRow(configs[i], outcome.raw, outcome.error, outcome.returncode, outcome.seconds)
            if save and row.ran:
                row.result["saved"] = save_row(row.result, history_dir, file)
            rows[i] = row
            if dask_client is not None:
                where = outcome.where.get("dask_worker") or outcome.where.get("host", "")
                said = f"{row.get('generation_tps'):.2f} tok/s generation" if row.ran else f"FAILED: {row.error}"
                line = f"{configs[i].label}: {said} ({where})"
                if bar:  # above the bar, not through it
                    bar.write(f"sweep {line}", file=sys.stderr)
                else:
                    log(line)
            if bar:
                bar.update()
            if on_row:
                on_row(row)
        if bar:
            bar.close()
    baseline = rows[first]
    result = SweepResult(rows, baseline, added, judged=judge_rows(rows, history_dir, save))
    result.best = pick_best(result)
    return result


def save_row(raw: dict[str, Any], history_dir: str | os.PathLike, file: str | None) -> dict[str, Any]:
    """Append one run (bench's JSON record) to its history file, named for its GPU unless
    ``file`` is given; where it went (``file``, ``line``), or the ``error`` that kept it out."""
    record = BenchRecord.from_dict(raw)
    return save_or_error(record, history_file(record.gpu, history_dir, file))


@contextlib.contextmanager
def _cluster_client(client, scheduler: str | None, workers: int, adapters: Sequence[str] | None):
    """The Dask client a sweep submits to (None: run here), closed after if made here."""
    if client is not None or (not scheduler and not workers):
        yield client
        return
    from distributed import Client

    if scheduler:
        if adapters:
            raise ValueError("on a cluster each worker's own $RWKVLAB_ADAPTER picks its GPU; "
                             "set it where the worker starts, not on the sweep")
        with Client(scheduler) as made:
            yield made
        return
    from rwkvlab.cluster import start_local_cluster

    with start_local_cluster(workers, adapters) as cluster, Client(cluster) as made:
        made.wait_for_workers(workers)
        yield made


def _bar(total: int, show: bool):
    """A progress bar over the sweep's tasks (a widget in a notebook), or None."""
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sweep", unit="config", file=sys.stderr)


def judge_rows(rows: list[SweepRow], history_dir: str | os.PathLike, saved: bool) -> dict[int, tuple[str, str]]:
    """Each run's output verdict by the lab's rule: saved runs as the history now holds them,
    unsaved ones as if appended after the history in the order they ran."""
    import pandas as pd

    from rwkvlab.bench import BenchRecord, history_frame
    from rwkvlab.history import read_history_quietly
    from rwkvlab.verdicts import judge_new, verdicts

    history = read_history_quietly(history_dir)
    ran = [(i, r) for i, r in enumerate(rows) if r.ran]
    out: dict[int, tuple[str, str]] = {}
    if saved:
        judged = verdicts(history) if len(history) else pd.DataFrame()
        for i, r in ran:
            where = r.get("saved") or {}
            match = _saved_run(history, r.result) if len(history) else history
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


def _saved_run(history, result: dict[str, Any]):
    """The history's row of a run this sweep saved. Its line is where the run was written, but a
    later run under an earlier title (another sweep writing the same file) moves it down, so the
    run is also looked for by title, change, timestamp (to the second, as the file keeps it) and
    quality hash."""
    import pandas as pd

    where = result.get("saved") or {}
    mine = history[history["file"] == Path(str(where.get("file", ""))).name]
    same = ((mine["title"] == result.get("title")) & (mine["change"] == result.get("change"))
            & (mine["quality_hash"] == result.get("quality_hash")))
    at_line = mine[same & (mine["line"] == where.get("line", -1))]
    if len(at_line):
        return at_line
    stamp = pd.Timestamp(result.get("timestamp")).floor("s")
    return mine[same & (mine["timestamp"].dt.floor("s") == stamp)]


def cli_sweep(args: argparse.Namespace) -> int:
    """`rwkvlab sweep`: exit 0 when every configuration ran and one is correct, else 1 (2: bad arguments)."""
    from rwkvlab.cluster import ClusterError
    from rwkvlab.history import HistoryWriteError

    adapters = [a.strip() for a in (args.adapter or "").split(",") if a.strip()]
    try:
        vary = parse_vary(args.vary)
        base = from_args(args)
        settings = settings_from_args(args)
        if args.workers < 0:
            raise OptionsError(f"--workers {args.workers}: expected a number of worker processes (0: none)")
        if args.scheduler and args.workers:
            raise OptionsError("--scheduler and --workers: give one (a cluster elsewhere, or one started here)")
        if args.scheduler and adapters:
            raise OptionsError("--adapter with --scheduler: each worker's own $RWKVLAB_ADAPTER picks its GPU; "
                               "set it where the worker starts")
        if len(adapters) > 1 and len(adapters) != max(args.workers, 1):
            raise OptionsError(f"--adapter {args.adapter}: {len(adapters)} adapters for "
                               f"{args.workers} worker(s); give one, or one per worker")
        if not all(a.isdigit() for a in adapters):
            raise OptionsError(f"--adapter {args.adapter}: expected adapter numbers as `python -m rwkvlab.gpu` "
                               "lists them (0 first), joined by ','")
        if args.scheduler:
            # The workers may be other machines: each finds the model itself (the same file path,
            # or the preset, written there on first use).
            model_args = ["--model", args.model] if args.model else ["--preset", args.preset or "tiny",
                                                                     "--format", args.synth_format]
            model = Path(args.model or f"{args.preset or 'tiny'}-{args.synth_format}")
        else:
            model, model_args = model_from_args(args), None
    except (BenchError, ModelNotFoundError, OptionsError) as err:
        print(f"rwkvlab sweep: {err}", file=sys.stderr)
        return 2
    try:
        result = run_sweep(model, base, vary, settings, title=args.title or "", change=args.change or "",
                           file=args.file, history_dir=args.history_dir, save=not args.no_save,
                           timeout=args.timeout, log=lambda line: print(f"sweep {line}", file=sys.stderr),
                           model_args=model_args, workers=args.workers, scheduler=args.scheduler,
                           adapters=adapters or None, progress=False if args.no_progress else None)
    except HistoryWriteError as err:
        print(f"rwkvlab sweep: {err}; nothing run", file=sys.stderr)
        return 2
    except OSError as err:  # the scheduler could not be reached
        print(f"rwkvlab sweep: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    except ClusterError as err:
        print(f"rwkvlab sweep: {err}", file=sys.stderr)
        return 2
    print(result.table())
    print()
    print(result.summary())
    saved = sorted({r.get("saved", {}).get("file") for r in result.rows if r.get("saved")})
    if saved:
        print(f"runs appended to {', '.join(saved)}")
    ok = result.best is not None and all(r.ran and not (r.get("saved") or {}).get("error") for r in result.rows)
    return 0 if ok else 1

