"""What the benchmarks share: the results folder, the model flags, the machine's description, peak memory, device
sync, p90."""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def model_flags(p, default: str) -> None:
    """The model a bench loads (load_model's arguments): --model, --weights, --random-weights, --layers, --dtype."""
    p.add_argument("--model", default=default)
    p.add_argument("--weights", help="local checkpoint directory for a preset")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--layers", type=int)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])


def calibrates(spec) -> bool:
    """Whether a pass spec (a string or a list of them) has a pass that needs calibration data to be built."""
    from vtcompile.passes import resolve_passes

    return any(pp.calibrate is not None and c.needs_calibration() for pp, c in resolve_passes(spec))


def load_bench_model(args, device=None):
    """The model that model_flags' flags name, on `device` (default: the CPU)."""
    from vtcompile import load_model

    return load_model(args.model, args.weights, args.random_weights, args.layers, args.dtype, device=device)


# -- memory ------------------------------------------------------------------------------------------
def _libc_trim() -> None:
    """Give the heap's free pages back to the OS (glibc malloc_trim), so the next call's RSS growth is its own."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_memory(fn, device: torch.device) -> int | None:
    """Bytes that one call of fn() adds at its peak above the level before it, in a call of its own (untimed).

    CUDA: the allocator's peak. CPU: the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) after
    malloc_trim has returned the freed heap pages, so memory a warm process keeps in malloc's free lists does not
    hide the call's own. None where /proc cannot do this. A thread sampling RSS during timed calls (the earlier
    method) took the GIL every 2 ms and read 0 after the first call, so the measurement runs apart."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        _libc_trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        base = _status_kb("VmRSS")
        fn()
        return max(0, _status_kb("VmHWM") - base) * 1024
    except (OSError, StopIteration):
        return None


PEAK_NOTE = ("one untimed call after the timed ones, peak above the level before it: allocator peak on CUDA; on "
             "CPU the peak RSS (VmHWM) after malloc_trim returned freed heap pages")


def mb(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.0f}"


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def p90(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA), torch {torch.__version__}"
    return (f"{cpu}, {os.cpu_count()} cores, torch.get_num_threads()={torch.get_num_threads()}, "
            f"torch {torch.__version__}")




def write_results(out: Path, markdown: str, rows) -> None:
    """`out`.md (the table with its command and conditions) and `out`.json (the rows), creating the folder."""
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))


def scoring(max_new_tokens: int) -> str:
    """How an accuracy bench scores an answer, for its results file."""
    if max_new_tokens == 1:
        return "the greedy next token"
    return f"whole generated answers (greedy, until eos, at most {max_new_tokens} new tokens)"
