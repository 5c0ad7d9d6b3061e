"""The lab's control panel: pick a model and the engine's switches, run a benchmark, and see at
once whether it got faster and whether its output is still right.

    from rwkvlab.lab import Panel
    panel = Panel()     # the last expression of a notebook cell shows it; press Run
    panel.run()         # or drive it from code: what the Run button does, synchronously

What Run does:

1. The widgets become an :class:`~rwkvlab.options.Options`, a
   :class:`~rwkvlab.bench.BenchSettings` and a :class:`ModelChoice` (a synthetic preset in a
   weight format, or a GGUF file).
2. The benchmark worker (:mod:`rwkvlab.worker`: ``python -m rwkvlab.cli bench ... --json
   --events --no-save`` in a subprocess) runs, started from a thread when the button is pressed.
   A GPU driver that crashes or hangs takes the worker down, never the notebook's kernel, and the
   kernel stays responsive meanwhile. The worker's progress events drive the ``IntProgress``.
3. The record is judged (:mod:`rwkvlab.baseline`): its output by the lab's one rule against the
   history and this session's runs, its speed against a baseline, by default the latest earlier
   run of the same model file on the same GPU, from this session or from the history.
4. The new point lands on the live history plot (``rwkvlab.plots.live_figure``, redrawn whole
   by ``plots.show_live`` after every run); "Save to history"
   appends the run, with the title and change typed in, through ``bench.save_bench``.

The widget logic is plain methods (:meth:`Panel.run`, :meth:`Panel.save`,
:meth:`Panel.configure`), and results stay on the panel (``last_record``,
``last_comparison``, ``result_table``, ``runs``), so it is all testable without a browser.
"""
from __future__ import annotations

import dataclasses
import html
import json
import os
import subprocess
import sys
import threading
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from rwkvlab import bench, plots
from rwkvlab.bench import BenchRecord, BenchSettings
from rwkvlab.history import HistoryWarning, read_history
from rwkvlab.options import (FUSIONS, PATHS, RUNTIME_NOTES, RUNTIMES, WEIGHT_POLICIES, Options, OptionsError,
                             fusions_text)
from rwkvlab.synth import FORMATS as SYNTH_FORMATS
from rwkvlab.synth import PRESETS
from rwkvlab.baseline import (Baseline, Comparison, baseline_from_history, baseline_from_record, compare,
                              result_html)
from rwkvlab.bench import bench_steps
from rwkvlab.verdicts import RUN_METRICS, estimate_noise
from rwkvlab.worker import KEPT_LINES, bench_command, run_worker, worker_env

class LabError(RuntimeError):
    """A panel action that could not be done; the message says what to change."""


# --------------------------------------------------------------------------------------------
# Where things are, and a quiet kernel
# --------------------------------------------------------------------------------------------

