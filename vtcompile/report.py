"""The Report of a compile: model, passes, what was removed and what it saves (FLOPs, tokens, KV-cache bytes per
layer), times; printed as tables by the CLI and stored in every artifact's manifest."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tabulate import tabulate

from .compiler.flops import FlopsReport, fmt_bytes, fmt_flops


@dataclass
class Report:
    model: str
    random_weights: bool
    passes: list[dict]
    target: str
    flops: FlopsReport
    capture_seconds: float
    compile_seconds: float
    calibration_seconds: float = 0.0
    rewrites: list[dict] = field(default_factory=list)
    recipes: dict = field(default_factory=dict)
    # Dynamic exits (dyvte with routers): one row per way a prompt can run - no exit (after_layer -1), then
    # every candidate exit - with its FLOPs ratios and, when the routers were calibrated here, the share of the
    # calibration prompts the routers send that way. The flops field above is the no-exit (worst) case.
    exits: list[dict] = field(default_factory=list)
    decode: str = ""  # how this target generates ("compiled decode step" or why it does not)

    def to_dict(self) -> dict:
        return {"model": self.model, "random_weights": self.random_weights, "passes": self.passes,
                "target": self.target, "flops": self.flops.to_dict(), "rewrites": self.rewrites,
                "recipes": {name: {k: v for k, v in r.items() if not k.startswith("_")}
                            for name, r in self.recipes.items()},
                "exits": self.exits, "expected_on_calibration": self.expected_on_calibration(),
                "capture_seconds": self.capture_seconds, "decode": self.decode,
                "calibration_seconds": self.calibration_seconds, "compile_seconds": self.compile_seconds}

    @classmethod
    def from_dict(cls, d: dict, geometry) -> "Report":
        """The Report stored in a manifest (tables print as after compile_pruned)."""
        d = dict(d)
        f = d["flops"]
        mlp = f.get("visual_tokens_per_layer_mlp")
        d["flops"] = FlopsReport(geometry, f["n_visual"], f["n_text"], list(f["visual_tokens_per_layer"]),
                                 list(mlp) if mlp else None, f.get("dtype_bytes", 2), f.get("q_heads_per_layer"),
                                 f.get("kv_heads_per_layer"), f.get("attention_adapters"))
        names = {fl.name for fl in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def expected_on_calibration(self) -> dict | None:
        """Paper/true FLOPs ratios averaged over the calibration prompts, each run the way its routers send it
        (dynamic exits calibrated here only; None otherwise)."""
        rows = [r for r in self.exits if r.get("calibration_prompts") is not None]
        n = sum(r["calibration_prompts"] for r in rows)
        if not rows or not n:
            return None
        return {"prompts": n, **{k: sum(r[k] * r["calibration_prompts"] for r in rows) / n
                                 for k in ("paper_ratio", "true_ratio")}}

    def summary_table(self) -> str:
        f = self.flops
        case = "  without an exit" if self.exits else ""

        def saved(base, now, fmt) -> str:
            return f"{fmt(base)} -> {fmt(now)}  (saves {1 - now / base:.1%}){case}"

        rows = [
            ["model", self.model],
            ["passes", ", ".join(p["pass"] + _fmt_cfg(p["config"]) for p in self.passes) or "none"],
            ["target", self.target],
            ["visual tokens (per row)", f"{f.n_visual} -> {f.schedule[-1]} (last layer)"
             + ("; 0 after an exit" if self.exits else "")],
            ["paper FLOPs (visual tokens only)", saved(f.baseline_paper, f.paper, fmt_flops)],
            [f"true FLOPs ({f.n_text} text tokens, 2xMAC)", saved(f.baseline_true, f.true, fmt_flops)],
            [f"KV cache after prefill ({f.n_text} text tokens)", saved(f.baseline_kv_bytes, f.kv_bytes, fmt_bytes)],
            *_expected_rows(self.expected_on_calibration()),
            *[[f"{name} recipe", _fmt_recipe(r)] for name, r in self.recipes.items()],
            *([["generate", self.decode]] if self.decode else []),
            ["capture (torch.export) s", f"{self.capture_seconds:.2f}"],
            *([["calibration s", f"{self.calibration_seconds:.2f}"]] if self.calibration_seconds > 0.01 else []),
            ["passes + lowering s", f"{self.compile_seconds:.2f}"],
        ]
        return tabulate(rows, tablefmt="simple_outline")

    def layer_table(self) -> str:
        return layer_table(self.flops)

    def exit_table(self) -> str:
        """Dynamic exits: FLOPs of each way a prompt can run and where the routers sent the calibration
        prompts ("" without dynamic exits)."""
        if not self.exits:
            return ""
        rows = [["none" if r["after_layer"] < 0 else f"after layer {r['after_layer']}", f"{r['paper_ratio']:.1%}",
                 f"{r['true_ratio']:.1%}",
                 "-" if r.get("calibration_prompts") is None else r["calibration_prompts"]] for r in self.exits]
        return tabulate(rows, headers=["visual-token exit", "paper FLOPs", "true FLOPs", "calibration prompts"],
                        tablefmt="simple_outline")


def _expected_rows(expected: dict | None) -> list[list[str]]:
    if not expected:
        return []
    return [[f"expected FLOPs ({expected['prompts']} calibration prompts)",
             f"paper {expected['paper_ratio']:.1%}, true {expected['true_ratio']:.1%} (each prompt exits where its "
             "routers send it)"]]


def exit_rows(program, text_tokens: int, counts: dict[int, int] | None, dtype_bytes: int = 2) -> list[dict]:
    """Report.exits for a program with branches: the no-exit schedule, then each branch's."""
    ways = [(-1, program)] + sorted(program.branches.programs.items())
    rows = []
    for e, p in ways:
        f = FlopsReport(program.geometry, program.n_visual, text_tokens, list(p.schedule), list(p.mlp_schedule),
                        dtype_bytes, list(p.q_heads), list(p.kv_heads), list(p.adapted))
        rows.append({"after_layer": e, "paper_ratio": f.paper / f.baseline_paper, "true_ratio": f.true / f.baseline_true,
                     "kv_ratio": f.kv_bytes / f.baseline_kv_bytes,
                     "calibration_prompts": None if counts is None else counts.get(e, 0)})
    return rows


