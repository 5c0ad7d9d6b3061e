"""Where a generation step spends its GPU time: microseconds per token for every kernel.

Method. The engine's step plan (one token: embed, every layer, head, argmax) is encoded as it
runs in `Engine.generate`, with a GPU timestamp written before each dispatch and after the last
one (feature ``timestamp-query-inside-passes``). The time of a dispatch is the gap between its
timestamp and the next one, so it includes the barrier wgpu puts after it: what the token
really pays for that kernel. Adapters with only ``timestamp-query`` get one compute pass per
dispatch with begin/end timestamps (adds a pass boundary per dispatch: the sum then exceeds a
real step). Without timestamps the profile says so and reports the wall time per token only.

Rows are grouped by the dispatch label with its layer prefix removed (``L7.att.wkv`` ->
``att.wkv``), so a row is "this kernel in every layer", averaged over the profiled tokens.
wgpu (since v25) converts timestamps to nanoseconds on every backend, so ticks are ns.

Timestamps between dispatches cost time themselves (on an H200 a 2.9B step sums to 4.5 ms of
GPU time with them, and runs in 3.0 ms without). `ablate` (``rwkvlab profile --ablate``)
measures without them: the step's wall time per token as `Engine.generate` runs it, then
again with each op left out of the plan (what the token pays for that op, its dispatches'
gaps included), and a chain of the step's cheapest dispatch repeated (the floor one more
dependent dispatch costs). Leaving ops out feeds the rest other numbers, not other work, so
the times stand; the state is reset afterwards.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rwkvlab import gpu as gpu_runtime
from rwkvlab import kernels as kn

_LAYER = re.compile(r"^L\d+\.")


@dataclass
class Profile:
    """A step's per-kernel GPU time.

    table: one row per kernel group: ``kernel`` (shader entry), ``label`` (op, layer-free),
      ``calls`` (dispatches per token), ``us_per_token``, ``share`` (of the GPU step time);
      sorted by time, empty when no timestamps were available.
    method: how it was measured (see the module docstring).
    gpu_us_per_token: the sum of the table (None without timestamps).
    wall_us_per_token: host wall time per generated token, from Engine.generate.
    dispatches_per_token: length of the step plan.
    """
    table: pd.DataFrame
    method: str
    gpu_us_per_token: float | None
    wall_us_per_token: float
    dispatches_per_token: int
    adapter: str

    @property
    def has_timestamps(self) -> bool:
        return self.gpu_us_per_token is not None

    def text(self, top: int | None = None) -> str:
        """The profile as a readable table with a header line."""
        head = (f"{self.adapter}: {self.dispatches_per_token} dispatches/token, wall "
                f"{self.wall_us_per_token:.1f} us/token")
        if not self.has_timestamps:
            return head + f"\n({self.method}: no per-kernel GPU times on this adapter)"
        head += f", GPU {self.gpu_us_per_token:.1f} us/token ({self.method})"
        rows = self.table if top is None else self.table.head(top)
        lines = [head, f"{'kernel':<14} {'op':<24} {'calls':>5} {'us/token':>10} {'share':>7}"]
        for r in rows.itertuples():
            lines.append(f"{r.kernel:<14} {r.label:<24} {r.calls:>5} {r.us_per_token:>10.2f} "
                         f"{r.share:>6.1%}")
        return "\n".join(lines)


def profile(engine, n_tokens: int = 16, prompt: tuple[int, ...] = (0,), chunk: int | None = None) -> Profile:
    """Profile `n_tokens` generation steps of `engine`, or with `chunk`, `n_tokens` runs of a
    prefill chunk of that many tokens (times then per prompt token). The state is reset first
    and after."""
    if n_tokens < 1:
        raise ValueError("n_tokens must be at least 1")
    engine.reset()
    if chunk is None:
        engine.generate(list(prompt), n_tokens + 1)  # warm up; also leaves T = 1 set for the step
        stats = engine.last_generate
        wall_us = stats.generate_seconds / max(stats.n_generated - 1, 1) * 1e6
        plan, per = engine.plan(1, "last", argmax=True), 1
    else:
        # A prefill of exactly one chunk leaves its token ids and T in place for the replays.
        ids = [(7 * i + 1) % engine.spec.n_vocab for i in range(chunk)]
        engine.prefill(ids)
        t0 = time.perf_counter()
        engine.prefill(ids)
        wall_us = (time.perf_counter() - t0) / chunk * 1e6
        plan, per = engine.plan(chunk, "last"), chunk
    gpu = engine.gpu
    if gpu.has("timestamp-query-inside-passes"):
        method, ticks = "timestamps inside the pass", _inside_pass(gpu, plan, n_tokens)
    elif gpu.has("timestamp-query"):
        method, ticks = "one pass per dispatch", _pass_per_dispatch(gpu, plan, n_tokens)
    else:
        method, ticks = "wall time only", None
    engine.reset()

    if ticks is None:
        table = pd.DataFrame(columns=["kernel", "label", "calls", "us_per_token", "share"])
        return Profile(table, method, None, wall_us, len(plan), f"{gpu.info.label} on {gpu.runtime}")
    table = _group(plan, ticks / 1000.0 / per)
    return Profile(table, method, float(table["us_per_token"].sum()), wall_us, len(plan), f"{gpu.info.label} on {gpu.runtime}")


def _group(plan: kn.Plan, us: np.ndarray) -> pd.DataFrame:
    """[n_tokens, D] microseconds per dispatch -> one row per (kernel, layer-free label)."""
    per_dispatch = us.mean(axis=0)
    df = pd.DataFrame({
        "kernel": [d.kernel.name for d in plan],
        "label": [_LAYER.sub("", d.label) for d in plan],
        "us": per_dispatch,
    })
    table = (df.groupby(["kernel", "label"], sort=False)
               .agg(calls=("us", "size"), us_per_token=("us", "sum"))
               .reset_index()
               .sort_values("us_per_token", ascending=False, ignore_index=True))
    table["share"] = table["us_per_token"] / table["us_per_token"].sum()
    return table


@dataclass
class Ablation:
    """What each op of a generation step costs in place, measured by leaving it out.

    table: one row per op (layer-free label): ``calls`` (dispatches per token),
      ``without_us`` (step time saved per token without them), ``per_call_us``; sorted by
      time saved.
    step_us: the whole step's wall time per token (steps submitted as generate submits them).
    floor_us: per dispatch, a chain of the step's cheapest dispatch (the embedding gather)
      repeated as many times as the step has dispatches.
    """
    table: pd.DataFrame
    step_us: float
    floor_us: float
    dispatches_per_token: int
    adapter: str

    def text(self, top: int | None = None) -> str:
        head = (f"{self.adapter}: {self.dispatches_per_token} dispatches/token, step "
                f"{self.step_us:.1f} us/token ({1e6 / self.step_us:.1f} tok/s); a dispatch costs at least "
                f"{self.floor_us:.2f} us ({self.floor_us * self.dispatches_per_token / self.step_us:.0%} "
                f"of the step at this count)")
        rows = self.table if top is None else self.table.head(top)
        lines = [head, f"{'op':<24} {'calls':>5} {'without: us/token':>18} {'us/call':>8}"]
        for r in rows.itertuples():
            lines.append(f"{r.label:<24} {r.calls:>5} {r.without_us:>18.1f} {r.per_call_us:>8.2f}")
        return "\n".join(lines)


def ablate(engine, n_tokens: int = 64, repeat: int = 3) -> Ablation:
    """Time `n_tokens` generation steps as generate runs them (median of `repeat`), then the
    same with each op left out, then a chain of embedding gathers as long as the step."""
    if n_tokens < 1 or repeat < 1:
        raise ValueError("n_tokens and repeat must be at least 1")
    engine.reset()
    engine.generate([0], 2)  # pipelines warm; T = 1 and a token id in place
    step = engine.plan(1, "last", argmax=True)

    def per_token(dispatches) -> float:
        plan = kn.Plan(dispatches)
        times = []
        for _ in range(repeat):
            engine.wait()
            t0 = time.perf_counter()
            engine.run_steps(plan, n_tokens)
            engine.wait()
            times.append((time.perf_counter() - t0) / n_tokens * 1e6)
        return float(np.median(times))

    full = per_token(step)
    labels = [_LAYER.sub("", d.label) for d in step]
    rows = []
    for label in dict.fromkeys(labels):
        calls = labels.count(label)
        saved = full - per_token([d for d, lb in zip(step, labels) if lb != label])
        rows.append(dict(label=label, calls=calls, without_us=saved, per_call_us=saved / calls))
    cheapest = next(d for d, lb in zip(step, labels) if lb == "embed")
    floor = per_token([cheapest] * len(step)) / len(step)
    engine.reset()
    table = pd.DataFrame(rows).sort_values("without_us", ascending=False, ignore_index=True)
    return Ablation(table, full, floor, len(step), f"{engine.gpu.info.label} on {engine.gpu.runtime}")


def _resolve(gpu, query_set, count: int) -> np.ndarray:
    """Resolve `count` timestamps of a query set and read them back (u64 ns)."""
    dev = gpu.device
    resolved = dev.create_buffer(size=count * 8, usage=gpu_runtime.QUERY_RESOLVE | gpu_runtime.COPY_SRC)
    enc = dev.create_command_encoder()
    enc.resolve_query_set(query_set, 0, count, resolved, 0)
    dev.queue.submit([enc.finish()])
    data = np.frombuffer(dev.queue.read_buffer(resolved), dtype=np.uint64).copy()
    resolved.destroy()
    return data


def _inside_pass(gpu, plan: kn.Plan, n_tokens: int) -> np.ndarray:

    D = len(plan)
    dev = gpu.device
    qs = dev.create_query_set(type="timestamp", count=D + 1)
    out = np.empty((n_tokens, D))
    for t in range(n_tokens):
        enc = dev.create_command_encoder()
        cp = enc.begin_compute_pass()
        for i, d in enumerate(plan):
            gpu_runtime.write_timestamp(gpu, cp, qs, i)
            kn.encode(cp, [d])
        gpu_runtime.write_timestamp(gpu, cp, qs, D)
        cp.end()
        dev.queue.submit([enc.finish()])
        stamps = _resolve(gpu, qs, D + 1).astype(np.float64)
        out[t] = np.diff(stamps)
    qs.destroy()
    return out


def _pass_per_dispatch(gpu, plan: kn.Plan, n_tokens: int) -> np.ndarray:

    D = len(plan)
    dev = gpu.device
    qs = dev.create_query_set(type="timestamp", count=2 * D)
    out = np.empty((n_tokens, D))
    for t in range(n_tokens):
        enc = dev.create_command_encoder()
        for i, d in enumerate(plan):
            cp = enc.begin_compute_pass(timestamp_writes={
                "query_set": qs, "beginning_of_pass_write_index": 2 * i, "end_of_pass_write_index": 2 * i + 1})
            kn.encode(cp, [d])
            cp.end()
        dev.queue.submit([enc.finish()])
        stamps = _resolve(gpu, qs, 2 * D).astype(np.float64).reshape(D, 2)
        out[t] = stamps[:, 1] - stamps[:, 0]
    qs.destroy()
    return out


def cli_profile(args) -> int:
    """`rwkvlab profile`: load a model and print its per-kernel step profile."""
    import sys

    from rwkvlab.engine import load
    from rwkvlab.options import OptionsError, from_args
    from rwkvlab.synth import model_from_args

    try:
        if args.ablate and args.prefill_chunk:
            raise ValueError("--ablate times generation steps; leave out --prefill-chunk")
        engine = load(model_from_args(args), from_args(args), progress=not args.no_progress)
        t0 = time.perf_counter()
        if args.ablate:
            result = ablate(engine, n_tokens=args.tokens)
        else:
            result = profile(engine, n_tokens=args.tokens, chunk=args.prefill_chunk)
    except (OptionsError, OSError, ValueError, RuntimeError) as e:
        print(f"rwkvlab profile: {e}", file=sys.stderr)
        return 2
    print(result.text(top=args.top))
    print(f"(profiled {args.tokens} tokens in {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0
