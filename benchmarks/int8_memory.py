"""Where does int8 LoRA with checkpointing ``on`` keep its memory on CUDA?

The H200 data (Llama-3.1-8B preset, 8192 tokens): int8 gc-on peaks at 68.8 GiB, int8
with ``offload`` at 26.2 GiB, bf16 gc-on at 34.5 GiB; the harness's probe of tensors
held as attributes of autograd contexts (bitsandbytes' ``ctx.tensors``) found 0 bytes
on CUDA. So something else keeps it.

One real harness cell (``harness.cell.train.run_cell``, checkpointing ``on``, fresh
forked process) per precision (default int8, bf16 and nf4 for comparison). On the first
measured step, with diagnostic hooks:

- ``torch.cuda.memory._record_memory_history(enabled="all", context="alloc",
  stacks="python", max_entries=--max-entries)`` from the step's start; a snapshot
  (``torch.cuda.memory._snapshot()``) right after the forward pass (a hook on the
  model: the loss is computed, the backward pass not begun) and one after the step,
  whose trace is replayed to the moment of the step's peak allocation
  (``benchmarks/memsnap.py``). The live blocks at each moment are summed by
  allocating frame: the innermost Python frame outside torch
  (``bitsandbytes/autograd/_functions.py:NNN forward``) and the phase (forward,
  recompute, backward, optimizer). Only the summaries are written, never the snapshot.
- saved-tensor accounting: ``torch.autograd.graph.saved_tensors_hooks`` around the
  forward pass counts the device bytes autograd saves, per module (decoder layers
  folded into one row). With checkpointing on, a checkpointed layer's own saves go to
  the checkpoint's hooks: what this sees escaped checkpointing.

Also from the record: peaks (torch, NVML), and the harness's ctx-held probe (step 0).
On a CPU the snapshot is not available (said so); the saved-tensor accounting runs.

Output in ``--out``: ``int8_memory.md`` (top ``--top`` frames per moment),
``int8_memory.json``, ``logs/``.

Time on one H200 (8B, 8192 tokens, 1 warm-up + 1 recorded step): worker server ~22 s;
the int8 cell ~20 s to load (conversion from the bf16 checkpoint), 2 steps ~4 s plus the
recording and two snapshots (~5-15 s); bf16 ~10 s; nf4 ~12 s: ~60-80 s in all.

    python benchmarks/int8_memory.py --out reports/runs/h200-diag/int8 --precisions int8,bf16 --time-limit 120
    python benchmarks/int8_memory.py --model tiny-llama --seq-len 64 --device cpu --out /tmp/int8   # CPU rehearsal
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memsnap  # noqa: E402
from diagcommon import Budget, CellRunner, cells_for, log, size, write  # noqa: E402

TARGET = "benchmarks.int8_memory:snapshot_job"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--precisions", default="int8,bf16,nf4")
    p.add_argument("--grad-ckpt", default="on", choices=["on", "off", "offload"])
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--top", type=int, default=15, help="frames per table")
    p.add_argument("--max-entries", type=int, default=200_000, help="allocator trace entries kept")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--cell-timeout", type=float, default=300.0)
    p.add_argument("--time-limit", type=float, default=None, help="start no cell that would end after this many s")
    return p.parse_args(argv)


class SavedTensorAccounting:
    """Device bytes autograd saves during a forward pass, per (folded) module name."""

    def __init__(self, model, device) -> None:
        import itertools

        self.model, self.device = model, device
        self.names = {id(m): memsnap.collapse_layers(n) or "(model)" for n, m in model.named_modules()}
        self.skip = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
        self.stack: list[str] = []
        self.by_module: dict[str, list[int]] = {}
        self.seen: set[int] = set()
        self.handles: list = []
        self.cm = None

    def _pack(self, t):
        if t.device == self.device:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in self.skip and ptr not in self.seen:
                self.seen.add(ptr)
                row = self.by_module.setdefault(self.stack[-1] if self.stack else "(outside modules)", [0, 0])
                row[0] += st.nbytes()
                row[1] += 1
        return t

    def install(self) -> None:
        import torch

        def push(mod, args):
            self.stack.append(self.names[id(mod)])

        def pop(mod, args, out):  # returns None: a forward hook's result would replace the module's output
            if self.stack:
                self.stack.pop()

        for m in self.model.modules():
            self.handles.append(m.register_forward_pre_hook(push))
            self.handles.append(m.register_forward_hook(pop))

        def enter(mod, args):
            self.cm = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
            self.cm.__enter__()

        def leave(mod, args, out):
            if self.cm is not None:
                self.cm.__exit__(None, None, None)
                self.cm = None
                self.remove()  # the forward pass only: the recomputation in the backward pass is not counted

        self.handles.insert(0, self.model.register_forward_pre_hook(enter, prepend=True))
        self.handles.append(self.model.register_forward_hook(leave))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def summary(self, top: int) -> dict[str, Any]:
        rows = sorted(({"module": k, "bytes": v[0], "tensors": v[1]} for k, v in self.by_module.items()),
                      key=lambda r: -r["bytes"])
        return {"total_bytes": sum(r["bytes"] for r in rows), "tensors": sum(r["tensors"] for r in rows),
                "by_module": rows[:top]}


def snapshot_job(spec_dict: dict[str, Any], opts: dict[str, Any], top: int, max_entries: int) -> dict[str, Any]:
    """The cell (in the forked process): a harness cell whose first measured step is recorded."""
    import torch

    from harness.cell.train import CellHooks, run_cell

    n_warm = int(spec_dict.get("warmup_steps", 0))
    diag: dict[str, Any] = {"recorded_step": n_warm}

    class SnapshotHooks(CellHooks):
        def wrap(self, model, evidence):
            self.model, self.device = model, next(model.parameters()).device
            return model

        def before_step(self, step, sync):
            if step != n_warm:
                return None
            self.acct = SavedTensorAccounting(self.model, self.device)
            self.acct.install()
            if self.device.type != "cuda":
                diag["snapshot_reason"] = f"no allocator snapshot on {self.device.type}: it needs a CUDA device"
                return None
            sync()
            diag["allocated_at_step_start"] = self.base = int(torch.cuda.memory_allocated(self.device))
            torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python",
                                                     max_entries=max_entries)
            self.fwd = self.model.register_forward_hook(self._after_forward)
            return None

        def _after_forward(self, module, args, output):  # returns None: the output stays
            segs = torch.cuda.memory._snapshot(self.device)["segments"]
            diag["after_forward"] = {"allocated_bytes": int(torch.cuda.memory_allocated(self.device)),
                                     "top": memsnap.group(memsnap.live_blocks(segs, self.device.index), top)}
            self.fwd.remove()

        def after_step(self, step, dt):
            if step != n_warm:
                return
            self.acct.remove()
            diag["saved_tensors"] = self.acct.summary(top)
            if self.device.type != "cuda":
                return
            snap = torch.cuda.memory._snapshot(self.device)
            torch.cuda.memory._record_memory_history(enabled=None)
            traces = snap.get("device_traces") or []
            idx = self.device.index or 0
            at_peak = memsnap.live_at_peak(traces[idx] if idx < len(traces) else [], self.base, top)
            at_peak["trace_full"] = at_peak["entries"] >= max_entries  # the ring buffer wrapped: early entries lost
            at_peak["torch_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
            diag["at_peak"] = at_peak

        def after_train(self, model, out):
            out["int8_diag"] = diag

    return run_cell(spec_dict, opts, hooks=SnapshotHooks())


def _frames_md(title: str, rows: list[dict[str, Any]], total: int | None) -> list[str]:
    lines = [f"**{title}**" + (f" ({size(total)} allocated)" if total else ""), "",
             "| # | allocating frame (innermost outside torch) | phase | live | blocks | share |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        share = f"{r['bytes'] / total:.1%}" if total else "n/a"
        lines.append(f"| {i} | `{r['frame']}` | {r['phase']} | {size(r['bytes'])} | {r['blocks'] or '-'} | {share} |")
    return lines + [""]


def _cell_md(r: dict[str, Any]) -> list[str]:
    lines = [f"## {r['precision']} (gc-{r['grad_ckpt']})", ""]
    if r["status"] != "ok":
        return lines + [f"Status {r['status']}: {r.get('error')}", ""]
    held = ", ".join(f"{fn} {size(v.get('bytes'))} in {v.get('tensors')} tensors"
                     for fn, v in (r.get("ctx_held_by_function") or {}).items())
    lines += [f"Torch peak allocated {size(r.get('torch_peak_allocated_bytes'))}, reserved "
              f"{size(r.get('torch_peak_reserved_bytes'))}, NVML peak {size(r.get('peak_vram_bytes'))}; "
              f"held on autograd contexts (the harness's probe, step 0, on the step's device): "
              f"{size(r.get('ctx_held_bytes'))}{' (' + held + ')' if held else ''}; saved outside checkpointed "
              f"regions (step 0): {size(r.get('saved_activation_bytes'))}; step {r.get('step_time_s') or 0:.3f} s.", ""]
    d = r.get("diag") or {}
    if d.get("snapshot_reason"):
        lines += [f"Allocator snapshot: not taken ({d['snapshot_reason']}).", ""]
    if d.get("at_peak"):
        p = d["at_peak"]
        note = "; the trace filled --max-entries: the earliest entries are lost" if p.get("trace_full") else ""
        lines += _frames_md(f"Live at the recorded step's peak ({p['entries']} trace entries{note})", p["top"],
                            p["peak_allocated_bytes"])
    if d.get("after_forward"):
        lines += _frames_md("Live after the forward pass, before the backward pass", d["after_forward"]["top"],
                            d["after_forward"]["allocated_bytes"])
    st = d.get("saved_tensors") or {}
    lines += [f"**Saved for the backward pass during the recorded step's forward pass** (saved-tensor hooks; "
              f"{st.get('tensors', 0)} tensors, {size(st.get('total_bytes'))})", "",
              "| module (decoder layers folded) | saved | tensors |", "|---|---|---|"]
    lines += [f"| `{m['module']}` | {size(m['bytes'])} | {m['tensors']} |" for m in st.get("by_module", [])]
    return lines + [""]


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    budget = Budget(a.time_limit)
    precisions = [p.strip() for p in a.precisions.split(",") if p.strip()]
    cells, cfg, facts = cells_for(a, precisions, [a.grad_ckpt])
    runner = CellRunner(out, budget, a.cell_timeout)
    rows = []
    interrupted = False
    try:
        runner.checkpoints(cfg)
        for p in precisions:
            res = runner.run(TARGET, f"{p}/gc-{a.grad_ckpt}", cells[(p, a.grad_ckpt)].replace(tag="memdiag"),
                             cfg.worker_opts(), top=a.top, max_entries=a.max_entries)
            ev = res.get("grad_ckpt_evidence") or {}
            rows.append({"precision": p, "grad_ckpt": a.grad_ckpt, "status": res.get("status"),
                         "error": res.get("error"), "diag": res.get("int8_diag"),
                         **{k: res.get(k) for k in ("torch_peak_allocated_bytes", "torch_peak_reserved_bytes",
                                                    "peak_vram_bytes", "step_time_s", "losses", "wall_time_s", "log")},
                         "ctx_held_bytes": ev.get("ctx_held_activation_bytes_step0"),
                         "ctx_held_by_function": ev.get("ctx_held_by_function"),
                         "saved_activation_bytes": ev.get("saved_activation_bytes_step0")})
    except KeyboardInterrupt:  # the job's hard stop: report what ran
        interrupted = True
    finally:
        runner.close()
    gpu = facts.get("gpu_name") if facts.get("has_gpu") and a.device != "cpu" else None
    host = (f"{gpu or 'CPU'}; {a.model}, {a.seq_len} tokens, gc-{a.grad_ckpt}, {a.warmup_steps} warm-up step(s)"
            + ("; interrupted" if interrupted else ""))
    data = {"host": host, "rows": rows, "elapsed_s": budget.elapsed(), "interrupted": interrupted, "settings": vars(a)}
    md = "\n".join(["# Where the memory of a checkpointed LoRA step lives", "", f"Host: {host}.", ""]
                   + [line for r in rows for line in _cell_md(r)] + [f"Elapsed: {budget.elapsed():.0f} s."]) + "\n"
    write(out, "int8_memory", data, md)
    print(md)
    log(f"int8_memory: done after {budget.elapsed():.0f} s")
    return 1 if interrupted or any(r["status"] not in ("ok", "oom", "not run") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
