"""FLOPs and KV-cache bytes of a token schedule: the papers' convention and true FLOPs, per layer and total.

Paper convention (the tables of the token-pruning papers): per decoder layer with n visual tokens,
4nd^2 + 2n^2d + 3ndm, text tokens ignored (3.82 T for LLaVA-1.5-7B). True FLOPs: 2 x multiply-accumulates
of every decoder layer and the LM head over all tokens (text included), q/o and GQA-sized k/v projections,
dense attention scores and values, SwiGLU MLP. KV-cache bytes: the prompt's cache after prefill, each layer
holding K and V (GQA-sized) of the tokens its attention saw, in the model dtype. All analytic from the geometry,
so they work for 7B/13B without allocating weights.

Head slicing (compiler.heads) enters per layer as the query and k/v heads its attention runs: in the paper
convention the q/o projections and the attention scale with the kept query-head fraction and the k/v projections
with the kept k/v-head fraction (4nd^2 -> 2nd^2 (f_q + f_kv), 2n^2d -> 2n^2d f_q); a layer whose attention was
removed (0 heads) keeps only its MLP, plus n d^2 if a linear adapter stands in for the attention. True FLOPs use
the head counts directly; a layer's KV bytes its k/v heads (none without attention).
"""
from __future__ import annotations

from dataclasses import dataclass

from .cut import Cut
from .geometry import Geometry


def paper_layer(n: int, g: Geometry, n_mlp: int | None = None, q_heads: int | None = None,
                kv_heads: int | None = None, adapter: bool = False) -> float:
    """n tokens in the attention half, n_mlp (default n) in the MLP half of one layer; q_heads / kv_heads the heads
    its attention runs (default all; 0: attention removed, `adapter`: a d x d linear stands in for it)."""
    d, m = g.hidden_size, g.intermediate_size
    n_mlp = n if n_mlp is None else n_mlp
    fq = 1.0 if q_heads is None else q_heads / g.num_heads
    fkv = 1.0 if kv_heads is None else kv_heads / g.num_kv_heads
    return 2 * n * d * d * (fq + fkv) + 2 * n * n * d * fq + 3 * n_mlp * d * m + (n * d * d if adapter else 0)


def true_layer(n: int, g: Geometry, n_mlp: int | None = None, q_heads: int | None = None,
               kv_heads: int | None = None, adapter: bool = False) -> float:
    d, m = g.hidden_size, g.intermediate_size
    n_mlp = n if n_mlp is None else n_mlp
    kv = (g.num_kv_heads if kv_heads is None else kv_heads) * g.head_dim
    qo = (g.num_heads if q_heads is None else q_heads) * g.head_dim
    proj = n * d * (2 * qo + 2 * kv) + (n * d * d if adapter else 0)
    attn = 2 * n * n * qo
    mlp = 3 * n_mlp * d * m
    return 2.0 * (proj + attn + mlp)


def kv_layer_bytes(n: int, g: Geometry, dtype_bytes: int, kv_heads: int | None = None) -> int:
    """Bytes of one layer's K and V for n tokens (one prompt); kv_heads: the layer's k/v heads (default all)."""
    return 2 * n * (g.num_kv_heads if kv_heads is None else kv_heads) * g.head_dim * dtype_bytes


