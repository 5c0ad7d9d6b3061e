"""The `rwkvlab` command: one subcommand per job, each handler imported only when used.

Argument definitions live here so `rwkvlab --help` is one readable page; the work lives in the
module named next to each command (history tools never import wgpu).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from rwkvlab import options as opts
from rwkvlab.synth import FORMATS, PRESETS  # the one source of presets and formats (no wgpu)


def _history_paths(p) -> None:
    p.add_argument("paths", nargs="*", default=["data/benchmarks"],
                   help="history files or folders (default: data/benchmarks)")


def _history(sub) -> None:
    p = sub.add_parser(
        "history",
        help="read benchmark history files and print one row per run",
        description="Read benchmark history Markdown files (default: data/benchmarks/) and print "
        "one row per run with its verdicts. Malformed entries are reported as warnings naming "
        "file:line, never dropped silently.",
    )
    _history_paths(p)
    p.add_argument("--format", choices=("table", "csv", "json", "speed-table"), default="table",
                   help="output format: a table per run, csv, json, or speed-table: the README's Markdown "
                   "speed table (the newest run of the default options per GPU, model, runtime and lengths, "
                   "with the weight bandwidth its generation rate implies) (default: table)")
    p.set_defaults(handler="rwkvlab.report:cli_history")


def _report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="write a standalone HTML report (summary, verdicts, plots) of the history",
        description="Write one self-contained HTML file: the summary and what changed first, then one "
        "section per GPU with its plots, then every run in a table that sorts and filters in the page. "
        "plotly.js and the table's script are inlined, so it works offline. \"What changed\" lists the "
        "runs newer than the newest run of the report being overwritten (-o; the page records it), or "
        "those after --since; with neither (a first report), the last day of recording: the runs within "
        "24 hours of the newest run.",
    )
    _history_paths(p)
    p.add_argument("-o", "--output", help="HTML file to write (default: report.html; lab-report.html with --notebooks)")
    p.add_argument("--notebooks", nargs="*", metavar="NOTEBOOK",
                   help="instead: execute the lab's notebooks (default: all of notebooks/*.ipynb) and write them "
                   "as one offline HTML page; the history report links to it when it sits beside it")
    p.add_argument("--timeout", type=float, default=600.0, help="with --notebooks: seconds one cell may take (default: 600)")
    p.add_argument("--since", metavar="WHEN", help="\"what changed\" lists the runs after this ISO 8601 date or "
                   "time (UTC unless it names a zone), e.g. 2026-01-03 or 2026-01-03T14:00 (default: runs newer "
                   "than the report being overwritten)")
    p.set_defaults(handler="rwkvlab.report:cli_report")


def _compare(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="two runs, titles or option sets side by side, with verdicts (like asv compare)",
        description="Compare two sets of runs of the benchmark history: B's medians against A's, per "
        "model, GPU and lengths both ran, with the lab's verdicts (noise from the history).",
        epilog="selectors: FILE.md:LINE (one run), title=TEXT (the runs under ## TEXT), FIELD=VALUE[,...] "
        "(runs whose recorded options or columns match: path=native,fusions=none or change=...)\n"
        "example: rwkvlab compare 'fusions=none' 'fusions=default' data/benchmarks/nvidia-h100-80gb-hbm3.md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("a", metavar="A", help="the runs compared with (a selector)")
    p.add_argument("b", metavar="B", help="the runs judged (a selector)")
    _history_paths(p)
    p.add_argument("--fail-on-regression", action="store_true",
                   help="exit 1 when B regressed beyond noise on any metric or its output differs from A's")
    p.add_argument("-v", "--verbose", action="store_true", help="also print why each verdict was given")
    p.set_defaults(handler="rwkvlab.compare:cli_compare")


def _info(sub) -> None:
    p = sub.add_parser(
        "info",
        help="print a GGUF file's model spec and per-tensor type table",
        description="Print the RWKV-7 spec (C, L, F, N, H, LoRA ranks, vocab, eps) read from a GGUF "
        "file and a table of its tensors with ggml type, shape and size.",
    )
    p.add_argument("file", help="GGUF file")
    p.set_defaults(handler="rwkvlab.gguf:cli_info")


def _model_args(p) -> None:
    """The model (--model, or --preset with --format) and every Options field, for each command
    that runs the engine: they all start from the same defaults and honour every field."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="GGUF file to run")
    src.add_argument("--preset", choices=list(PRESETS), help="synthetic model preset (default: tiny when no --model)")
    p.add_argument("--format", dest="synth_format", choices=list(FORMATS), default="f32",
                   help="weight format of the synthetic preset (default: f32)")
    opts.add_arguments(p)


