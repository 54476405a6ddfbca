"""What the benchmarks share: the results folder, the machine's description, peak memory, device sync, p90."""
from __future__ import annotations

import os
import platform
import threading
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


# -- memory ------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory above the level at the start of a `with` block: allocator peak on CUDA, RSS on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self._rss()
            self.top, self._stop = self.base, threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.top = max(self.top, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = max(self.peak, torch.cuda.max_memory_allocated() - self.base)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, max(self.top, self._rss()) - self.base)


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
