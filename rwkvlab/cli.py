"""The `rwkvlab` command: one subcommand per job, each handler imported only when used.

Argument definitions live here so `rwkvlab --help` is one readable page; the work lives in the
module named next to each command (history tools never import wgpu).
"""
from __future__ import annotations

import argparse
import importlib
import sys

PRESETS = ("tiny", "0.1b", "0.4b", "1.5b", "2.9b", "7.2b")
SYNTH_FORMATS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")


def _history(sub) -> None:
    p = sub.add_parser(
        "history",
        help="read benchmark history files and print one row per run",
        description="Read benchmark history Markdown files (default: data/benchmarks/) and print "
        "one row per run with its verdicts. Malformed entries are reported as warnings naming "
        "file:line, never dropped silently.",
    )
    p.add_argument("paths", nargs="*", default=["data/benchmarks"], help="files or folders (default: data/benchmarks)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format (default: table)")
    p.set_defaults(handler="rwkvlab.report:cli_history")


def _report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="write a standalone HTML report (summary, verdicts, plots) of the history",
        description="Write one self-contained HTML file with a summary, the verdict table and the "
        "plots of the benchmark history. plotly.js is inlined, so it renders offline.",
    )
    p.add_argument("paths", nargs="*", default=["data/benchmarks"], help="files or folders (default: data/benchmarks)")
    p.add_argument("-o", "--output", default="report.html", help="HTML file to write (default: report.html)")
    p.set_defaults(handler="rwkvlab.report:cli_report")


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
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="GGUF file to run")
    src.add_argument("--preset", choices=PRESETS, help="synthetic model preset (default: tiny when no --model)")
    p.add_argument("--format", dest="synth_format", choices=SYNTH_FORMATS, default="f32",
                   help="weight format of the synthetic preset (default: f32)")
    p.add_argument("--backend", default="auto", help="wgpu backend: auto, vulkan, metal, dx12, gl (default: auto)")
    p.add_argument("--path", default="webgpu", help="kernel path: webgpu (portable) or native (default: webgpu)")
    p.add_argument("--weights", default="native", help="native (file format on GPU) or f16 (dequantize at load)")


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
    p.add_argument("--preset", choices=PRESETS, required=True, help="model size")
    p.add_argument("--format", choices=SYNTH_FORMATS, default="f16", help="tensor format mix (default: f16)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("-o", "--output", required=True, help="GGUF file to write")
    p.set_defaults(handler="rwkvlab.synth:cli_synth")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rwkvlab",
        description="rwkvlab: did my change make the RWKV-7 engine faster, and is its output still right?",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_history, _report, _info, _generate, _synth):
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


if __name__ == "__main__":
    sys.exit(main())
