"""The NumPy reference forward of RWKV-7: slow, plain, and the oracle for every kernel.

It follows the math block of /work/shared/reference/rwkv7-gguf.md line by line, one token at a
time, with no fusion and no cleverness, so that reading it is enough to trust it.

Everything is computed in float64, including the wkv state. The reason: the reference is what
a float32 (or f16) engine is compared against, and in float64 its own rounding (~1e-12) is
negligible next to the differences being measured, so a mismatch is always the engine's.
llama.cpp keeps the state in float32; on tiny-f32.gguf the two agree to ~1e-5 in the logits,
well inside the 1e-4 the tests ask for.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from rwkvlab.gguf import Model, ModelSpec

# exp(-0.5), written as llama.cpp writes it (rounded to 6 places) so both compute the same decay.
DECAY_SCALE = 0.606531
# GroupNorm eps of the attention output ("ln_x"): 1e-5 * head_size_divisor**2 with divisor 8,
# fixed by the model family, not stored in the file.
GROUP_NORM_EPS = 64e-5
# Floor of the L2 norm in the kk normalisation (torch.nn.functional.normalize's default).
L2_EPS = 1e-12


def dequantized_weights(model: Model) -> dict[str, np.ndarray]:
    """Every tensor of the file as float32 in its normalised shape (F32 tensors: read-only views)."""
    return {name: t.dequantize() for name, t in model.tensors.items()}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean()
    var = ((x - mean) ** 2).mean()  # population variance, as torch and ggml use
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def _layer_norm_rows(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """_layer_norm of every row of x [T, C]."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


@dataclass
class _Layer:
    """One block's weights in float64, named as in the math (matrices are used as W @ x)."""

    attn_norm_w: np.ndarray
    attn_norm_b: np.ndarray
    lerp: np.ndarray  # (6, C): mixes for r, w, k, v, a, g, in that order
    w0: np.ndarray
    w1: np.ndarray
    w2: np.ndarray
    a0: np.ndarray
    a1: np.ndarray
    a2: np.ndarray
    v0: np.ndarray | None  # layer 0 has no value-residual LoRA (its v becomes v_first)
    v1: np.ndarray | None
    v2: np.ndarray | None
    g1: np.ndarray
    g2: np.ndarray
    k_k: np.ndarray
    k_a: np.ndarray
    r_k: np.ndarray  # (H, N)
    wr: np.ndarray
    wk: np.ndarray
    wv: np.ndarray
    wo: np.ndarray
    ln_x_w: np.ndarray
    ln_x_b: np.ndarray
    ffn_norm_w: np.ndarray
    ffn_norm_b: np.ndarray
    ffn_lerp_k: np.ndarray
    ffn_key: np.ndarray
    ffn_value: np.ndarray