def repo_root() -> Path | None:
    """The checkout this package runs from (editable install or PYTHONPATH), or None."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def default_history_dir(start: str | os.PathLike | None = None) -> Path:
    """The benchmark history folder: ``data/benchmarks`` of the checkout the package runs from;
    else the nearest ``data/benchmarks`` at or above ``start`` (default: the working directory,
    so a notebook in ``notebooks/`` finds ``../data/benchmarks``); else ``./data/benchmarks``."""
    root = repo_root()
    if root is not None and (root / "data" / "benchmarks").is_dir():
        return root / "data" / "benchmarks"
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "data" / "benchmarks").is_dir():
            return folder / "data" / "benchmarks"
    return here / "data" / "benchmarks"


def prepare_kernel() -> None:
    """Quiet Mesa's OpenGL probe in this process and the workers it starts.

    Every adapter scan makes Mesa's EGL platform print "XDG_RUNTIME_DIR is invalid or not set"
    to the process's stderr when that variable is unset (containers, CI). A notebook kernel
    forwards such low-level writes into whichever cell is running, so the same cell's output
    would depend on the machine. A private, empty runtime folder is all Mesa asks for.
    """
    from rwkvlab.gpu import quiet_mesa_probe

    quiet_mesa_probe()


# --------------------------------------------------------------------------------------------
# The worker: one `rwkvlab bench --json --no-save` subprocess
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelChoice:
    """What to benchmark: a synthetic preset in a weight format, or a GGUF file."""

    preset: str | None = "tiny"
    fmt: str = "f32"
    path: str | None = None

    def __post_init__(self) -> None:
        if self.path is None and self.preset not in PRESETS:
            raise LabError(f"unknown preset {self.preset!r}; available: {', '.join(PRESETS)}")
        if self.path is None and self.fmt not in SYNTH_FORMATS:
            raise LabError(f"unknown format {self.fmt!r}; available: {', '.join(SYNTH_FORMATS)}")

    def cli_args(self) -> list[str]:
        """The model part of a `rwkvlab bench` command line; a GGUF file must exist."""
        if self.path is None:
            return ["--preset", str(self.preset), "--format", self.fmt]
        path = Path(self.path).expanduser()
        if not path.is_file():
            raise LabError(f"GGUF file {path} does not exist; type the path of a .gguf file, "
                           "or pick a synthetic preset")
        return ["--model", str(path)]

    @property
    def label(self) -> str:
        return Path(self.path).name if self.path else f"{self.preset} {self.fmt} (synthetic)"


def worker_command(model: ModelChoice, options: Options, settings: BenchSettings,
                   history_dir: str | os.PathLike, python: str = sys.executable) -> list[str]:
    """The worker line of one panel run (:func:`rwkvlab.worker.bench_command`): nothing is
    saved (the panel saves explicitly); ``--history-dir`` lets bench judge it."""
    return bench_command(model.cli_args(), options, settings, history_dir=history_dir, python=python)


def probe_adapters(python: str = sys.executable, timeout: float = 120.0) -> tuple[list[dict[str, str]], str | None]:
    """The machine's WebGPU adapters on every installed runtime, listed by a subprocess (an
    adapter scan that crashes a driver must not take the kernel with it): (adapters as dicts
    with a "runtime" key, error text or None)."""
    script = ("import dataclasses, json\nfrom rwkvlab.gpu import installed_runtimes, list_adapters\n"
              "print(json.dumps([dict(dataclasses.asdict(a), runtime=r) for r in installed_runtimes() "
              "for a in list_adapters(r)]))")
    try:
        done = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=timeout,
                              env=worker_env())
    except (OSError, subprocess.TimeoutExpired) as err:
        return [], f"listing adapters failed: {err}"
    if done.returncode != 0 or not done.stdout.strip():
        tail = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return [], f"listing adapters failed (exit {done.returncode}): {tail}"
    return json.loads(done.stdout.strip().splitlines()[-1]), None


# --------------------------------------------------------------------------------------------
# The panel
# --------------------------------------------------------------------------------------------

@dataclass
class SessionRun:
    """A run made from the panel: its record, its verdicts, where it was saved (if it was)."""

    number: int
    record: BenchRecord
    comparison: Comparison
    saved: str | None = None  # "file.md:line"

    @property
    def key(self) -> str:
        return f"session:{self.number}"

    @property
    def label(self) -> str:
        o = self.record.options
        return (f"this session #{self.number}: {self.record.model} {o.text()} "
                f"({self.record.generation_tps:.1f} tok/s gen)")


class Panel:
    """The lab's control panel (ipywidgets). See the module docstring.

    ``history_dir``: the benchmark history to compare with and save to (default:
    :func:`default_history_dir`). ``model``: a preset name or a GGUF path to start with
    (default: ``$RWKVLAB_MODEL`` as ``make lab MODEL=...`` sets it, else the tiny preset).
    ``python``: the interpreter the workers run. ``timeout``: seconds a worker may take.
    """

    def __init__(self, history_dir: str | os.PathLike | None = None, *, model: str | None = None,
                 python: str | None = None, timeout: float = 1800.0) -> None:
        self.history_dir = Path(history_dir) if history_dir is not None else default_history_dir()
        self.python = python or sys.executable
        self.timeout = timeout
        self.runs: list[SessionRun] = []
        self.last_record: BenchRecord | None = None
        self.last_comparison: Comparison | None = None
        self.result_table: pd.DataFrame | None = None
        self.last_error: str | None = None
        self.log: list[str] = []
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._busy = threading.Lock()
        self._load_history()
        self.adapters, adapter_error = probe_adapters(self.python)
        self._build(model if model is not None else os.environ.get("RWKVLAB_MODEL") or "tiny")
        if adapter_error:
            self._status(adapter_error, error=True)

    # --- history ----------------------------------------------------------------------------

    def _load_history(self) -> None:
        """Read the history (its warnings are kept on ``history_warnings``, not printed)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", HistoryWarning)
            self.history = read_history(self.history_dir) if self.history_dir.exists() else pd.DataFrame()
        self.history_warnings = [str(w.message) for w in caught if issubclass(w.category, HistoryWarning)]
        self.history_verdicts = None
        self.history_noise: dict[str, dict] = {}
        if len(self.history):
            from rwkvlab.verdicts import verdicts

            self.history_verdicts = verdicts(self.history)
            self.history_noise = {column: estimate_noise(self.history, column) for column, _, _ in RUN_METRICS.values()}

    def history_baselines(self) -> list[Baseline]:
        """Every history run as a baseline, newest first."""
        if not len(self.history):
            return []
        rows = self.history.sort_values(["timestamp", "line"], ascending=False, na_position="last")
        return [baseline_from_history(row) for _, row in rows.iterrows()]

    def baseline_choices(self) -> list[tuple[str, str]]:
        """(label, key) of every baseline the dropdown offers: auto, none, session, history."""
        choices = [("auto: the latest earlier run of this model on this GPU", "auto"), ("none", "none")]
        choices += [(r.label + (f" [saved {r.saved}]" if r.saved else ""), r.key) for r in reversed(self.runs)]
        choices += [(b.label, b.key) for b in self.history_baselines()]
        return choices

    def _candidates(self) -> list[Baseline]:
        """Session runs (newest first), then history runs (newest first)."""
        session = [baseline_from_record(r.record, r.key, r.label) for r in reversed(self.runs)]
        return session + self.history_baselines()

    def resolve_baseline(self, key: str, record: BenchRecord) -> Baseline | None:
        """The baseline ``key`` names; ``auto``: the latest earlier run of ``record``'s model
        file on its GPU (this session's runs count before the history's)."""
        if key == "none":
            return None
        candidates = self._candidates()
        if key == "auto":
            same = [b for b in candidates if b.model == record.model and b.gpu == record.gpu]
            return max(same, key=lambda b: (b.timestamp is not None, b.timestamp or 0), default=None) \
                if same else None
        for b in candidates:
            if b.key == key:
                return b
        raise LabError(f"no baseline {key!r}; choose one of the dropdown's runs (panel.baseline_choices())")

    # --- widgets ----------------------------------------------------------------------------

    def _build(self, model: str) -> None:
        import ipywidgets as w

        def row(label: str, *children, tip: str = "") -> w.HBox:
            return w.HBox([w.HTML(f"<span title='{html.escape(tip, quote=True)}'>{label}</span>",
                                  layout=w.Layout(width="110px")), *children])

        is_file = model not in PRESETS
        self.source = w.ToggleButtons(options=[("synthetic preset", "preset"), ("GGUF file", "file")],
                                      value="file" if is_file else "preset", style={"button_width": "130px"})
        self.preset = w.Dropdown(options=list(PRESETS), value="tiny" if is_file else model, layout=w.Layout(width="110px"))
        self.fmt = w.Dropdown(options=list(SYNTH_FORMATS), value="f32", layout=w.Layout(width="110px"))
        self.gguf = w.Text(value=model if is_file else "", placeholder="path/to/model.gguf",
                           layout=w.Layout(width="340px"))
        d = Options()  # the panel starts from the defaults every command starts from
        self.weights = w.ToggleButtons(options=WEIGHT_POLICIES, value=d.weights,
                                       tooltips=["each tensor in its file format on the GPU",
                                                 "every matrix dequantized to f16 at load"])
        self.path = w.ToggleButtons(options=PATHS, value=d.path,
                                    tooltips=["native where the adapter has f16 or subgroups, else webgpu "
                                              "(the run records which)", "portable WGSL only",
                                              "also subgroups / f16 where the adapter has them"])
        runtimes = [r for r in RUNTIMES if any(a.get("runtime", RUNTIMES[0]) == r for a in self.adapters)]
        self.runtime = w.ToggleButtons(options=runtimes or [d.runtime], value=d.runtime if d.runtime in runtimes
                                       else (runtimes or [d.runtime])[0],
                                       tooltips=[RUNTIME_NOTES[r] for r in (runtimes or [d.runtime])])
        self.backend = w.Dropdown(options=self._backend_options(), value=d.backend, layout=w.Layout(width="420px"))
        self.fusion_boxes = {name: w.Checkbox(value=name in d.fusions, description=name, indent=False,
                                              layout=w.Layout(width="120px")) for name in FUSIONS}
        self.chunk = w.BoundedIntText(value=d.chunk, min=1, max=1 << 16, layout=w.Layout(width="80px"))
        self.gemm_min_tokens = w.BoundedIntText(value=d.gemm_min_tokens, min=1, max=1 << 16,
                                                layout=w.Layout(width="80px"))
        self.tuning = w.Text(value=d.tuning, placeholder="device's own, e.g. matvec_rows=4,wkv_wg=512",
                             layout=w.Layout(width="340px"))
        # A block-level div: ipywidgets' HTML line height (one widget row) would space the
        # description's lines a row apart.
        fusion_rows = [w.HBox([box, w.HTML(f"<div style='font-size:11px;color:#5a6473;line-height:1.3;"
                                           f"padding-top:5px'>{html.escape(FUSIONS[name])}</div>",
                                           layout=w.Layout(width="420px"))])
                       for name, box in self.fusion_boxes.items()]
        d = BenchSettings()
        number = dict(layout=w.Layout(width="80px"))
        self.prefill = w.BoundedIntText(value=d.prefill, min=1, max=1 << 16, **number)
        self.generate = w.BoundedIntText(value=d.generate, min=1, max=1 << 16, **number)
        self.warmup = w.BoundedIntText(value=d.warmup, min=0, max=100, **number)
        self.repeat = w.BoundedIntText(value=d.repeat, min=1, max=100, **number)
        self.reference = w.Checkbox(value=True, indent=False, description="check logits against the NumPy "
                                    "reference (untick for models too big for this host)")
        self.baseline = w.Dropdown(options=self.baseline_choices(), value="auto", layout=w.Layout(width="420px"))
        self.run_button = w.Button(description="Run", button_style="primary", icon="play",
                                   tooltip="benchmark these settings in a worker process")
        self.run_button.add_class("rwkvlab-run")
        self.stop_button = w.Button(description="Stop", icon="stop", disabled=True,
                                    tooltip="stop the running worker")
        self.progress = w.IntProgress(value=0, min=0, max=1, layout=w.Layout(width="220px"))
        self.status = w.HTML("ready")
        self.status.add_class("rwkvlab-status")
        self.result = w.HTML("<em>No run yet: choose the settings and press Run.</em>")
        self.result.add_class("rwkvlab-result")
        self.title_box = w.Text(placeholder="## title the run goes under", layout=w.Layout(width="360px"))
        self.change_box = w.Text(placeholder="what changed (the run's ### heading)", layout=w.Layout(width="360px"))
        self.save_button = w.Button(description="Save to history", icon="save", disabled=True)
        self.save_status = w.HTML("")
        self.log_view = w.HTML("")
        self.plot = plots.live_widget()
        self._draw_plot()

        self.source.observe(self._on_source, names="value")
        self.run_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        self.save_button.on_click(lambda _: self._save_clicked())

        self._file_row = row("GGUF file", self.gguf)
        self._preset_row = row("preset", self.preset, w.HTML("&nbsp;format&nbsp;"), self.fmt)
        controls = w.VBox([
            row("model", self.source), self._preset_row, self._file_row,
            row("weights", self.weights, tip="Options.weights"),
            row("kernel path", self.path, tip="Options.path"),
            row("runtime", self.runtime, tip="Options.runtime: the WebGPU implementation (only those installed "
                "that find an adapter here)"),
            row("backend", self.backend, tip="wgpu backend (only those this machine offers)"),
            w.HTML("<b>fusions</b> (kernel-plan rewrites; each has its unfused equivalent)"), *fusion_rows,
            row("chunk", self.chunk, w.HTML("&nbsp;GEMM from&nbsp;"), self.gemm_min_tokens,
                tip="Options.chunk (tokens per prefill chunk), Options.gemm_min_tokens"),
            row("tuning", self.tuning, tip="Options.tuning: kernel-shape overrides (empty: the device's own)"),
            row("prefill", self.prefill, w.HTML("&nbsp;generate&nbsp;"), self.generate, tip="tokens"),
            row("warmup", self.warmup, w.HTML("&nbsp;repeat&nbsp;"), self.repeat, tip="rounds"),
            self.reference,
            row("baseline", self.baseline, tip="the run this one is compared with"),
            w.HBox([self.run_button, self.stop_button, self.progress]), self.status,
        ], layout=w.Layout(width="560px"))
        results = w.VBox([
            self.result,
            w.HTML("<b>Save this run to the history</b> "
                   f"<span style='color:#5a6473'>({html.escape(str(self.history_dir))})</span>"),
            row("title", self.title_box), row("change", self.change_box),
            w.HBox([self.save_button, self.save_status]),
        ], layout=w.Layout(flex="1 1 auto", padding="0 0 0 16px"))
        log = w.Accordion(children=[self.log_view], titles=("worker log (stderr of the last run)",))
        header = w.HTML("<h3 style='margin:4px 0'>rwkvlab lab: faster, and still right?</h3>"
                        "<span style='color:#5a6473'>Each run is a fresh worker process "
                        "(<code>rwkvlab bench --json --no-save</code>): a driver crash costs the run, "
                        "never the kernel.</span>")
        body = w.HBox([controls, results])
        body.add_class("rwkvlab-controls")
        self.widget = w.VBox([header, body, self.plot, log])
        self.widget.add_class("rwkvlab-panel")
        self._on_source({"new": self.source.value})

    def session_points(self) -> pd.DataFrame:
        """This session's runs as the live plot draws them (``plots.SESSION_COLUMNS``)."""
        rows = [{
            "number": r.number, "timestamp": r.record.timestamp, "model": r.record.model, "gpu": r.record.gpu,
            "change": r.record.change, "quality_hash": r.record.quality_hash,
            "output": r.comparison.output.verdict, "logits": r.comparison.logits.verdict,
            "prefill_tps": r.record.prefill_tps, "generation_tps": r.record.generation_tps,
            "wrong": r.comparison.output.verdict == "changed" or r.comparison.logits.verdict == "too large",
        } for r in self.runs]
        return pd.DataFrame(rows, columns=list(plots.SESSION_COLUMNS))

    def plot_figure(self):
        """The live plot's figure now: the history and this session's runs."""
        return plots.live_figure(self.history, self.history_verdicts, self.session_points())

    def _draw_plot(self) -> None:
        plots.show_live(self.plot, self.plot_figure())

    def _backend_options(self) -> list[tuple[str, str]]:
        by_backend: dict[str, list[str]] = {}
        for a in self.adapters:
            label = f"{a['name']} ({a['adapter_type']})"
            if label not in by_backend.get(a["backend"], []):
                by_backend.setdefault(a["backend"], []).append(label)
        options = [("auto: wgpu's best adapter (a discrete GPU first)", "auto")]
        options += [(f"{b}: {', '.join(names)}", b) for b, names in sorted(by_backend.items())]
        return options

    def _on_source(self, change: dict) -> None:
        file = change["new"] == "file"
        self._file_row.layout.display = None if file else "none"
        self._preset_row.layout.display = "none" if file else None

    def _repr_mimebundle_(self, **kwargs) -> dict:
        # The live widget for JupyterLab, and a static snapshot for places without a widget
        # manager (nbconvert's HTML falls back to text/html when no widget state is stored).
        bundle = self.widget._repr_mimebundle_(**kwargs) or {}
        bundle["text/plain"] = "rwkvlab lab panel (a live widget: run this notebook in JupyterLab to use it)"
        bundle["text/html"] = self.snapshot_html()
        return bundle

    # --- reading the widgets ----------------------------------------------------------------

    def configure(self, **values: Any) -> "Panel":
        """Set widgets from code: ``model`` (a preset name or a GGUF path), ``fmt``, ``weights``,
        ``path``, ``runtime``, ``backend``, ``fusions`` (names, "all" or "none"), ``chunk``, ``gemm_min_tokens``,
        ``tuning``, ``prefill``, ``generate``,
        ``warmup``, ``repeat``, ``reference``, ``baseline`` (a key of :meth:`baseline_choices`),
        ``title``, ``change``. Returns the panel."""
        simple = {"fmt": self.fmt, "weights": self.weights, "path": self.path, "runtime": self.runtime,
                  "backend": self.backend,
                  "chunk": self.chunk, "gemm_min_tokens": self.gemm_min_tokens, "tuning": self.tuning,
                  "prefill": self.prefill, "generate": self.generate, "warmup": self.warmup,
                  "repeat": self.repeat, "reference": self.reference, "baseline": self.baseline,
                  "title": self.title_box, "change": self.change_box}
        for key, value in values.items():
            if key == "model":
                if value in PRESETS:
                    self.source.value, self.preset.value = "preset", value
                else:
                    self.source.value, self.gguf.value = "file", str(value)
            elif key == "fusions":
                names = set(FUSIONS) if value == "all" else set() if value in ("none", None) else set(value)
                unknown = sorted(names - set(FUSIONS))
                if unknown:
                    raise LabError(f"unknown fusion(s) {unknown}; available: {', '.join(FUSIONS)}")
                for name, box in self.fusion_boxes.items():
                    box.value = name in names
            elif key in simple:
                widget = simple[key]
                allowed = [v for _, v in widget.options] if key in ("backend", "baseline") else \
                    list(getattr(widget, "options", []))
                if allowed and value not in allowed:
                    raise LabError(f"{key}={value!r} is not offered here; available: "
                                   f"{', '.join(map(str, allowed))}")
                widget.value = value
            else:
                raise LabError(f"unknown setting {key!r}; settings: model, fusions, {', '.join(simple)}")
        return self

    def model_choice(self) -> ModelChoice:
        """The model the widgets name."""
        if self.source.value == "file":
            if not self.gguf.value.strip():
                raise LabError("no GGUF file given: type its path, or pick a synthetic preset")
            return ModelChoice(preset=None, path=self.gguf.value.strip())
        return ModelChoice(preset=self.preset.value, fmt=self.fmt.value)

    def options(self) -> Options:
        """The engine options the widgets name (validated by ``Options``)."""
        fusions = frozenset(name for name, box in self.fusion_boxes.items() if box.value)
        return Options(runtime=self.runtime.value, backend=self.backend.value, path=self.path.value, weights=self.weights.value,
                       fusions=fusions, chunk=int(self.chunk.value), gemm_min_tokens=int(self.gemm_min_tokens.value),
                       tuning=self.tuning.value)

    def settings(self) -> BenchSettings:
        """The benchmark lengths the widgets name."""
        return BenchSettings(prefill=int(self.prefill.value), generate=int(self.generate.value),
                             warmup=int(self.warmup.value), repeat=int(self.repeat.value),
                             reference=bool(self.reference.value))

    def command(self) -> list[str]:
        """The worker command line Run would start."""
        return worker_command(self.model_choice(), self.options(), self.settings(), self.history_dir, self.python)

    # --- running ----------------------------------------------------------------------------

    def start(self) -> threading.Thread | None:
        """What the Run button does: :meth:`run` in a worker thread (None if one is running)."""
        if self._thread is not None and self._thread.is_alive():
            return None
        self._thread = threading.Thread(target=self._run_quietly, name="rwkvlab-panel-run", daemon=True)
        self._thread.start()
        return self._thread

    def _run_quietly(self) -> None:
        try:
            self.run()
        except LabError:
            pass  # already on the panel's status line
        except Exception:  # noqa: BLE001  (a thread has nobody else to tell)
            self._status("internal error: " + traceback.format_exc().strip().splitlines()[-1], error=True)
            self.log.append(traceback.format_exc())
            self._show_log()

    def stop(self) -> None:
        """Stop the running worker (its run then fails with "killed by signal")."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def wait(self, timeout: float | None = None) -> None:
        """Wait for a run started by :meth:`start` (the Run button) to finish."""
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> BenchRecord:
        """Benchmark the current settings in a worker process and show the result.

        Synchronous (the Run button calls it from a thread). Returns the record; raises
        :class:`LabError` with the reason when the settings are invalid or the worker failed
        (the reason is also on the panel's status line and in ``last_error``).
        """
        if not self._busy.acquire(blocking=False):
            raise LabError("a run is already in progress; wait for it or press Stop")
        try:
            self.last_error = None
            try:
                cmd = self.command()
                settings = self.settings()
            except (LabError, OptionsError, bench.BenchError) as err:
                raise self._fail(str(err)) from None
            self.run_button.disabled, self.stop_button.disabled = True, False
            self.save_button.disabled = True
            self.progress.value, self.progress.max, self.progress.bar_style = 0, bench_steps(settings), ""
            self._status(f"running {self.model_choice().label} ({self.options().text()}) in a worker process ...")
            self.log = []
            result = run_worker(cmd, timeout=self.timeout, on_progress=self._on_progress,
                                on_line=self.log.append, on_start=self._set_proc)
            self._proc = None
            self.log = list(result.stderr)
            self._show_log()
            if result.record is None:
                self.progress.bar_style = "danger"
                crashed = result.returncode is not None and result.returncode < 0
                raise self._fail(f"the worker failed ({result.error or 'no result'})"
                                 + ("; the notebook kernel is fine" if crashed else ""))
            return self._show_result(result.record)
        finally:
            self.run_button.disabled, self.stop_button.disabled = False, True
            self._busy.release()

    def _set_proc(self, proc: subprocess.Popen) -> None:
        self._proc = proc

    def _on_progress(self, n: int, total: int, stage: str) -> None:
        if n >= 0:
            self.progress.max = max(total, 1)
            self.progress.value = min(n, self.progress.max)
        self._status(f"running: {stage}")

    def judged_runs(self) -> pd.DataFrame:
        """The runs a new one's output is judged against: the history and this session's
        unsaved runs (saved ones are in the history already)."""
        frames = [bench.history_frame(r.record, "this session") for r in self.runs if not r.saved]
        frames = [f for f in [self.history, *frames] if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def _show_result(self, record: BenchRecord) -> BenchRecord:
        baseline = self.resolve_baseline(self.baseline.value, record)
        comparison = compare(record, baseline, self.history_noise, self.judged_runs())
        run = SessionRun(len(self.runs) + 1, record, comparison)
        self.runs.append(run)
        self.last_record, self.last_comparison, self.result_table = record, comparison, comparison.table
        self.result.value = result_html(comparison, run.number)
        self._draw_plot()
        chosen = self.baseline.value
        self.baseline.options = self.baseline_choices()
        self.baseline.value = chosen
        self.title_box.value, self.change_box.value = record.title, record.change
        self.save_button.disabled = False
        self.progress.value = self.progress.max
        wrong = comparison.output.verdict == "changed" or comparison.logits.verdict == "too large"
        self.progress.bar_style = "danger" if wrong else "success"
        self._status(f"run {run.number} done: generation {record.generation_tps:.2f} tok/s, output "
                     f"{comparison.output.verdict}, logits {comparison.logits.verdict}", error=wrong)
        return record

    def _fail(self, message: str) -> LabError:
        self.last_error = message
        self._status(message, error=True)
        return LabError(message)

    def _status(self, text: str, error: bool = False) -> None:
        # Plain text only, always escaped: status lines carry model names, file paths and the
        # worker's error lines, any of which can hold markup the widget would render (a model
        # file's metadata could run a script). Nothing shown here needs markup of its own.
        colour = "#b01c1c" if error else "#2d3748"
        self.status.value = f"<span style='color:{colour}'>{html.escape(text)}</span>"

    def _show_log(self) -> None:
        self.log_view.value = ("<pre style='font-size:11px;max-height:260px;overflow:auto'>"
                               + html.escape("\n".join(self.log[-KEPT_LINES:])) + "</pre>")

    # --- saving -----------------------------------------------------------------------------

    def save(self, title: str | None = None, change: str | None = None) -> str:
        """Append the last run to the history (``bench.save_bench``): under ``title`` (default:
        the title box, else the model file's stem) with ``change`` as its heading (default: the
        change box, else its options). Returns ``"<file>:<line>"``."""
        if not self.runs:
            raise self._save_fail("nothing to save yet: press Run first")
        run = self.runs[-1]
        if run.saved:
            raise self._save_fail(f"run {run.number} is already saved at {run.saved}")
        title = (title if title is not None else self.title_box.value).strip() or run.record.title
        change = (change if change is not None else self.change_box.value).strip() or run.record.change
        record = dataclasses.replace(run.record, title=title, change=change)
        path = bench.history_file(record.gpu, self.history_dir)
        try:
            line = bench.save_bench(record, path)
        except (OSError, ValueError) as err:
            raise self._save_fail(f"could not save to {path}: {err}") from None
        run.record, run.saved = record, f"{path.name}:{line}"
        self.last_record = record
        self._load_history()
        chosen = self.baseline.value
        self.baseline.options = self.baseline_choices()
        self.baseline.value = chosen if chosen in [k for _, k in self.baseline.options] else "auto"
        self.save_button.disabled = True
        self.save_status.value = f"<span style='color:#22863a'>saved: {html.escape(str(path))}:{line}</span>"
        return run.saved

    def _save_clicked(self) -> None:
        try:
            self.save()
        except LabError:
            pass  # shown on the panel

    def _save_fail(self, message: str) -> LabError:
        self.save_status.value = f"<span style='color:#b01c1c'>{html.escape(message)}</span>"
        return LabError(message)

    # --- what a notebook shows without a kernel ---------------------------------------------

    def session_table(self) -> pd.DataFrame:
        """This session's runs, one row each: options, speeds, output and logit verdicts."""
        rows = []
        for r in self.runs:
            rec, cmp_ = r.record, r.comparison
            rows.append({
                "run": r.number, "model": rec.model, "path": rec.options.path, "weights": rec.options.weights,
                "fusions": fusions_text(rec.options.fusions), "dispatches/token": rec.dispatches_per_token,
                "load ms": rec.load_ms, "prefill tok/s": rec.prefill_tps, "generation tok/s": rec.generation_tps,
                "quality hash": rec.quality_hash, "logit error": rec.logit_error,
                "baseline": cmp_.baseline.key if cmp_.baseline else "none",
                "output": cmp_.output.verdict, "logits": cmp_.logits.verdict,
                "generation verdict": cmp_.speed["generation"].verdict,
                "saved": r.saved or "",
            })
        return pd.DataFrame(rows).set_index("run") if rows else pd.DataFrame()

    def snapshot_html(self) -> str:
        """A static picture of the panel: its settings and its last result (no kernel needed)."""
        try:
            model = self.model_choice().label
        except LabError as err:
            model = str(err)
        o = self.options()
        s = self.settings()
        settings = (f"model {model} · {o.text()} ({self.backend.label}) · prefill {s.prefill}, generate "
                    f"{s.generate}, {s.warmup} warmup + {s.repeat} timed rounds · baseline: {self.baseline.label}")
        result = (result_html(self.last_comparison, len(self.runs)) if self.last_comparison
                  else "<em>No run yet.</em>")
        return ("<div class='rwkvlab-snapshot' style='border:1px solid #d9dee4;border-radius:6px;padding:8px'>"
                "<b>rwkvlab lab panel</b> <span style='color:#5a6473'>(a static snapshot: the live panel "
                "needs a running kernel; open the notebook in JupyterLab with <code>make lab</code>)</span>"
                f"<p style='font-size:12px'>{html.escape(settings)}</p>{result}</div>")

    def show_snapshot(self) -> None:
        """Display the snapshot and a static copy of the live plot (for exported HTML reports)."""
        from IPython.display import HTML, display

        display(HTML(self.snapshot_html()))
        self.plot_figure().show()
