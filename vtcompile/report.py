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
    recipes: dict = field(default_factory=dict)  # per calibrating pass: its recipe's JSON fields and "summary"
    # A program with branches (compiler.branches): one row per way a prompt can run - no branch (after_layer -1),
    # then every branch - with its FLOPs ratios and, when the pass calibrated its decision here, how many of the
    # calibration prompts the decision sends that way. The flops field above is the no-branch case.
    exits: list[dict] = field(default_factory=list)
    branch_label: str = "branch"  # what taking a branch means (the pass says: e.g. "visual-token exit")
    decode: str = ""  # how this target generates ("compiled decode step" or why it does not)

    def to_dict(self) -> dict:
        return {"model": self.model, "random_weights": self.random_weights, "passes": self.passes,
                "target": self.target, "flops": self.flops.to_dict(), "rewrites": self.rewrites,
                "recipes": self.recipes, "exits": self.exits, "branch_label": self.branch_label, "expected_on_calibration": self.expected_on_calibration(),
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
        """Paper/true FLOPs ratios averaged over the calibration prompts, each run the way the decision sends it
        (branches whose decision was calibrated here only; None otherwise)."""
        rows = [r for r in self.exits if r.get("calibration_prompts") is not None]
        n = sum(r["calibration_prompts"] for r in rows)
        if not rows or not n:
            return None
        return {"prompts": n, **{k: sum(r[k] * r["calibration_prompts"] for r in rows) / n
                                 for k in ("paper_ratio", "true_ratio")}}

    def summary_table(self) -> str:
        f = self.flops
        case = f"  without a {self.branch_label}" if self.exits else ""

        def saved(base, now, fmt) -> str:
            return f"{fmt(base)} -> {fmt(now)}  (saves {1 - now / base:.1%}){case}"

        rows = [
            ["model", self.model],
            ["passes", ", ".join(p["pass"] + _fmt_cfg(p["config"]) for p in self.passes) or "none"],
            ["target", self.target],
            ["visual tokens (per row)", f"{f.n_visual} -> {f.schedule[-1]} (last layer)"
             + _after_branches(self.exits, self.branch_label)],
            ["paper FLOPs (visual tokens only)", saved(f.baseline_paper, f.paper, fmt_flops)],
            [f"true FLOPs ({f.n_text} text tokens, 2xMAC)", saved(f.baseline_true, f.true, fmt_flops)],
            [f"KV cache after prefill ({f.n_text} text tokens)", saved(f.baseline_kv_bytes, f.kv_bytes, fmt_bytes)],
            *_expected_rows(self.expected_on_calibration()),
            *[[f"{name} recipe", r.get("summary", "")] for name, r in self.recipes.items()],
            *([["generate", self.decode]] if self.decode else []),
            ["capture (torch.export) s", f"{self.capture_seconds:.2f}"],
            *([["calibration s", f"{self.calibration_seconds:.2f}"]] if self.calibration_seconds > 0.01 else []),
            ["passes + lowering s", f"{self.compile_seconds:.2f}"],
        ]
        return tabulate(rows, tablefmt="simple_outline")

    def layer_table(self) -> str:
        return layer_table(self.flops)

    def exit_table(self) -> str:
        """A program with branches: FLOPs of each way a prompt can run and where the decision sent the calibration
        prompts ("" without branches)."""
        return self.branch_table(self.exits, self.branch_label) if self.exits else ""

    @staticmethod
    def branch_table(rows: list[dict], label: str) -> str:
        """One line per way a prompt can run (Report.exits rows): FLOPs and KV ratios vs unpruned, and how many
        calibration prompts the decision sent that way."""
        counted = any(r.get("calibration_prompts") is not None for r in rows)
        body = [["none" if r["after_layer"] < 0 else f"after layer {r['after_layer']}", f"{r['paper_ratio']:.1%}",
                 f"{r['true_ratio']:.1%}", f"{r['kv_ratio']:.1%}" if "kv_ratio" in r else "-"]
                + (["-" if r.get("calibration_prompts") is None else r["calibration_prompts"]] if counted else [])
                for r in rows]
        return tabulate(body, headers=[label, "paper FLOPs", "true FLOPs", "KV cache"]
                        + (["calibration prompts"] if counted else []), tablefmt="simple_outline")


def _expected_rows(expected: dict | None) -> list[list[str]]:
    if not expected:
        return []
    return [[f"expected FLOPs ({expected['prompts']} calibration prompts)",
             f"paper {expected['paper_ratio']:.1%}, true {expected['true_ratio']:.1%} (each prompt exits where its "
             "decision sends it)"]]


def exit_rows(program, text_tokens: int, dtype_bytes: int = 2) -> list[dict]:
    """Report.exits for a program with branches: the no-branch schedule, then each branch's."""
    counts = program.branches.calibration_prompts
    ways = [(-1, program)] + sorted(program.branches.programs.items())
    rows = []
    for e, p in ways:
        f = FlopsReport(program.geometry, program.n_visual, text_tokens, list(p.schedule), list(p.mlp_schedule),
                        dtype_bytes, list(p.q_heads), list(p.kv_heads), list(p.adapted))
        rows.append({"after_layer": e, "paper_ratio": f.paper / f.baseline_paper, "true_ratio": f.true / f.baseline_true,
                     "kv_ratio": f.kv_bytes / f.baseline_kv_bytes, "visual_last_layer": p.schedule[-1],
                     "calibration_prompts": None if counts is None else counts.get(e, 0)})
    return rows


def static_report(geometry, passes: list, n_visual: int, text_tokens: int, dtype_bytes: int = 2):
    """The FLOPs report of `passes` [(PassDef, config)] from the geometry alone (no weights, no graph), and, when
    a pass makes branches, one row per way a prompt can run (as Report.exits) with the branch label."""
    from .compiler.flops import report_from_plan

    steps, branches, label = [], {}, "branch"
    for p, cfg in passes:
        p.check_supports(geometry)
        cfg.check_model(geometry)
        made = p.branch_plans(cfg, geometry, n_visual) if p.branch_plans is not None else None
        if made:
            label, plans = made
            branches = {e: steps + extra for e, extra in plans.items()}
        steps = steps + p.plan(cfg, geometry, n_visual)
    heads = None
    for p, cfg in passes:  # passes that remove heads or attentions: the fewest heads per layer
        if p.heads is not None:
            q, kv = p.heads(cfg, geometry)
            heads = (q, kv) if heads is None else ([min(a, b) for a, b in zip(heads[0], q)],
                                                   [min(a, b) for a, b in zip(heads[1], kv)])

    def report(plan_steps):
        rep = report_from_plan(geometry, n_visual, text_tokens, plan_steps, dtype_bytes)
        return rep if heads is None else dataclasses.replace(rep, q_heads=heads[0], kv_heads=heads[1])

    main = report(steps)
    rows = []
    for e, f in [(-1, main)] + [(e, report(s)) for e, s in sorted(branches.items())] if branches else []:
        rows.append({"after_layer": e, "paper_ratio": f.paper / f.baseline_paper,
                     "true_ratio": f.true / f.baseline_true, "kv_ratio": f.kv_bytes / f.baseline_kv_bytes,
                     "visual_last_layer": f.schedule[-1], "calibration_prompts": None})
    return main, rows, label


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


def _after_branches(rows: list[dict], label: str) -> str:
    """'; N after a <label>' when every branch leaves the same visual tokens at the last layer."""
    left = {r.get("visual_last_layer") for r in rows if r["after_layer"] >= 0}
    if not left:
        return ""
    return f"; {left.pop()} after a {label}" if len(left) == 1 and None not in left else f"; see the {label} table"


def _fmt_cfg(cfg: dict) -> str:
    """A pass's fields as `(a=1, b=2)`, by name: a report compiled here and one loaded from an artifact (whose JSON
    keeps keys sorted) print the same."""
    shown = {k: v for k, v in cfg.items() if v not in ("", [], ())}
    return "(" + ", ".join(f"{k}={v}" for k, v in sorted(shown.items())) + ")" if shown else ""


def flops_tables(report: FlopsReport, branches: list[dict], label: str, text_tokens: int, dtype: str) -> str:
    """What `vtcompile flops` prints: the per-layer table, the branch table when a pass makes branches, and the
    per-prompt totals (paper and true FLOPs, KV bytes) unpruned vs pruned."""
    d = report.to_dict()
    parts = [layer_table(report)]
    if branches:
        parts += [f"The saving depends on the {label} each prompt takes, decided at run time (the table below is "
                  f"per way a prompt can run; the rows above and below are the case without a {label}):",
                  Report.branch_table(branches, label)]
    parts.append(tabulate([
        ["paper FLOPs (visual tokens)", fmt_flops(report.baseline_paper), fmt_flops(report.paper),
         f"{d['paper_ratio']:.1%}", f"{1 - d['paper_ratio']:.1%}"],
        [f"true FLOPs ({text_tokens} text tokens, 2xMAC)", fmt_flops(report.baseline_true),
         fmt_flops(report.true), f"{d['true_ratio']:.1%}", f"{1 - d['true_ratio']:.1%}"],
        [f"KV cache after prefill ({dtype})", fmt_bytes(report.baseline_kv_bytes), fmt_bytes(report.kv_bytes),
         f"{d['kv_ratio']:.1%}", f"{1 - d['kv_ratio']:.1%}"]],
        headers=["per prompt", "unpruned", f"pruned, no {label}" if branches else "pruned", "ratio", "saved"],
        tablefmt="simple_outline"))
    return "\n".join(parts)


def manifest_table(m: dict) -> str:
    """An artifact's manifest (artifacts.verify) as `vtcompile inspect` prints it; KeyError/TypeError when a field
    is missing."""
    f = m["report"]["flops"]
    rows = [["model", m["report"]["model"]], ["config hash", m["config_hash"]],
            ["passes", "\n".join(p["pass"] + _fmt_cfg(p["config"]) for p in m["passes"]) or "none"],
            ["target", m["target"]], ["generate", m.get("generate", "")],
            ["versions", ", ".join(f"{k} {v}" for k, v in m["versions"].items())],
            ["programs", ", ".join(f"{p['n_visual']} visual tokens ({len(p['stages'])} stage(s)"
                                   + (", decode step" if p.get("decode") else ", no decode step") + ")"
                                   for p in m["programs"])],
            ["visual tokens per layer", " ".join(map(str, f["visual_tokens_per_layer"]))],
            ["paper FLOPs", f"{fmt_flops(f['baseline_paper_tflops'] * 1e12)} -> "
                            f"{fmt_flops(f['paper_tflops'] * 1e12)} (saves {1 - f['paper_ratio']:.1%})"],
            ["true FLOPs", f"{fmt_flops(f['baseline_true_tflops'] * 1e12)} -> {fmt_flops(f['true_tflops'] * 1e12)}"
                           f" (saves {1 - f['true_ratio']:.1%})"],
            ["KV cache after prefill", f"{fmt_bytes(f['baseline_kv_cache_bytes'])} -> "
                                       f"{fmt_bytes(f['kv_cache_bytes'])} (saves {1 - f['kv_ratio']:.1%})"],
            ["files", f"{len(m['files'])}, {fmt_bytes(sum(e['bytes'] for e in m['files'].values()))}, "
                      "sha256 verified"]]
    return tabulate(rows, tablefmt="simple_outline")
