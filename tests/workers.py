"""Job targets for runner tests: workers that really crash, hang, run out of memory."""

import ctypes
import os
import time


def ok(value=1):
    return {"status": "ok", "value": value, "pid": os.getpid()}


def segfault():
    print("about to dereference NULL", flush=True)
    ctypes.string_at(0)  # a real SIGSEGV in native code
    return {"status": "ok"}


def hang(seconds=3600):
    print(f"hanging in pid {os.getpid()}", flush=True)
    with open(os.environ["HANG_PID_FILE"], "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    return {"status": "ok"}


def oom():
    import torch

    # A real allocation failure: 1 PiB from the CPU allocator.
    torch.empty(1 << 50, dtype=torch.uint8)
    return {"status": "ok"}


def raises():
    raise ValueError("a bug in the workload")


def exits_quietly():
    os._exit(3)


def abort():
    os.abort()