@dataclass
class FlopsReport:
    geometry: Geometry
    n_visual: int
    n_text: int
    schedule: list[int]  # visual tokens in each layer's attention
    mlp_schedule: list[int] | None = None  # visual tokens in each layer's MLP (default: as schedule)
    dtype_bytes: int = 2  # bytes per cached K/V element (the model dtype)
    q_heads: list[int] | None = None  # query heads each layer's attention runs (default: all; 0: removed)
    kv_heads: list[int] | None = None  # k/v heads each layer's attention (and cache) keeps
    adapted: list[int] | None = None  # layers whose removed attention a d x d linear adapter stands in for

    def __post_init__(self):
        if self.mlp_schedule is None:
            self.mlp_schedule = list(self.schedule)
        layers = len(self.schedule)
        self.q_heads = [self.geometry.num_heads] * layers if self.q_heads is None else list(self.q_heads)
        self.kv_heads = [self.geometry.num_kv_heads] * layers if self.kv_heads is None else list(self.kv_heads)
        self.adapted = [] if self.adapted is None else sorted(self.adapted)

    def _heads(self, layer: int) -> dict:
        return {"q_heads": self.q_heads[layer], "kv_heads": self.kv_heads[layer], "adapter": layer in self.adapted}

    @property
    def baseline_paper(self) -> float:
        return sum(paper_layer(self.n_visual, self.geometry) for _ in self.schedule)

    @property
    def paper(self) -> float:
        return sum(paper_layer(v, self.geometry, w, **self._heads(i))
                   for i, (v, w) in enumerate(zip(self.schedule, self.mlp_schedule)))

    def _true(self, schedule, mlp_schedule, heads: bool = True) -> float:
        g, t = self.geometry, self.n_text
        head = 2.0 * (t + mlp_schedule[-1]) * g.hidden_size * g.vocab_size
        return sum(true_layer(t + v, g, t + w, **(self._heads(i) if heads else {}))
                   for i, (v, w) in enumerate(zip(schedule, mlp_schedule))) + head

    @property
    def baseline_true(self) -> float:
        full = [self.n_visual] * len(self.schedule)
        return self._true(full, full, heads=False)

    @property
    def true(self) -> float:
        return self._true(self.schedule, self.mlp_schedule)

    @property
    def kv_bytes(self) -> int:
        return sum(kv_layer_bytes(self.n_text + v, self.geometry, self.dtype_bytes, self.kv_heads[i])
                   for i, v in enumerate(self.schedule))

    @property
    def baseline_kv_bytes(self) -> int:
        return len(self.schedule) * kv_layer_bytes(self.n_text + self.n_visual, self.geometry, self.dtype_bytes)

    def rows(self) -> list[dict]:
        return [{"layer": i, "visual_tokens": v, "visual_tokens_mlp": w, "tokens": v + self.n_text,
                 "q_heads": self.q_heads[i], "kv_heads": self.kv_heads[i],
                 "paper_gflops": paper_layer(v, self.geometry, w, **self._heads(i)) / 1e9,
                 "true_gflops": true_layer(v + self.n_text, self.geometry, w + self.n_text, **self._heads(i)) / 1e9,
                 "kv_bytes": kv_layer_bytes(v + self.n_text, self.geometry, self.dtype_bytes, self.kv_heads[i])}
                for i, (v, w) in enumerate(zip(self.schedule, self.mlp_schedule))]

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
            "kv_cache_bytes": self.kv_bytes,
            "baseline_kv_cache_bytes": self.baseline_kv_bytes,
            "kv_ratio": self.kv_bytes / self.baseline_kv_bytes,
            "dtype_bytes": self.dtype_bytes,
            "visual_tokens_per_layer": list(self.schedule),
            "visual_tokens_per_layer_mlp": list(self.mlp_schedule),
            "q_heads_per_layer": list(self.q_heads),
            "kv_heads_per_layer": list(self.kv_heads),
            "attention_adapters": list(self.adapted),
            "per_layer": self.rows(),
        }


def schedules_from_plan(num_layers: int, n_visual: int, steps: list[tuple]) -> tuple[list[int], list[int]]:
    """Visual tokens in each layer's attention and MLP after removals [(cut, kept_visual), ...] (a cut is a
    compiler.cut.Cut, or a layer number for the cut before that layer)."""
    attn, mlp = [n_visual] * num_layers, [n_visual] * num_layers
    for cut, kept in steps:
        cut = Cut.at(cut)
        for layer in range(num_layers):
            if cut.removes_from_attention(layer):
                attn[layer] = min(attn[layer], kept)
            if cut.removes_from_mlp(layer):
                mlp[layer] = min(mlp[layer], kept)
    return attn, mlp


def schedule_from_plan(num_layers: int, n_visual: int, steps: list[tuple[float, int]]) -> list[int]:
    """Visual tokens in each layer's attention (see schedules_from_plan)."""
    return schedules_from_plan(num_layers, n_visual, steps)[0]


def report_from_plan(geometry: Geometry, n_visual: int, n_text: int, steps, dtype_bytes: int = 2) -> FlopsReport:
    attn, mlp = schedules_from_plan(geometry.num_layers, n_visual, steps)
    return FlopsReport(geometry, n_visual, n_text, attn, mlp, dtype_bytes)


def fmt_bytes(x: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{int(x)} B"


def fmt_flops(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.3f} {unit}"
    return f"{x / 1e3:.3f} K"