def _generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="greedy text generation from a GGUF file or a synthetic preset",
        description="Load a model (a GGUF file, or a synthetic preset; default: the embedded tiny "
        "preset), prefill the prompt and generate greedily on the GPU. Prints the text and tok/s.",
    )
    _model_args(p)
    p.add_argument("--prompt", default="Hello", help="prompt text (default: Hello)")
    p.add_argument("-n", type=int, default=64, help="tokens to generate (default: 64)")
    p.set_defaults(handler="rwkvlab.engine:cli_generate")


def _synth(sub) -> None:
    p = sub.add_parser(
        "synth",
        help="write a random RWKV-7 GGUF file in the real shapes of a model size",
        description="Write a synthetic RWKV-7 GGUF file (random weights in RWKV-like ranges, real "
        "shapes of the chosen size, every metadata key and the tokenizer as llama.cpp writes them). "
        "Deterministic from --seed.",
    )
    p.add_argument("--preset", choices=list(PRESETS), required=True, help="model size")
    p.add_argument("--format", choices=list(FORMATS), default="f16", help="tensor format mix (default: f16)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("-o", "--output", required=True, help="GGUF file to write")
    p.set_defaults(handler="rwkvlab.synth:cli_synth")


BENCH_PROTOCOL = """\
protocol:
  prompt      a fixed English paragraph (rwkvlab.bench.PROMPT_TEXT) in the model's own tokens,
              repeated or cut to exactly --prefill tokens
  load        file open to first token ready: engine load + one step whose logits are read back
  prefill     after reset(), the whole prompt; timed until its last logits are on the host
  generation  after reset() and an untimed prefill of all but the last prompt token,
              generate(last token, --generate): that many one-token steps, each greedy token
              picked by a GPU argmax and fed back on the GPU; timed until the ids are back
  rates       --warmup untimed rounds, then --repeat timed ones; MEDIAN tok/s [min .. max]
  output      quality hash of the 32 greedy tokens after the prompt (first 16 shown), compared
              with the previous run of the same model file in the history file; max |logit
              error| after the prompt vs the float64 NumPy reference (cached on disk), within
              1e-3 when the GPU reads every tensor as stored, 0.05 after f16 rounding at load
              or with prefill GEMMs on the matrix units (tuning gemm_sgmat: f16 inputs);
              --no-reference writes "not checked"
  history     appended to <history-dir>/<file>.md (seed format + Backend, Path, Weights,
              Fusions, Chunk, Tuning, Dispatches/token, Load phases, Commit, Logit error
              rows), every raw sample and each load phase's span to <file>.md.jsonl beside it
"""


def _bench_run_args(p) -> None:
    """Bench settings and history flags shared by `bench` and `sweep`."""
    p.add_argument("--title", help="## section of the history the run goes under (default: the model file's stem)")
    p.add_argument("--change", help="what changed, the run's ### heading (default: the options)")
    p.add_argument("--file", help="history file name without .md (default: the GPU name, slugified)")
    p.add_argument("--history-dir", default="data/benchmarks", help="folder of history files (default: data/benchmarks)")
    p.add_argument("--prefill", type=int, default=128, help="prompt tokens (default: 128)")
    p.add_argument("--generate", type=int, default=64, help="generated tokens per timed round (default: 64)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: 2)")
    p.add_argument("--repeat", type=int, default=3, help="timed rounds; the median is reported (default: 3)")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the NumPy reference check (for models too big for the host): 'not checked'")
    p.add_argument("--no-save", action="store_true", help="print only; append nothing to the history")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


def _bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="time one engine configuration and check its output; append the run to the history",
        description="Load a model (a GGUF file, or a synthetic preset; default: tiny), time load, "
        "prefill and greedy generation, check the output (quality hash and logits against the NumPy "
        "reference) and append the run to the benchmark history. Exit status: 0 done, 1 the logit "
        "check failed (the run is still saved), 2 it could not run (nothing saved), 3 it was measured "
        "but the history could not be written (nothing saved; the numbers are printed), 4 a --fail-on "
        "gate failed (the run is saved).",
        epilog=BENCH_PROTOCOL,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _model_args(p)
    _bench_run_args(p)
    p.add_argument("--fail-on", metavar="GATES", default="",
                   help="exit 4 (after saving) when the run fails a gate: 'output' (its quality hash differs "
                   "from its baseline's), 'regression' (a speed beyond noise slower than its title's or "
                   "its history's runs), or both joined by ','; the verdicts are rwkvlab.verdicts', as "
                   "`rwkvlab history` and reports show them (for CI)")
    p.add_argument("--json", action="store_true", help="print the record as JSON on stdout (the summary goes to stderr)")
    p.add_argument("--replay", metavar="FILE.md:LINE",
                   help="run again exactly what a recorded run ran, from its record alone: its model file "
                   "(checked by content), resolved options and tuning, lengths and rounds; other engine flags "
                   "are ignored")
    p.add_argument("--events", action="store_true",
                   help="print each step of the protocol as a JSON line on stdout before the record: "
                   '{"event": "progress", "step": N, "steps": M, "stage": TEXT} (what the lab\'s worker reads)')
    p.set_defaults(handler="rwkvlab.bench:cli_bench")


def _sweep(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="bench the cross product of option values, each in a fresh process; name the best correct one",
        description="Run `rwkvlab bench` for every combination of the --vary values, each in a fresh "
        "subprocess (a driver crash costs one row), append every run to the history, print a table "
        "and the fastest generation among correct configurations: logit error within tolerance and "
        "the same quality hash as the unfused / webgpu / native-weights configuration (added to the "
        "sweep when the product lacks it). Options not varied keep the values given as for bench.",
        epilog="example: rwkvlab sweep --preset 0.1b --format q8_0 --vary path=webgpu,native "
        "--vary weights=native,f16 --vary fusions=none,all\n\n" + BENCH_PROTOCOL,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _model_args(p)
    _bench_run_args(p)
    p.add_argument("--vary", action="append", default=[], metavar="OPTION=V1,V2",
                   help="an option and its values (backend, path, weights, fusions, chunk, gemm_min_tokens, tuning; "
                   "tuning sets are separated by ';'); "
                   "repeatable; fusions values: none, all, a name, or names joined by +")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds one configuration may take before it is stopped (default: 1800)")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="run the configurations on a Dask LocalCluster of N worker processes on this machine, "
                   "one GPU resource each (default: 0, one at a time in this process: one GPU is best "
                   "measured alone)")
    p.add_argument("--scheduler", metavar="tcp://HOST:8786",
                   help="run the configurations on an existing Dask cluster (workers started with "
                   "--nthreads 1 --resources GPU=1); runs are appended here, to the file of the GPU each ran on")
    p.add_argument("--adapter", metavar="N[,N...]",
                   help="adapter number(s) as `python -m rwkvlab.gpu` lists them (0 first): one for a sweep here, "
                   "one per worker with --workers ($RWKVLAB_ADAPTER does the same for a worker started by hand)")
    p.set_defaults(handler="rwkvlab.sweep:cli_sweep")


def _profile(sub) -> None:
    p = sub.add_parser(
        "profile",
        help="per-kernel GPU time of one generation step (timestamp queries)",
        description="Load a model and time every kernel of a generation step with GPU timestamps: "
        "microseconds per token per kernel and its share of the step, grouped over layers. Without "
        "timestamp support it says so and reports the wall time per token. Timestamps cost time "
        "themselves; --ablate measures without them: the step, the step without each op (what that op "
        "costs in place) and the floor one more dispatch costs.",
    )
    _model_args(p)
    p.add_argument("--tokens", type=int, default=16, help="generation steps to profile (default: 16)")
    p.add_argument("--top", type=int, default=None, help="show only the N most expensive kernels")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="T",
                   help="profile a prefill chunk of T tokens instead of a generation step (times per token)")
    p.add_argument("--ablate", action="store_true",
                   help="time whole steps (--tokens per measurement, median of 3) with each op left out, "
                   "instead of timestamps between dispatches")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(handler="rwkvlab.profile:cli_profile")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rwkvlab",
        description="rwkvlab: did my change make the RWKV-7 engine faster, and is its output still right?",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_history, _report, _compare, _info, _generate, _synth, _profile, _bench, _sweep):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    module, func = args.handler.split(":")
    handler = getattr(importlib.import_module(module), func)
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `rwkvlab history | head` closed the pipe: not an error. Point stdout at devnull so the
        # interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
