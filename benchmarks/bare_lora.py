"""A bare LoRA training loop: no harness, no worker process, no trackers.

The reference the harness's own overhead is measured against (issue 7): the same model
shape (read from the preset's JSON config), the same LoRA settings, batch, optimizer,
autocast and steps as a harness cell, timed with a plain loop that synchronises the
device around each step. It prints one JSON line with tokens/s and the torch
allocator's peak, so a script can put both side by side.

    python benchmarks/bare_lora.py --model llama-3.1-8b --precision bf16 --seq-len 2048 --grad-ckpt on

Quantised precisions load a checkpoint folder (``--checkpoint``; the harness's cache
folder holds one per preset after its first quantised cell).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

PRESETS = Path(__file__).resolve().parent.parent / "harness" / "models" / "presets"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16", "int8", "nf4", "fp4", "nf4-dq"])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-ckpt", default="off", choices=["off", "on"])
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--checkpoint", help="checkpoint folder for quantised precisions")
    a = p.parse_args(argv)

    import peft
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg_data = json.loads((PRESETS / f"{a.model}.json").read_text())["config"]
    model_type = cfg_data.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg_data)
    bf16_ok = dev.type == "cpu" or torch.cuda.is_bf16_supported()
    compute = torch.bfloat16 if bf16_ok else torch.float16
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if a.precision in dtypes:
        torch.manual_seed(0)
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(config, dtype=dtypes[a.precision])
        amp = None if a.precision == "fp32" else dtypes[a.precision]
    else:
        if not a.checkpoint:
            p.error("quantised precisions need --checkpoint")
        q = (BitsAndBytesConfig(load_in_8bit=True) if a.precision == "int8" else
             BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4" if a.precision == "fp4" else "nf4",
                                bnb_4bit_use_double_quant=a.precision == "nf4-dq", bnb_4bit_compute_dtype=compute))
        model = AutoModelForCausalLM.from_pretrained(a.checkpoint, quantization_config=q, dtype=compute,
                                                     device_map={"": str(dev)})
        amp = compute
    if a.grad_ckpt == "on":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(r=a.lora_rank, lora_alpha=a.lora_alpha, lora_dropout=0.0,
                                                       target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)
    gen = torch.Generator().manual_seed(0)
    n = a.warmup_steps + a.steps
    batches = [torch.randint(4, 68, (a.batch_size, a.seq_len), generator=gen) for _ in range(n)]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(n):
        ids = batches[i].to(dev)
        sync()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            loss = model(input_ids=ids, labels=ids).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times[a.warmup_steps:])
    print(json.dumps({
        "model": a.model, "precision": a.precision, "seq_len": a.seq_len, "batch_size": a.batch_size,
        "grad_ckpt": a.grad_ckpt, "step_time_s": med, "tokens_per_s": a.seq_len * a.batch_size / med,
        "step_times_s": times[a.warmup_steps:],
        "torch_peak_allocated_bytes": int(torch.cuda.max_memory_allocated()) if dev.type == "cuda" else None,
        "loss_last": float(loss.detach().float()),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