class Reference:
    """RWKV-7 on the CPU in float64, one token at a time, with its recurrent state.

    State (all float64, zero after `reset`): `att_prev` [L, C] and `ffn_prev` [L, C] hold the
    previous token's *normed* input of each time-mix / channel-mix; `wkv` [L, H, N, N] holds each
    head's state matrix, indexed [value i, key j].
    """

    def __init__(self, model_or_weights: Model | Mapping[str, np.ndarray],
                 spec: ModelSpec | None = None) -> None:
        if isinstance(model_or_weights, Model):
            weights = dequantized_weights(model_or_weights)
            spec = spec or model_or_weights.spec
        else:
            weights = model_or_weights
            if spec is None:
                raise ValueError("Reference(weights) needs the ModelSpec too: Reference(weights, spec)")
        self.spec = spec

        def f64(name: str) -> np.ndarray:
            if name not in weights:
                raise KeyError(f"reference weights lack tensor {name!r}")
            return np.asarray(weights[name], dtype=np.float64)

        H, N = spec.n_head, spec.head_size
        self.emb = f64("token_embd.weight")
        self.emb_norm_w, self.emb_norm_b = f64("token_embd_norm.weight"), f64("token_embd_norm.bias")
        self.out_norm_w, self.out_norm_b = f64("output_norm.weight"), f64("output_norm.bias")
        self.head = f64("output.weight")
        self.layers: list[_Layer] = []
        for i in range(spec.n_layer):
            def w(suffix: str) -> np.ndarray:
                return f64(f"blk.{i}.{suffix}.weight")

            has_v = i > 0
            self.layers.append(_Layer(
                attn_norm_w=w("attn_norm"), attn_norm_b=f64(f"blk.{i}.attn_norm.bias"),
                lerp=w("time_mix_lerp_fused").reshape(6, spec.n_embd),
                w0=w("time_mix_w0"), w1=w("time_mix_w1"), w2=w("time_mix_w2"),
                a0=w("time_mix_a0"), a1=w("time_mix_a1"), a2=w("time_mix_a2"),
                v0=w("time_mix_v0") if has_v else None,
                v1=w("time_mix_v1") if has_v else None,
                v2=w("time_mix_v2") if has_v else None,
                g1=w("time_mix_g1"), g2=w("time_mix_g2"),
                k_k=w("time_mix_k_k"), k_a=w("time_mix_k_a"),
                r_k=w("time_mix_r_k").reshape(H, N),
                wr=w("time_mix_receptance"), wk=w("time_mix_key"),
                wv=w("time_mix_value"), wo=w("time_mix_output"),
                ln_x_w=w("time_mix_ln"), ln_x_b=f64(f"blk.{i}.time_mix_ln.bias"),
                ffn_norm_w=w("attn_norm_2"), ffn_norm_b=f64(f"blk.{i}.attn_norm_2.bias"),
                ffn_lerp_k=w("channel_mix_lerp_k").reshape(spec.n_embd),
                ffn_key=w("channel_mix_key"), ffn_value=w("channel_mix_value"),
            ))
        self.reset()

    def reset(self) -> None:
        """Zero the state: the next token starts a new sequence."""
        s = self.spec
        self.att_prev = np.zeros((s.n_layer, s.n_embd))
        self.ffn_prev = np.zeros((s.n_layer, s.n_embd))
        self.wkv = np.zeros((s.n_layer, s.n_head, s.head_size, s.head_size))

    # --- one token ---------------------------------------------------------------------------

    def _time_mix(self, i: int, x: np.ndarray, v_first: np.ndarray | None):
        """Attention-like half of block i; returns (x after its residual add, v_first)."""
        p, s = self.layers[i], self.spec
        H, N = s.n_head, s.head_size

        xa = _layer_norm(x, p.attn_norm_w, p.attn_norm_b, s.eps)
        sx = self.att_prev[i] - xa
        self.att_prev[i] = xa  # the *normed* input is what the next token shifts against
        x_r, x_w, x_k, x_v, x_a, x_g = (xa + sx * p.lerp[j] for j in range(6))

        r = p.wr @ x_r
        k = p.wk @ x_k
        v = p.wv @ x_v
        # Decay in (exp(-e^-0.5), 1): sigmoid keeps it from ever reaching 0 or 1.
        w = np.exp(-DECAY_SCALE * _sigmoid(p.w0 + p.w2 @ np.tanh(p.w1 @ x_w)))
        if i == 0:
            v_first = v  # layer 0's value feeds every later layer's value residual
        else:
            v = v + (v_first - v) * _sigmoid(p.v0 + p.v2 @ (p.v1 @ x_v))
        a = _sigmoid(p.a0 + p.a2 @ (p.a1 @ x_a))  # in-context learning rate
        g = p.g2 @ _sigmoid(p.g1 @ x_g)

        kk = (k * p.k_k).reshape(H, N)
        kk = kk / np.maximum(np.linalg.norm(kk, axis=1, keepdims=True), L2_EPS)
        k = k * (1.0 + (a - 1.0) * p.k_a)

        r_h, k_h, v_h = r.reshape(H, N), k.reshape(H, N), v.reshape(H, N)
        w_h, a_h = w.reshape(H, N), a.reshape(H, N)
        y = np.empty((H, N))
        for h in range(H):
            S = self.wkv[i, h]  # S[i, j]: value index i, key index j
            sa = S @ (-kk[h])  # what the state currently predicts along the kk direction
            S = S * w_h[h][None, :] + np.outer(v_h[h], k_h[h]) + np.outer(sa, kk[h] * a_h[h])
            self.wkv[i, h] = S
            y[h] = S @ r_h[h]  # read with the *updated* state

        # GroupNorm over heads, then the per-channel affine of ln_x.
        mean = y.mean(axis=1, keepdims=True)
        var = ((y - mean) ** 2).mean(axis=1, keepdims=True)
        y = ((y - mean) / np.sqrt(var + GROUP_NORM_EPS)).reshape(-1) * p.ln_x_w + p.ln_x_b
        # Bonus: each head adds v scaled by its own r.k (with r_k weights), a direct token path.
        bonus = (r_h * k_h * p.r_k).sum(axis=1, keepdims=True) * v_h
        y = y + bonus.reshape(-1)
        return x + p.wo @ (y * g), v_first

    def _channel_mix(self, i: int, x: np.ndarray) -> np.ndarray:
        """Feed-forward half of block i; returns x after its residual add."""
        p, s = self.layers[i], self.spec
        xf = _layer_norm(x, p.ffn_norm_w, p.ffn_norm_b, s.eps)
        sx = self.ffn_prev[i] - xf
        self.ffn_prev[i] = xf
        hidden = np.maximum(p.ffn_key @ (xf + sx * p.ffn_lerp_k), 0.0) ** 2
        return x + p.ffn_value @ hidden

    def _forward(self, token: int) -> np.ndarray:
        if not 0 <= int(token) < self.spec.n_vocab:
            raise ValueError(f"token id {token} is outside the vocab (0..{self.spec.n_vocab - 1})")
        x = _layer_norm(self.emb[int(token)], self.emb_norm_w, self.emb_norm_b, self.spec.eps)
        v_first = None
        for i in range(self.spec.n_layer):
            x, v_first = self._time_mix(i, x, v_first)
            x = self._channel_mix(i, x)
        return self.head @ _layer_norm(x, self.out_norm_w, self.out_norm_b, self.spec.eps)

    # --- a whole prompt at once (the same math; bench's check on big models) ---------------------

    def _chunk(self, tokens: list[int]) -> np.ndarray:
        """_forward for T tokens at once, block by block: each matrix product is one [T, K] x
        [K, M] product instead of T matrix-vector products (a 2.9B model's 512-token prompt takes
        seconds, not minutes: the weights are read once per block, not once per token). The
        token shift takes the previous row, the wkv state still runs token by token (over all
        heads at once). The same operations as _time_mix / _channel_mix, row by row; the last
        token's logits, the state as the token loop leaves it."""
        s = self.spec
        H, N, T = s.n_head, s.head_size, len(tokens)
        for t in tokens:
            if not 0 <= int(t) < s.n_vocab:
                raise ValueError(f"token id {t} is outside the vocab (0..{s.n_vocab - 1})")
        x = _layer_norm_rows(self.emb[np.asarray(tokens, dtype=np.int64)], self.emb_norm_w, self.emb_norm_b, s.eps)
        v_first = None
        for i, p in enumerate(self.layers):
            xa = _layer_norm_rows(x, p.attn_norm_w, p.attn_norm_b, s.eps)
            sx = np.vstack([self.att_prev[i][None], xa[:-1]]) - xa
            self.att_prev[i] = xa[-1]
            x_r, x_w, x_k, x_v, x_a, x_g = (xa + sx * p.lerp[j] for j in range(6))
            r, k, v = x_r @ p.wr.T, x_k @ p.wk.T, x_v @ p.wv.T
            w = np.exp(-DECAY_SCALE * _sigmoid(p.w0 + np.tanh(x_w @ p.w1.T) @ p.w2.T))
            if i == 0:
                v_first = v
            else:
                v = v + (v_first - v) * _sigmoid(p.v0 + (x_v @ p.v1.T) @ p.v2.T)
            a = _sigmoid(p.a0 + (x_a @ p.a1.T) @ p.a2.T)
            g = _sigmoid(x_g @ p.g1.T) @ p.g2.T
            kk = (k * p.k_k).reshape(T, H, N)
            kk = kk / np.maximum(np.linalg.norm(kk, axis=2, keepdims=True), L2_EPS)
            k = k * (1.0 + (a - 1.0) * p.k_a)
            r_h, k_h, v_h, w_h, a_h = (m.reshape(T, H, N) for m in (r, k, v, w, a))
            y = np.empty((T, H, N))
            S = self.wkv[i]  # [H, value i, key j]
            for t in range(T):
                sa = np.einsum("hij,hj->hi", S, -kk[t])
                S = (S * w_h[t][:, None, :] + v_h[t][:, :, None] * k_h[t][:, None, :]
                     + sa[:, :, None] * (kk[t] * a_h[t])[:, None, :])
                y[t] = np.einsum("hij,hj->hi", S, r_h[t])
            self.wkv[i] = S
            mean = y.mean(axis=2, keepdims=True)
            var = ((y - mean) ** 2).mean(axis=2, keepdims=True)
            y = ((y - mean) / np.sqrt(var + GROUP_NORM_EPS)).reshape(T, -1) * p.ln_x_w + p.ln_x_b
            y = y + ((r_h * k_h * p.r_k).sum(axis=2, keepdims=True) * v_h).reshape(T, -1)
            x = x + (y * g) @ p.wo.T

            xf = _layer_norm_rows(x, p.ffn_norm_w, p.ffn_norm_b, s.eps)
            sx = np.vstack([self.ffn_prev[i][None], xf[:-1]]) - xf
            self.ffn_prev[i] = xf[-1]
            x = x + (np.maximum((xf + sx * p.ffn_lerp_k) @ p.ffn_key.T, 0.0) ** 2) @ p.ffn_value.T
        return self.head @ _layer_norm(x[-1], self.out_norm_w, self.out_norm_b, s.eps)

    # --- public API ----------------------------------------------------------------------------

    def step(self, token: int) -> np.ndarray:
        """Feed one token; the logits [V] (float32) for the next one."""
        return self._forward(token).astype(np.float32)

    def logits(self, tokens: Iterable[int]) -> np.ndarray:
        """Feed tokens in order, continuing from the current state; logits after each, [T, V]."""
        rows = [self._forward(t) for t in tokens]
        if not rows:
            return np.zeros((0, self.spec.n_vocab), dtype=np.float32)
        return np.stack(rows).astype(np.float32)

    def prefill(self, tokens: Iterable[int]) -> np.ndarray:
        """Feed tokens in order, continuing from the current state; the last logits [V]."""
        tokens = list(tokens)
        if not tokens:
            raise ValueError("prefill needs at least one token")
        for t in tokens[:-1]:
            self._forward(t)
        return self.step(tokens[-1])

    def prefill_chunk(self, tokens: Iterable[int]) -> np.ndarray:
        """prefill, with the whole prompt's matrix products batched (_chunk): the same logits
        to float64 rounding (tests compare them), far faster on big models."""
        tokens = list(tokens)
        if not tokens:
            raise ValueError("prefill needs at least one token")
        return self._chunk(tokens).astype(np.float32)

    def generate(self, prompt_tokens: Iterable[int], n: int) -> list[int]:
        """Greedy: prefill the prompt (continuing from the current state), then n new tokens.

        Returns the n generated ids: each is np.argmax of what `step` would return (float32
        logits; ties go to the lowest id), so generate agrees with a step loop. The last generated id is not fed back, so afterwards the state has seen
        the prompt and the first n - 1 generated ids.
        """
        tokens = list(prompt_tokens)
        if not tokens:
            raise ValueError("generate needs a non-empty prompt (start with token 0, <s>, if nothing else)")
        for t in tokens[:-1]:
            self._forward(t)
        logits = self.step(tokens[-1])
        out: list[int] = []
        for _ in range(n):
            nxt = int(np.argmax(logits))
            out.append(nxt)
            if len(out) < n:
                logits = self.step(nxt)
        return out
