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
# # Quickstart: load a model, generate text, benchmark it
#
# The lab's default model is the embedded synthetic **tiny** RWKV-7 (random weights in real
# RWKV-7 shapes: 2 layers, 256 wide, a 1024-token vocab), written to `~/.cache/rwkvlab/` on first
# use. Any GGUF file works the same way: `rwkvlab.load("path/to/model.gguf")`.
#
# Timings depend on the machine, so cells that print them are not compared by the notebook
# test (they start with `# NBVAL_IGNORE_OUTPUT`); everything else printed here (tokens, hashes,
# checks) is, and must come out the same on every run.

# %%
import rwkvlab
from rwkvlab.lab import prepare_kernel

prepare_kernel()  # keeps Mesa's adapter-scan noise out of cell outputs (see its docstring)

# %%
# NBVAL_IGNORE_OUTPUT
# Load time and the adapter's name depend on the machine.
engine = rwkvlab.load("tiny", progress=False)
print(f"loaded {engine.path.name} in {engine.load_seconds * 1000:.0f} ms on {engine.gpu.info.label}")

# %%
s = engine.spec
print(f"layers {s.n_layer}, embedding {s.n_embd}, heads {s.n_head} x {s.head_size}, vocab {s.n_vocab}")

# %% [markdown]
# ## Generate
# Greedy decoding on the GPU: each step's argmax is picked on the GPU and fed straight back.
# The same tokens must come out of the NumPy reference (`rwkvlab.reference`, float64 on the
# CPU, slow and obviously correct): that is what "output is still right" means here.

# %%
from rwkvlab.reference import Reference

prompt = engine.tokenizer.encode("The lighthouse keeper")
tokens = engine.generate(prompt, 24)
print("prompt tokens:", prompt)
print("generated:    ", tokens)
print("as text:      ", repr(engine.tokenizer.decode(tokens)))  # random weights: gibberish, but always the same
print("same tokens as the NumPy reference:", tokens == Reference(engine.model).generate(prompt, 24))

# %% [markdown]
# ## One benchmark
# `run_bench` follows the protocol of `rwkvlab bench` (see `rwkvlab bench --help`): load time,
# prefill and generation rates as the median of timed repeats, the quality hash of the 32
# greedy tokens after the prompt, and the logit error against the NumPy reference. Nothing is
# written to the history (the `--no-save` of the command line); `rwkvlab.bench.save_bench`
# would append it. Short lengths keep this quick on a software GPU.

# %%
from rwkvlab.bench import BenchSettings, run_bench

record = run_bench("tiny", settings=BenchSettings(prefill=32, generate=16, warmup=1, repeat=3, progress=False))

# %%
# NBVAL_IGNORE_OUTPUT
# Speeds and load time: the machine's, different on every run.
print(f"load        {record.load_ms:8.1f} ms")
print(f"prefill     {record.prefill_tps:8.1f} tok/s  (repeats: {', '.join(f'{x:.1f}' for x in record.prefill_tps_samples)})")
print(f"generation  {record.generation_tps:8.1f} tok/s  (repeats: {', '.join(f'{x:.1f}' for x in record.generation_tps_samples)})")
print(f"GPU         {record.gpu}")

# %%
print("quality hash:        ", record.quality_hash)
print("first 16 tokens:     ", record.quality_tokens[:16])
print("repeats agree:       ", record.consistent)
print(f"logit error <= {record.logit_tolerance:g}:", record.logit_ok)

# %% [markdown]
# Next: `02_fusion_lab` (the control panel: toggle fusions, paths, formats and compare runs),
# `03_quant_formats`, `04_paths_and_backends`, and `01_history` for everything recorded so far.
