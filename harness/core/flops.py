"""FLOP counts for a LoRA training step and the device peaks that turn them into MFU.

Model FLOPs per token (recomputation by checkpointing is *not* counted: MFU measures
useful work, so checkpointing shows up as lower MFU):

    4 * P_frozen        frozen linear layers: forward (2P) + input gradient (2P);
                        no weight gradient is computed for frozen weights
  + 6 * P_lora          LoRA matrices: forward, input gradient and weight gradient
  + 12 * L * T * d_attn attention scores and values: forward 4*T*d_attn per layer,
                        backward twice that (PaLM's convention; the causal mask is
                        not discounted)

P_frozen counts the matmul parameters of every linear layer (the output head included,
the embedding lookup excluded), T is the sequence length, L the number of layers and
d_attn = heads * head_dim. Unknown device peak -> MFU is None, never a guess.
"""

from __future__ import annotations

# Dense (no sparsity) peak FLOP/s from the vendors' datasheets, by device name fragment
# and dtype. fp32 is the non-tensor-core rate (the harness does not enable TF32).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 66.9e12},
    "H100 80GB HBM3": {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 66.9e12},
    "H100 PCIe": {"bfloat16": 756.5e12, "float16": 756.5e12, "float32": 51.2e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
    "L40S": {"bfloat16": 362.05e12, "float16": 362.05e12, "float32": 91.6e12},
    "A10G": {"bfloat16": 70e12, "float16": 70e12, "float32": 31.2e12},
    "L4": {"bfloat16": 121e12, "float16": 121e12, "float32": 30.3e12},
    "RTX 4090": {"bfloat16": 165.2e12, "float16": 165.2e12, "float32": 82.6e12},
    "RTX 3090": {"bfloat16": 71e12, "float16": 71e12, "float32": 35.6e12},
    "V100": {"float16": 125e12, "float32": 15.7e12},
    "T4": {"float16": 65e12, "float32": 8.1e12},
}


def peak_flops(device_name: str | None, dtype: str) -> float | None:
    if not device_name:
        return None
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):  # most specific first
        if key in device_name:
            return PEAK_FLOPS[key].get(dtype)
    return None


def train_flops_per_token(*, frozen_params: int, lora_params: int, n_layers: int, seq_len: int, attn_dim: int) -> float:
    return 4.0 * frozen_params + 6.0 * lora_params + 12.0 * n_layers * seq_len * attn_dim


def mfu(tokens_per_s: float | None, flops_per_token: float | None, peak: float | None) -> float | None:
    if not tokens_per_s or not flops_per_token or not peak:
        return None
    return tokens_per_s * flops_per_token / peak
