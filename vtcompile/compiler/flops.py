"""FLOPs of a token schedule: the papers' convention and true FLOPs, per layer and total.

Paper convention (FitPrune / PyramidDrop / SparseVLM tables): per decoder layer with n visual tokens,
4nd^2 + 2n^2d + 3ndm, text tokens ignored (3.82 T for LLaVA-1.5-7B). True FLOPs: 2 x multiply-accumulates
of every decoder layer and the LM head over all tokens (text included), q/o and GQA-sized k/v projections,
dense attention scores and values, SwiGLU MLP. Both are analytic from the geometry, so they work for 7B/13B
without allocating weights.
"""
from __future__ import annotations

from dataclasses import dataclass

from .geometry import Geometry


def paper_layer(n: int, g: Geometry) -> float:
    d, m = g.hidden_size, g.intermediate_size
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def true_layer(n: int, g: Geometry) -> float:
    d, m = g.hidden_size, g.intermediate_size
    kv = g.num_kv_heads * g.head_dim
    qo = g.num_heads * g.head_dim
    proj = n * d * (2 * qo + 2 * kv)
    attn = 2 * n * n * qo
    mlp = 3 * n * d * m
    return 2.0 * (proj + attn + mlp)


@dataclass
class FlopsReport:
    geometry: Geometry
    n_visual: int
    n_text: int
    schedule: list[int]  # visual tokens per layer

    @property
    def baseline_paper(self) -> float:
        return sum(paper_layer(self.n_visual, self.geometry) for _ in self.schedule)

    @property
    def paper(self) -> float:
        return sum(paper_layer(v, self.geometry) for v in self.schedule)

    def _true(self, schedule) -> float:
        g = self.geometry
        head = 2.0 * (self.n_text + schedule[-1]) * g.hidden_size * g.vocab_size
        return sum(true_layer(self.n_text + v, g) for v in schedule) + head

    @property
    def baseline_true(self) -> float:
        return self._true([self.n_visual] * len(self.schedule))

    @property
    def true(self) -> float:
        return self._true(self.schedule)

    def rows(self) -> list[dict]:
        return [{"layer": i, "visual_tokens": v, "tokens": v + self.n_text,
                 "paper_gflops": paper_layer(v, self.geometry) / 1e9,
                 "true_gflops": true_layer(v + self.n_text, self.geometry) / 1e9}
                for i, v in enumerate(self.schedule)]

    def to_dict(self) -> dict:
        return {
            "n_visual": self.n_visual,
            "n_text": self.n_text,
            "baseline_paper_tflops": self.baseline_paper / 1e12,
            "paper_tflops": self.paper / 1e12,
            "paper_ratio": self.paper / self.baseline_paper,
            "baseline_true_tflops": self.baseline_true / 1e12,
            "true_tflops": self.true / 1e12,
            "true_ratio": self.true / self.baseline_true,
            "visual_tokens_per_layer": list(self.schedule),
            "per_layer": self.rows(),
        }


def schedule_from_plan(num_layers: int, n_visual: int, steps: list[tuple[int, int]]) -> list[int]:
    """Visual tokens at each layer's input after removals [(boundary, kept_visual), ...]."""
    schedule = [n_visual] * num_layers
    for boundary, kept in sorted(steps):
        for layer in range(boundary, num_layers):
            schedule[layer] = min(schedule[layer], kept)
    return schedule


def fmt_flops(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.3f} {unit}"
    return f"{x / 1e3:.3f} K"
