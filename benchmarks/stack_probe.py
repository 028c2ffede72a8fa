"""A first look at the training stacks on a GPU host: plain transformers + peft, Liger
kernels, and Unsloth's loader, each on the same model, tokens and LoRA, each in a fresh
process, with the proofs that the stack was in effect.

    python benchmarks/stack_probe.py --out DIR [--model llama-3.1-8b] [--seq-len 2048] [--time-limit S]

Per variant (one process each; Liger and Unsloth patch transformers' classes globally):
- ``hf-bf16``: the model built from the preset's config in bf16, peft LoRA on every
  linear layer, transformers' checkpointing;
- ``liger-bf16``: the same with ``apply_liger_kernel_to_llama(model=...)`` before LoRA;
  proof: the modules Liger re-pointed, RoPE replaced, and no logits tensor in the training
  step's output (the fused linear cross-entropy);
- ``unsloth-bf16`` / ``unsloth-nf4``: ``FastLanguageModel.from_pretrained(load_in_4bit=False
  | True)`` on the synthetic checkpoint, then ``get_peft_model(use_gradient_checkpointing=True)``;
  proof: the layer census (how many 4-bit / 8-bit / 16-bit linear layers were loaded: the
  seed's question whether ``load_in_4bit=False`` really gives 16-bit layers), Unsloth's
  patched forwards, its device type.
Each records warm-up + measured step times, torch peak allocated / reserved, the losses,
and any error with its traceback tail. Output: ``stack_probe.json`` and ``stack_probe.md``.

This is a probe, written before the stack axis exists in the harness, to learn what runs
on the host and what it costs; the harness's own stack cells replace it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
VARIANTS = ("hf-bf16", "liger-bf16", "unsloth-bf16", "unsloth-nf4")


def _census(model) -> dict:
    import torch

    out = {"linear4bit": 0, "linear8bit": 0, "linear16": 0, "other_linear": 0}
    for _, m in model.named_modules():
        name = type(m).__name__
        if name == "Linear4bit":
            out["linear4bit"] += 1
        elif name in ("Linear8bitLt",):
            out["linear8bit"] += 1
        elif isinstance(m, torch.nn.Linear) and "lora" not in name.lower():
            w = getattr(m, "weight", None)
            if w is not None and w.dtype in (torch.bfloat16, torch.float16):
                out["linear16"] += 1
            else:
                out["other_linear"] += 1
    return out


def _batches(vocab: int, seq_len: int, n: int, seed: int = 0):
    import torch

    from harness.cell.data import make_batches

    out = []
    for tokens in make_batches(vocab, seq_len, 1, n, seed):
        ids = torch.as_tensor(tokens, dtype=torch.long).cuda()
        out.append({"input_ids": ids, "labels": ids})
    return out


def _train(model, batches, warmup: int, out: dict) -> None:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    model.train()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i, b in enumerate(batches):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            res = model(**b)
        res.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(res.loss.detach().float()))
        if i == 0:
            logits = getattr(res, "logits", None)
            out["train_logits"] = None if logits is None else type(logits).__name__ + (
                f"{tuple(logits.shape)}" if hasattr(logits, "shape") else "")
    out["warmup_step_times_s"], out["step_times_s"] = times[:warmup], times[warmup:]
    out["losses"] = losses
    out["trainable_params"] = sum(p.numel() for p in params)
    out["torch_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    out["torch_peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    m = sorted(out["step_times_s"])
    out["median_step_s"] = m[len(m) // 2] if m else None


def _lora_config():
    import peft

    return peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", bias="none",
                           task_type="CAUSAL_LM")


def run_hf(args, out: dict, liger: bool) -> None:
    import peft
    import torch

    from harness.cell.build import build_from_config
    from harness.core.models import get_preset

    preset = get_preset(args.model)
    model = build_from_config(preset, dtype=torch.bfloat16, device="cuda", seed=0, attn_implementation="sdpa")
    if liger:
        import liger_kernel
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        from transformers.models.llama import modeling_llama

        apply_liger_kernel_to_llama(model=model)
        names = [m._get_name() for m in model.modules()]
        out["liger_version"] = getattr(liger_kernel, "__version__", None)
        out["liger_modules"] = {n: names.count(n) for n in sorted(set(names)) if n.startswith("Liger")}
        out["liger_rope"] = modeling_llama.apply_rotary_pos_emb.__module__
        try:
            from liger_kernel.backends import resolve_impl

            out["liger_rope_impl"] = getattr(resolve_impl("rope"), "impl_name", None)
        except Exception as exc:  # noqa: BLE001 - older releases have no dispatcher
            out["liger_rope_impl"] = f"n/a ({type(exc).__name__})"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    torch.manual_seed(0)
    model = peft.get_peft_model(model, _lora_config())
    out["census"] = _census(model)
    _train(model, _batches(preset["config"]["vocab_size"], args.seq_len, args.warmup + args.steps), args.warmup, out)


def run_unsloth(args, out: dict, four_bit: bool) -> None:
    import unsloth  # first: it patches transformers
    from unsloth import FastLanguageModel
    import torch

    from harness.cell.build import ensure_checkpoint
    from harness.cell.stacks.unsloth import write_tokenizer
    from harness.core.models import get_preset

    preset = get_preset(args.model)
    folder = ensure_checkpoint(preset, device="cuda:0", cache_dir=args.cache_dir)
    write_tokenizer(folder, preset["config"]["vocab_size"])
    out["unsloth_version"] = getattr(unsloth, "__version__", None)
    out["unsloth_device_type"] = getattr(unsloth, "DEVICE_TYPE", None)
    t0 = time.perf_counter()
    model, _tok = FastLanguageModel.from_pretrained(model_name=str(folder), max_seq_length=args.seq_len,
                                                    dtype=torch.bfloat16, load_in_4bit=four_bit, load_in_8bit=False,
                                                    full_finetuning=False, local_files_only=True)
    out["load_s"] = time.perf_counter() - t0
    out["census_after_load"] = _census(model)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"],
                                             use_gradient_checkpointing=True, random_state=0)
    from transformers.models.llama import modeling_llama

    out["attention_forward"] = modeling_llama.LlamaAttention.forward.__name__
    layer = model.base_model.model.model.layers[0]
    out["mlp_forward"] = getattr(getattr(layer.mlp.forward, "__func__", layer.mlp.forward), "__name__", None)
    out["census"] = _census(model)
    _train(model, _batches(preset["config"]["vocab_size"], args.seq_len, args.warmup + args.steps), args.warmup, out)


def child(args) -> int:
    out: dict = {"variant": args.variant, "seq_len": args.seq_len, "model": args.model}
    t0 = time.perf_counter()
    try:
        kind, prec = args.variant.split("-")
        if kind == "unsloth":
            run_unsloth(args, out, four_bit=(prec == "nf4"))
        else:
            run_hf(args, out, liger=(kind == "liger"))
        out["status"] = "ok"
    except BaseException as exc:  # noqa: BLE001 - the probe reports every failure
        import traceback

        out["status"] = "error"
        out["error"] = f"{type(exc).__name__}: {exc}"[:800]
        out["traceback"] = traceback.format_exc()[-3000:]
    out["wall_s"] = time.perf_counter() - t0
    Path(args.result).write_text(json.dumps(out, indent=2, default=str))
    return 0


def markdown(rows: list[dict]) -> str:
    lines = ["# Training stacks: first probe", "", "| variant | status | median step s | tokens/s | torch peak alloc GiB "
             "| reserved GiB | 4-bit / 8-bit / 16-bit linears | proof | first loss |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        med = r.get("median_step_s")
        tps = f"{r['seq_len'] / med:,.0f}" if med else "-"
        c = r.get("census") or {}
        proof = r.get("liger_modules") or r.get("attention_forward") or ""
        if r.get("train_logits") is not None or "liger" in r["variant"] or "unsloth" in r["variant"]:
            proof = f"{proof}; logits in training step: {r.get('train_logits')}"
        gib = lambda k: f"{r[k] / 2**30:.2f}" if r.get(k) else "-"  # noqa: E731
        lines.append(f"| {r['variant']} | {r.get('status')} | {med and round(med, 4)} | {tps} | "
                     f"{gib('torch_peak_allocated_bytes')} | {gib('torch_peak_reserved_bytes')} | "
                     f"{c.get('linear4bit', '-')} / {c.get('linear8bit', '-')} / {c.get('linear16', '-')} | {proof} | "
                     f"{(r.get('losses') or ['-'])[0]} |")
    errors = [f"- {r['variant']}: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(lines + ([""] + errors if errors else [])) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--time-limit", type=float, default=None, help="start no variant after this many seconds")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.variant:
        return child(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    rows = []
    for v in args.variants.split(","):
        if args.time_limit is not None and time.monotonic() - t0 > args.time_limit:
            print(f"stack-probe: time limit reached; {v} not started", flush=True)
            continue
        result = out / f"{v}.json"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1",
                   UNSLOTH_COMPILE_LOCATION="/tmp/unsloth_compiled_cache", PYTORCH_ALLOC_CONF="expandable_segments:False",
                   LIGER_KERNEL_BACKEND="nvidia-triton")
        cmd = [sys.executable, __file__, "--out", str(out), "--variant", v, "--result", str(result), "--model",
               args.model, "--seq-len", str(args.seq_len), "--warmup", str(args.warmup), "--steps", str(args.steps)]
        if args.cache_dir:
            cmd += ["--cache-dir", args.cache_dir]
        left = None if args.time_limit is None else max(30.0, args.time_limit - (time.monotonic() - t0) + 60)
        print(f"stack-probe: {v} ...", flush=True)
        with open(out / f"{v}.log", "w") as log:
            try:
                subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=left)
            except subprocess.TimeoutExpired:
                pass
        row = json.loads(result.read_text()) if result.is_file() else {"variant": v, "seq_len": args.seq_len,
                                                                       "status": "crash", "error": "no result"}
        rows.append(row)
        print(f"stack-probe: {v}: {row.get('status')} {row.get('median_step_s')} s/step "
              f"{row.get('error', '')[:200]}", flush=True)
    (out / "stack_probe.json").write_text(json.dumps(rows, indent=2, default=str))
    (out / "stack_probe.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