def layer_table(flops: FlopsReport) -> str:
    """Per-layer visual tokens (attention / MLP half), FLOPs and KV-cache bytes."""
    base_kv = flops.baseline_kv_bytes / max(1, len(flops.schedule))
    g = flops.geometry
    sliced = flops.q_heads != [g.num_heads] * len(flops.schedule) or flops.kv_heads != [g.num_kv_heads] * len(
        flops.schedule)
    rows = [[r["layer"], r["visual_tokens"], r["visual_tokens_mlp"], r["tokens"]]
            + ([f"{r['q_heads']}/{r['kv_heads']}"] if sliced else [])
            + [f"{r['paper_gflops']:.4g}", f"{r['true_gflops']:.4g}",
               f"{fmt_bytes(r['kv_bytes'])} ({r['kv_bytes'] / base_kv:.0%})"]
            for r in flops.rows()]
    return tabulate(rows, headers=["layer", "visual (attn)", "visual (MLP)", "tokens"]
                    + (["heads (q/kv)"] if sliced else []) + ["paper GFLOPs", "true GFLOPs", "KV cache (vs unpruned)"],
                    tablefmt="simple_outline")


def _fmt_recipe(r: dict) -> str:
    if r.get("pass") == "headskip":
        return (f"heads removed {' '.join(r['heads']) or 'none'} (criterion {r['criterion']}, budget {r['budget']}, "
                f"{r['samples']} prompts)")
    if r.get("pass") == "attnskip":
        return (f"attention removed in layers {r['layers']}" + (" (+ linear adapters)" if "_tensors" in r else "")
                + f"; {r['samples']} prompts")
    if "exit_label_rate" in r:
        rates = " ".join(f"L{k}:{v:.0%}" for k, v in r["exit_label_rate"].items())
        return f"routers at layers {r['layers']}; exit-label rate {rates}; {r['samples']} prompts"
    removed = " ".join(f"L{k}:-{v}" for k, v in r.get("removed", {}).items()) or "removes nothing"
    extra = ""
    if "paper_ratio" in r:
        met = "met" if r.get("budget_met") else "NOT met"
        extra = f"  (budget {r['budget']:.2f}: {r['paper_ratio']:.1%} of paper FLOPs, {met}; alpha {r['alpha']:.3f})"
    return removed + extra


def _fmt_cfg(cfg: dict) -> str:
    shown = {k: v for k, v in cfg.items() if v not in ("", [], ())}
    return "(" + ", ".join(f"{k}={v}" for k, v in shown.items()) + ")" if shown else ""
