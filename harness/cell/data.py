"""Synthetic, learnable training batches.

Tokens come from a first-order Markov chain over a sub-vocabulary: each token is followed
by its fixed successor with probability ``p_follow``, else by a uniformly random token.
A model can learn the successor table, so the loss falls over steps (from about
ln(vocab) towards the chain's entropy), which stability checks need; and the stream is
fully determined by the seed. Every token is real: there is no padding, so tokens/s
counts ``batch_size * seq_len`` tokens a step.
"""

from __future__ import annotations

import math

import numpy as np

FIRST_TOKEN = 4  # leave the lowest ids (bos / eos / pad in many vocabularies) unused


def chain(vocab_size: int, seed: int, max_states: int = 64):
    """The successor table of the chain: state i -> successor[i] (ids offset by FIRST_TOKEN)."""
    k = max(2, min(max_states, vocab_size - FIRST_TOKEN))
    rng = np.random.default_rng(seed)
    return rng.permutation(k)


def sample_tokens(vocab_size: int, seq_len: int, batch_size: int, seed: int, *,
                  p_follow: float = 0.9, max_states: int = 64, chain_seed: int = 0) -> np.ndarray:
    """A [batch_size, seq_len] int64 array of token ids from the chain.

    Position 0 and every position that does not follow the chain take their noise draw;
    a position ``d`` steps after such a reset holds ``succ`` applied ``d`` times to the
    reset's token. Computed that way with a table of the successor's powers (the
    former per-position loop took ~50 ms at 32k tokens, this ~1 ms; the same draws, the
    same tokens: ``_sample_tokens_loop`` is kept as the reference the tests compare to).
    """
    succ = chain(vocab_size, chain_seed, max_states)
    k = len(succ)
    rng = np.random.default_rng(seed)
    follow = rng.random((seq_len, batch_size)) < p_follow
    noise = rng.integers(0, k, size=(seq_len, batch_size))
    reset = ~follow
    reset[0] = True
    pos = np.arange(seq_len)[:, None]
    last_reset = np.maximum.accumulate(np.where(reset, pos, 0), axis=0)
    dist = pos - last_reset
    powers = np.empty((int(dist.max()) + 1, k), dtype=np.int64)
    powers[0] = np.arange(k)
    for j in range(1, len(powers)):  # runs are short (geometric, p_follow 0.9): ~100 rows at 32k
        powers[j] = succ[powers[j - 1]]
    out = powers[dist, np.take_along_axis(noise, last_reset, axis=0)]
    return out.T + FIRST_TOKEN


def _sample_tokens_loop(vocab_size: int, seq_len: int, batch_size: int, seed: int, *,
                        p_follow: float = 0.9, max_states: int = 64, chain_seed: int = 0) -> np.ndarray:
    """The chain sampled one position at a time: the definition ``sample_tokens`` follows."""
    succ = chain(vocab_size, chain_seed, max_states)
    k = len(succ)
    rng = np.random.default_rng(seed)
    follow = rng.random((seq_len, batch_size)) < p_follow
    noise = rng.integers(0, k, size=(seq_len, batch_size))
    out = np.empty((seq_len, batch_size), dtype=np.int64)
    out[0] = noise[0]
    for t in range(1, seq_len):
        out[t] = np.where(follow[t], succ[out[t - 1]], noise[t])
    return out.T + FIRST_TOKEN


def entropy_floor(vocab_size: int, *, p_follow: float = 0.9, max_states: int = 64) -> float:
    """Per-token loss (nats) of a model that knows the chain exactly: the loss can't go lower."""
    k = max(2, min(max_states, vocab_size - FIRST_TOKEN))
    p_succ = p_follow + (1 - p_follow) / k
    p_other = (1 - p_follow) / k
    return -(p_succ * math.log(p_succ) + (k - 1) * p_other * math.log(p_other))


def make_batches(vocab_size: int, seq_len: int, batch_size: int, n_batches: int, seed: int,
                 start: int = 0) -> list[np.ndarray]:
    """One batch per step; batch i is drawn from seed (seed, i) so runs are reproducible
    (``start``: the batches of steps ``start`` ... ``start + n_batches - 1``)."""
    return [sample_tokens(vocab_size, seq_len, batch_size, seed * 100_003 + i) for i in range(start, start + n_batches)]
