"""DyVTE: dynamic visual-token exit decided by small routers (Zhang et al., 2024; DoubtedSteam/DyVTE).

One router per candidate layer reads concat(mean hidden state of the text tokens after the image, hidden
state of the last prompt token) -> Linear(2d, hidden, no bias) -> GELU -> Linear(hidden, 2, no bias) ->
(keep, exit) logits. After each layer, the first router with exit > keep makes ALL visual tokens exit: later
layers see text only, with their original position ids. The graph is staged per layer
(compiler.staged) and each candidate exit has a continuation built with compiler.rewrite.drop_visual.
Static form (no routers): exit_layer=K drops every visual token after layer K. `threshold` (ours, not the
paper's) asks for a surer exit: a router fires when its exit probability is above it; the default 0.5 is the
published exit > keep rule.

Defaults (ours, issue 39; not the paper's): whole-answer labels (label=answer), candidate exits after layers 1 .. L-2,
and per-layer thresholds chosen by risk control (max_loss=0.005, cuts=layer) on half of 4096 calibration prompts -
an exit changes the answer of at most 0.5% of prompts like them, at 90% confidence. The published recipe is
`dyvte:label=token,max_loss=0` (routers fire at exit > keep), with `layers=0/1/...` for a router after every layer.

Router training (calibrate; the MLLM is frozen): for each calibration prompt and candidate layer e, the
prompt is run as is and with the visual tokens gone after layer e; the label is "exit" iff the greedy answer
token agrees and the answer loss with the exit stays below `loss_ratio` x the loss without it, plus `loss_slack`
nats (published rule: x1.03, no slack). The answer is the unpruned model's own greedy token, so calibration data
need no labels. label=answer (ours; issue 39) labels by the whole answer instead: the unpruned model's greedy answer
(until eos, at most answer_tokens) is generated from the prefill program (prompt + tokens so far, re-run each step),
then fed back once per candidate exit; the label is "exit" iff the program with that exit predicts every answer token
again, i.e. greedy generation with the exit returns the same whole answer (list answers whose first token survives
an exit and whose later tokens do not were labelled "exit" by the first-token rule). Routers train with
cross-entropy on detached hidden states (full-batch AdamW; the published recipe
samples one layer per step - equivalent in expectation on a fixed calibration set). With `holdout` > 0 (ours) a
seeded part of the prompts only measures a held-out loss, and each router keeps its weights from the epoch where
that loss was lowest.

Risk-controlled threshold (ours; issue 39): with ``max_loss`` > 0 a seeded share of the calibration prompts
(``risk_prompts``) never trains the routers; on it the exit threshold is chosen by Learn-then-Test (Angelopoulos et
al., 2021) with fixed-sequence testing over a grid of thresholds fixed in advance (``RISK_GRID``: margins from
strict to lenient): each threshold's null hypothesis "the share of prompts whose exit changes the answer exceeds
max_loss" is rejected when the binomial tail P(Bin(n, max_loss) <= errors) is at most ``delta``, and the most
lenient threshold reached before the first non-rejection is used. Then, over the draw of the held-out prompts,
P(share of changed answers on new prompts from the same distribution > max_loss) <= delta. "Changed" is the
label above: with label=token the greedy next token differs, or the answer loss grows past the label's bound, at
the answer's first token; with label=answer the whole greedy answer changes. With cuts=layer each router gets its
own threshold: half of the held-out prompts order the candidates into a path (saving_path: from no router firing,
each step loosens the one router whose next cut adds the most saved layers per changed answer on those prompts)
and the other half tests the path's steps in that order, as above (choose_layer_cuts); the path never sees the
tested prompts, so the same guarantee holds for their n. When no threshold passes (too few held-out prompts: with no error at all, n
must exceed log(delta) / log(1 - max_loss), 460 for 0.005 and 0.1), the routers never fire and the report says so.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..compiler.branches import Branches, Decision, register_decision
from ..compiler.cut import Cut
from ..compiler.geometry import Geometry
from ..compiler.program import Program
from ..compiler.rewrite import drop_visual
from ..compiler.scorers import text_after_images
from ..compiler.taps import run_with_taps
from ..errors import PassConfigError
from .base import PassConfig, PassDef, Recipe, param, register, tensors_field


LABELS = ("token", "answer")  # how calibration labels an exit (DyVTEConfig.label)
CUTS = ("one", "layer")  # risk control's thresholds: one for every router, or one per router (DyVTEConfig.cuts)


@dataclass(frozen=True)
class DyVTEConfig(PassConfig):
    name = "dyvte"
    exit_layer: int = param(-1, "static form: every visual token exits after this layer (-1: routers decide)",
                            low=-1)
    layers: tuple[int, ...] = param((), "candidate exit layers for the routers (empty: every layer but the first and "
                                        "the last - an exit after layer 0 leaves the image one layer; with fewer than "
                                        "3 layers, every layer but the last)")
    hidden: int = param(0, "router hidden width (0: 2048, or 2 x the model width when that is smaller)", low=0)
    samples: int = param(4096, "calibration prompts (with max_loss, a share risk_prompts of them chooses the threshold "
                               "and never trains; ~0.1 s each on the testbed with label=answer, 2 CPU threads)", low=1)
    epochs: int = param(300, "router training epochs over the calibration features", low=1)
    lr: float = param(1e-3, "router learning rate (AdamW)", low=0.0, low_open=True)
    loss_ratio: float = param(1.03, "exit label: answer loss with exit < ratio x loss without (+ loss_slack)", low=1.0)
    loss_slack: float = param(0.0, "exit label: nats the answer loss may grow beyond ratio x loss without (0: the "
                                   "published rule; a confident model's loss is near 0, where a ratio alone forbids "
                                   "almost every exit)", low=0.0)
    label: str = param("answer", "exit label: 'token' - the published rule on the answer's first token (it agrees, "
                                "its loss within loss_ratio and loss_slack); 'answer' - the whole greedy answer "
                                "(until eos, at most answer_tokens) with the exit equals the answer without it")
    answer_tokens: int = param(24, "with label=answer: the longest answer compared, in tokens", low=1)
    cuts: str = param("layer", "with max_loss: 'one' threshold for every router, or one per 'layer' (half of the "
                             "held-out prompts order the routers' cuts into a path, each step loosening the router "
                             "that adds the most saved layers per changed answer; the other half tests the path's "
                             "steps in that order)")
    holdout: float = param(0.25, "fraction of the calibration prompts held out: each router keeps the weights of the "
                                 "epoch with the lowest held-out loss (0: every prompt trains for every epoch, the "
                                 "published recipe; routers then overfit a small calibration set)",
                           low=0.0, high=1.0, high_open=True)
    threshold: float = param(0.5, "a router fires when its exit probability is above this (0.5: exit logit > keep "
                                  "logit, the published rule; higher: fewer, surer exits)",
                             low=0.0, high=1.0, low_open=True, high_open=True)
    max_loss: float = param(0.005, "choose the threshold on held-out calibration prompts so that the share of prompts "
                                 "whose answer an exit changes stays under this with probability 1 - delta "
                                 "(Learn-then-Test, binomial bound; replaces `threshold`); 0: off, the routers "
                                 "fire at `threshold`",
                            low=0.0, high=1.0, high_open=True)
    delta: float = param(0.1, "with max_loss: allowed probability that the held-out prompts mislead the choice",
                         low=0.0, high=1.0, low_open=True, high_open=True)
    risk_prompts: float = param(0.5, "with max_loss: share of the calibration prompts kept apart to choose the "
                                     "threshold (they never train the routers)",
                                low=0.0, high=1.0, low_open=True, high_open=True)
    routers: str = param("", "routers to use instead of training: the recipe .json that `vtcompile calibrate` wrote "
                             "(the weights, and with max_loss the threshold risk control chose) or a .safetensors "
                             "of router weights (a saved artifact's)")
    seed: int = param(0, "seed of the routers' initialisation (the same data and seed give the same routers)", low=0)

    def __post_init__(self):
        super().__post_init__()
        if self.label not in LABELS:
            raise PassConfigError(f"dyvte: label={self.label!r} is not known; expected one of {', '.join(LABELS)}")
        if self.cuts not in CUTS:
            raise PassConfigError(f"dyvte: cuts={self.cuts!r} is not known; expected one of {', '.join(CUTS)}")

    def check_model(self, geometry: Geometry) -> None:
        last = geometry.num_layers - 2
        if self.exit_layer > last:
            raise PassConfigError(f"dyvte: exit_layer={self.exit_layer} is out of range; tokens can exit after "
                                  f"layers 0..{last} of this {geometry.num_layers}-layer model")
        bad = [e for e in self.layers if not 0 <= e <= last]
        if bad:
            raise PassConfigError(f"dyvte: candidate exit layers {bad} are out of range 0..{last}")

    def needs_calibration(self) -> bool:
        return self.exit_layer < 0 and not self.routers

    def check_risk(self) -> None:
        if self.max_loss > 0 and self.routers and not _is_recipe_file(self.routers):
            raise PassConfigError("dyvte: max_loss chooses the threshold on held-out calibration prompts, and a "
                                  ".safetensors of router weights carries none; give the recipe .json that "
                                  "`vtcompile calibrate` wrote with this max_loss (it holds the threshold), calibrate "
                                  "(--calibration DATA), or give threshold=P instead of max_loss")

    def width(self, geometry: Geometry) -> int:
        return self.hidden or min(2048, 2 * geometry.hidden_size)

    def candidates(self, program: Program) -> list[int]:
        layers = self.layers or default_layers(program.geometry.num_layers)
        return [e for e in layers if Cut(e + 1) >= program.last_cut]  # exits must follow earlier rewrites


def default_layers(num_layers: int) -> tuple[int, ...]:
    """Candidate exits when none are given: after layers 1 .. L-2 (after layer 0 too when L < 3). An exit after layer
    0 leaves the image to one layer: on the shipped testbed that static exit keeps 12.8% of the answers (97.3%
    unpruned) and its whole-answer label rate is 0% for color, shape and list questions, so a router there mostly
    spends the changed answers risk control allows (bench/README.md)."""
    first = 1 if num_layers >= 3 else 0
    return tuple(range(first, num_layers - 1))


def router_features(hidden: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """concat(mean of text states after the image, last prompt token state): [B, S, D] -> [B, 2D]."""
    after = text_after_images(visual).float()
    mean = (after.unsqueeze(-1) * hidden.float()).sum(1) / after.sum(1, keepdim=True).clamp(min=1.0)
    return torch.cat([mean, hidden[:, -1].float()], dim=-1)


@register_decision
class Routers(nn.Module, Decision):
    """The branch decision of a routed program (compiler.branches): after layer e, the rows whose router fires
    continue in the continuation without visual tokens."""

    kind = "dyvte.routers"

    def __init__(self, layers: list[int], dim: int, width: int, threshold: float = 0.5,
                 cut: float | list[float] | None = None):
        super().__init__()
        self.layers = list(layers)
        self.threshold = threshold
        # risk control's (math.inf: never fires): one cut, or one per layer (in the order of `layers`)
        self.chosen_cut = None if cut is None else [float(c) for c in cut] if isinstance(cut, list) else float(cut)
        self.dim, self.width = dim, width
        self.mlps = nn.ModuleDict({
            str(e): nn.Sequential(nn.Linear(2 * dim, width, bias=False), nn.GELU(), nn.Linear(width, 2, bias=False))
            for e in layers})
        for p in self.parameters():
            nn.init.xavier_uniform_(p)

    @property
    def cut(self) -> float | list[float]:
        """The margin (exit logit - keep logit) a router must pass: risk control's (one, or one per layer), else
        the threshold's."""
        return exit_cut(self.threshold) if self.chosen_cut is None else self.chosen_cut

    def cut_at(self, layer: int) -> float:
        cut = self.cut
        return cut[self.layers.index(layer)] if isinstance(cut, list) else cut

    def logits(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        return self.mlps[str(layer)](features)

    def margin(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """Exit logit - keep logit per row: the router fires where it passes ``cut``."""
        logit = self.logits(layer, features)
        return logit[:, 1] - logit[:, 0]

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict())

    def meta(self) -> dict:
        return {"layers": list(self.layers), "width": self.width, "threshold": self.threshold,
                "cut": cut_to_json(self.chosen_cut)}

    @classmethod
    def load(cls, meta: dict, state: dict, geometry: Geometry) -> "Routers":
        _check_width(state, geometry)
        routers = cls(meta["layers"], geometry.hidden_size, meta["width"], meta["threshold"],
                      cut_from_json(meta.get("cut")))  # None (or absent, before risk control): the threshold's
        routers.load_state_dict(state)
        return routers.eval()

    @torch.no_grad()
    def decide(self, layer: int, hidden: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """True for rows whose router says exit: exit logit - keep logit > cut, i.e. exit probability > threshold
        (cut log(threshold / (1 - threshold)), 0 at the default 0.5: exit logit > keep logit), or the cut that
        risk control chose."""
        features = router_features(hidden, visual).to(self.mlps[str(layer)][0].weight.dtype)
        return (self.margin(layer, features) > self.cut_at(layer)).cpu()


def cut_to_json(cut):
    """A chosen cut (or a list of them, one per layer) as JSON holds it: infinity (never fire) as "never"; None
    stays None."""
    if isinstance(cut, list):
        return [cut_to_json(c) for c in cut]
    return "never" if cut == math.inf else cut


def cut_from_json(value):
    if isinstance(value, list):
        return [cut_from_json(v) for v in value]
    return math.inf if value == "never" else (None if value is None else float(value))


def exit_cut(threshold: float) -> float:
    """The margin (exit logit - keep logit) a router must pass to fire at exit probability ``threshold``."""
    return math.log(threshold / (1 - threshold))


# Learn-then-Test's hypotheses, fixed before any data: exit-margin cuts from strict to lenient (exit probability
# from 1 - 1e-13 down to 1e-13, steps of 0.05 in the logit)
RISK_GRID = [30.0 - 0.05 * i for i in range(1201)]


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Bin(n, p) <= k), summed in log space."""
    if k >= n or p <= 0.0:
        return 1.0
    if k < 0 or p >= 1.0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
             for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def binomial_upper(k: int, n: int, delta: float) -> float:
    """Clopper-Pearson upper confidence bound at level 1 - delta on a rate with k events in n trials: the largest
    p with P(Bin(n, p) <= k) >= delta."""
    if k >= n:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if binomial_cdf(k, n, mid) > delta else (lo, mid)
    return hi


def first_exits(margins: torch.Tensor, cut) -> torch.Tensor:
    """[L, N] margins (candidate layers in order) -> [N] index of the first layer whose margin passes `cut` (one
    cut, or a list: one per layer), or L (no exit)."""
    fires = margins > (torch.tensor(cut, dtype=margins.dtype)[:, None] if isinstance(cut, list) else cut)
    return torch.where(fires.any(0), fires.int().argmax(0), torch.full_like(fires[0], margins.shape[0], dtype=torch.long))


def exit_counts(margins: torch.Tensor, layers: list[int], cut) -> dict[int, int]:
    """Where routers at `cut` send prompts: [L, N] margins at `layers` -> {exit layer (-1: none): prompts}."""
    counts: dict[int, int] = {}
    for i in first_exits(margins, cut).tolist():
        e = layers[i] if i < len(layers) else -1
        counts[e] = counts.get(e, 0) + 1
    return counts


def changed_answers(margins: torch.Tensor, keeps: torch.Tensor, cuts) -> torch.Tensor:
    """Per cut, how many prompts the routers send to an exit whose label says the answer changes: margins, keeps
    [L, N] -> [len(cuts)] (a prompt exits at its first layer whose margin passes the cut; a cut is one number, or
    a list of one per layer)."""
    cuts = torch.as_tensor(cuts, dtype=margins.dtype)
    cuts = cuts.reshape(-1, 1, 1) if cuts.dim() < 2 else cuts.unsqueeze(-1)  # [G, 1 or L, 1]
    changes = ~keeps.bool()
    step = max(1, (1 << 23) // max(1, margins.numel()))  # cuts per chunk: at most ~8M booleans at once
    out = []
    for part in cuts.split(step):
        fires = margins[None] > part  # [G, L, N]
        first = fires.int().argmax(1, keepdim=True)  # [G, 1, N]: the first firing layer (0 where none fires)
        changed = changes[None].expand_as(fires).gather(1, first)[:, 0]
        out.append((fires.any(1) & changed).sum(-1))
    return torch.cat(out)


def choose_cut(margins: torch.Tensor, keeps: torch.Tensor, max_loss: float, delta: float) -> dict:
    """Learn-then-Test with fixed-sequence testing over RISK_GRID (module docstring): the most lenient cut whose
    null "risk > max_loss" is rejected at level delta, with every stricter cut rejected too. margins, keeps: [L, N]
    (exit logit - keep logit; 1 where exiting after that layer keeps the answer) on prompts that did not train the
    routers. Returns the cut (math.inf: none passed), its errors, n, the p-value and the Clopper-Pearson bound."""
    n = margins.shape[1]
    chosen, errors, p_value = math.inf, 0, None
    for cut, k in zip(RISK_GRID, changed_answers(margins, keeps, RISK_GRID).tolist()):
        p = binomial_cdf(k, n, max_loss)
        if p > delta:
            break
        chosen, errors, p_value = cut, k, p
    return {"cut": chosen, "errors": errors, "prompts": n, "p_value": p_value,
            "bound": binomial_upper(errors, n, delta)}


def saving_path(margins: torch.Tensor, keeps: torch.Tensor, value) -> list[list[float]]:
    """The per-layer form's path of cuts, from the ordering prompts (margins, keeps [L, N]) and what an exit at each
    candidate layer is worth (value [L]: the layers whose visual work it skips). It starts with no router firing;
    each step lowers one router's cut to the next value of RISK_GRID at which it fires on more ordering prompts,
    taking the move that adds the most saving per answer it changes: moves that change none first (most saving
    first), then the best saving per changed answer (ties: the earlier layer). An exit after layer 1 is worth four
    after layer 4 on a 6-layer model, so a path that loosens every router alike (one share of changed answers per
    router) spends the allowed changes where they buy least; this one spends them where they buy most."""
    n_layers, n = margins.shape
    grid = torch.tensor(RISK_GRID, dtype=margins.dtype).tolist()  # compared in the margins' precision, as later
    m, bad = margins.tolist(), (~keeps.bool()).tolist()
    worth = [float(v) for v in value] + [0.0]  # index n_layers: no exit
    moves = []  # per router: (grid index, prompts it starts firing on there), from strict to lenient
    for layer in range(n_layers):
        order = sorted(range(n), key=lambda p: -m[layer][p])
        steps, j = [], 0
        for gi, cut in enumerate(grid):
            start = j
            while j < n and m[layer][order[j]] > cut:
                j += 1
            if j > start:
                steps.append((gi, order[start:j]))
        moves.append(steps)
    first = [n_layers] * n  # each prompt's first firing router (firing only grows along the path)
    cuts, taken = [math.inf] * n_layers, [0] * n_layers
    path = [list(cuts)]
    while True:
        best = None
        for layer in range(n_layers):
            if taken[layer] == len(moves[layer]):
                continue
            gain = cost = 0.0
            for p in moves[layer][taken[layer]][1]:
                if layer < first[p]:  # the prompt now exits here instead of later (or never)
                    gain += worth[layer] - worth[first[p]]
                    cost += bad[layer][p] - (bad[first[p]][p] if first[p] < n_layers else 0)
            score = (1, gain) if cost <= 0 else (0, gain / cost)
            if best is None or score > best[0]:
                best = (score, layer)
        if best is None:
            return path
        layer = best[1]
        gi, fired = moves[layer][taken[layer]]
        taken[layer] += 1
        for p in fired:
            first[p] = min(first[p], layer)
        cuts[layer] = RISK_GRID[gi]
        path.append(list(cuts))


def choose_layer_cuts(order_m: torch.Tensor, order_k: torch.Tensor, margins: torch.Tensor, keeps: torch.Tensor,
                      max_loss: float, delta: float, value) -> dict:
    """Learn-then-Test over a path of per-layer cuts: the path (saving_path) comes from one half of the held-out
    prompts (order_m, order_k), the fixed-sequence tests from the other (margins, keeps): the cuts of the latest
    step whose null "risk > max_loss" is rejected with every earlier step rejected too. The path depends on data the
    tests never see, so choose_cut's guarantee holds for it, however many steps it has."""
    n = margins.shape[1]
    path = saving_path(order_m, order_k, value)
    chosen, errors, p_value, step = path[0], 0, None, None
    for i, (cuts, k) in enumerate(zip(path, changed_answers(margins, keeps, path).tolist())):
        p = binomial_cdf(k, n, max_loss)
        if p > delta:
            break
        chosen, errors, p_value, step = cuts, k, p, i
    return {"cut": chosen, "errors": errors, "prompts": n, "p_value": p_value, "step": step, "steps": len(path),
            "ordering_prompts": order_m.shape[1], "bound": binomial_upper(errors, n, delta)}


def _continuation(program: Program, exit_after: int) -> Program:
    return drop_visual(program.clone(), exit_after + 1, by="dyvte")


@dataclass
class DyVTERecipe(Recipe):
    """Trained routers (one per candidate layer), how their labels and training went, and per calibration prompt
    and layer the router's margin (exit logit - keep logit): where the routers send the calibration prompts at any
    threshold, without running them again."""

    name = "dyvte"
    layers: list = field(default_factory=list)
    hidden: int = 0
    routers: dict = tensors_field("the routers' weights (state dict: mlps.<layer>.*)")
    margins: dict = tensors_field("per layer: every calibration prompt's exit logit - keep logit")
    exit_label_rate: dict | None = None
    router_train_accuracy: dict | None = None
    samples: int | None = None
    final_loss: float | None = None
    holdout: dict | None = None
    calibration_seconds: float | None = None
    config_hash: str | None = None
    # with max_loss: the threshold Learn-then-Test chose on the held-out prompts (choose_cut's fields, the cut as
    # "never" when none passed; max_loss, delta; where the routers send those prompts at the cut)
    risk: dict | None = None

    def __post_init__(self):
        self.layers = [int(x) for x in self.layers]

    def describe(self) -> str:
        rates = " ".join(f"L{k}:{v:.0%}" for k, v in (self.exit_label_rate or {}).items())
        line = f"routers at layers {self.layers}; exit-label rate {rates or '?'}; {self.samples} prompts"
        r = self.risk
        if r:
            cut = r["cut"]

            def prob(c) -> str:
                return "never" if c == "never" else f"{1 / (1 + math.exp(-c)):.4g}"

            if cut == "never" or (isinstance(cut, list) and all(c == "never" for c in cut)):
                where = "no threshold passed: the routers never fire (more held-out prompts needed)"
            else:
                if isinstance(cut, list):
                    where_on = (f"step {r['step']} of {r['steps']} of a path ordered by saving per changed answer"
                                if "step" in r else f"lambda {r['lambda']:g}")  # "lambda": recipes of 0.1.1
                    what = (f"exit probability above L{', L'.join(f'{e}: {prob(c)}' for e, c in zip(self.layers, cut))}"
                            f" ({where_on}, ordered on {r['ordering_prompts']} other prompts)")
                else:
                    what = f"exit probability > {prob(cut)}"
                where = (f"{what}, {r['errors']} changed answer(s), share <= {r['bound']:.4f} at "
                         f"{1 - r['delta']:.0%} confidence")
            line += (f"; threshold for max_loss={r['max_loss']:g} (delta={r['delta']:g}) on {r['prompts']} held-out "
                     f"prompts: {where}")
        return line

    def risk_cut(self) -> float | None:
        """The margin cut risk control chose (math.inf: never fire), or None without risk control."""
        return cut_from_json(self.risk["cut"]) if self.risk else None

    def reuse(self, files) -> str:
        """The recipe's JSON (weights, and the threshold risk control chose with the max_loss it was chosen for)."""
        if len(files) < 2:
            return ""
        risk = f",max_loss={self.risk['max_loss']:g},delta={self.risk['delta']:g}" if self.risk else ""
        return f"--pass dyvte:routers={files[0]}{risk}"

    def prompts_by_exit(self, threshold: float) -> dict[int, int] | None:
        """Where the routers send the calibration prompts at ``threshold``: {exit layer (-1: none): prompts}.

        The features a router reads at layer e are those of the run without an exit (no row has exited before its
        first firing router), so the first layer whose margin passes the threshold is the exit the runtime takes on
        that prompt. None when the routers did not come from calibration (a routers file)."""
        if not self.margins:
            return None
        layers = sorted(self.margins, key=int)
        margins = torch.stack([torch.as_tensor(self.margins[e], dtype=torch.float64) for e in layers])
        return exit_counts(margins, [int(e) for e in layers], exit_cut(threshold))


def plan(config: DyVTEConfig, geometry: Geometry, n_visual: int, recipe=None):
    if config.exit_layer >= 0:
        return [(config.exit_layer + 1, 0)]
    return []  # dynamic: the schedule without an exit; the exits taken are reported per prompt


BRANCH_LABEL = "visual-token exit"


def branch_plans(config: DyVTEConfig, geometry: Geometry, n_visual: int) -> tuple[str, dict[int, list]] | None:
    """Without routers at hand: after each candidate layer e, every visual token exits (cut e + 1 keeps 0)."""
    if config.exit_layer >= 0:
        return None
    config.check_model(geometry)
    layers = config.layers or default_layers(geometry.num_layers)
    if config.routers:
        layers = routers_recipe(config.routers).layers
    return BRANCH_LABEL, {e: [(e + 1, 0)] for e in sorted(layers)}


def apply(program: Program, config: DyVTEConfig, recipe: DyVTERecipe | None = None) -> Program:
    config.check_model(program.geometry)
    config.check_risk()
    if config.exit_layer >= 0:
        return drop_visual(program, config.exit_layer + 1, by="dyvte")
    if recipe is None and config.routers:
        recipe = routers_recipe(config.routers)
    routers = load_routers(config, program.geometry, recipe)
    if config.max_loss > 0:  # the held-out prompts, routed at the chosen cut (load_routers checked there is one)
        counts = {int(e): int(c) for e, c in recipe.risk["prompts_by_exit"].items()}
    else:
        counts = recipe.prompts_by_exit(config.threshold)
    program.branches = Branches(routers, {e: _continuation(program, e) for e in routers.layers}, by="dyvte",
                                label=BRANCH_LABEL, calibration_prompts=counts)
    return program


def _is_recipe_file(path: str) -> bool:
    """A routers file given as calibrate's recipe .json (weights and chosen threshold), not bare weights."""
    return Path(path).suffix == ".json"


def routers_recipe(path: str) -> DyVTERecipe:
    """The recipe of a routers file: vtcompile calibrate's recipe .json (as written, with the threshold risk control
    chose), or a .safetensors of router weights (calibrate's, or an artifact's: layers and width from the tensor
    names and shapes)."""
    from safetensors.torch import load_file

    p = Path(path)
    if _is_recipe_file(path):
        recipe = DyVTERecipe.load(p)
        if not recipe.routers:
            raise PassConfigError(f"dyvte: the recipe {p} holds no router weights (its weights_file is missing)")
        return recipe
    if not p.is_file():
        raise PassConfigError(f"dyvte: routers file {p} does not exist")
    state = load_file(str(p))
    prefix = "routers." if any(k.startswith("routers.") for k in state) else ""  # a recipe's file, or bare weights
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix):].startswith("mlps.")}
    layers = sorted({int(k.split(".")[1]) for k in state})
    if not layers:
        raise PassConfigError("dyvte: the routers file holds no router weights (expected keys mlps.<layer>.*)")
    return DyVTERecipe(layers=layers, hidden=state[f"mlps.{layers[0]}.0.weight"].shape[0], routers=state)


def _check_width(state: dict, geometry: Geometry) -> None:
    for key, t in state.items():
        if key.endswith(".0.weight") and t.shape[1] != 2 * geometry.hidden_size:
            raise PassConfigError(f"dyvte: the routers were trained for a model of width {t.shape[1] // 2}, this "
                                  f"model has width {geometry.hidden_size}; retrain them for this model")


def load_routers(config: DyVTEConfig, geometry: Geometry, recipe: DyVTERecipe | None) -> Routers:
    if recipe is None:
        raise PassConfigError("dyvte with routers needs trained routers: calibrate them (--calibration DATA), give "
                              "dyvte:routers=FILE.safetensors, or use the static form dyvte:exit_layer=K")
    cut = recipe.risk_cut() if config.max_loss > 0 else None
    if config.max_loss > 0 and cut is None:
        raise PassConfigError("dyvte: max_loss needs routers calibrated with it (their recipe holds no risk-"
                              "controlled threshold); calibrate again with this max_loss")
    if cut is not None and (recipe.risk["max_loss"], recipe.risk["delta"]) != (config.max_loss, config.delta):
        raise PassConfigError(f"dyvte: these routers' threshold was chosen for max_loss={recipe.risk['max_loss']}, "
                              f"delta={recipe.risk['delta']}, not max_loss={config.max_loss}, delta={config.delta}; "
                              "calibrate again")
    return Routers.load({"layers": recipe.layers, "width": recipe.hidden, "threshold": config.threshold,
                         "cut": cut_to_json(cut)}, recipe.routers, geometry)


def greedy_answers(gm, args: tuple, first: torch.Tensor, answers, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The program's greedy answers to prompts, re-running prompt + tokens so far each step (no cache): first
    [B, V] the prompt's last logits -> (tokens [B, T], counted [B, T] bool: up to and including each row's first
    eos). T <= limit; it stops early once every row has ended."""
    tokens = first.argmax(-1, keepdim=True)
    while tokens.shape[1] < limit and not answers.ended(tokens).any(1).all():
        with torch.no_grad():
            step = gm(*answers.extend(args, tokens))[0][:, -1]
        tokens = torch.cat([tokens, step.argmax(-1, keepdim=True)], 1)
    ended = answers.ended(tokens).long()
    return tokens, (ended.cumsum(1) - ended) == 0


def _token_kept(gm, args: tuple, last: torch.Tensor, config: DyVTEConfig, answers):
    """label=token, per prompt of a batch: does an exit keep the first answer token, its loss within the bound?"""
    answer = last.argmax(-1)
    bound = config.loss_ratio * nn.functional.cross_entropy(last, answer, reduction="none") + config.loss_slack + 1e-6

    def kept(exit_gm) -> torch.Tensor:
        cut = exit_gm(*args)[0][:, -1].float()
        return (cut.argmax(-1) == answer) & (nn.functional.cross_entropy(cut, answer, reduction="none") < bound)
    return kept


def _answer_kept(gm, args: tuple, last: torch.Tensor, config: DyVTEConfig, answers):
    """label=answer, per prompt of a batch: does an exit keep the whole greedy answer (up to its eos)?"""
    tokens, counted = greedy_answers(gm, args, last, answers, config.answer_tokens)
    fed = answers.extend(args, tokens[:, :-1])  # the prompt and every answer token but the last

    def kept(exit_gm) -> torch.Tensor:
        again = exit_gm(*fed)[0][:, -tokens.shape[1]:].argmax(-1)
        return ((again == tokens) | ~counted).all(1)
    return kept


def router_labels(program: Program, config: DyVTEConfig, batches, progress: bool = True, answers=None):
    """Router inputs and exit labels from the frozen model: ({layer: features [N, 2D]}, {layer: labels [N]}).

    label='token': the published rule on the answer's first token. label='answer': the whole greedy answer; an exit
    after layer e keeps it when, fed the answer (teacher forcing), the program with the exit predicts every answer
    token up to eos again - what greedy generation with that exit would return, since new tokens are text and see
    the visual tokens in layers <= e only, as in the decode steps after an exit."""
    from tqdm import tqdm

    layers = config.candidates(program)
    if not layers:
        raise PassConfigError("dyvte: no candidate exit layer follows the earlier passes' rewrites")
    if config.label == "answer" and answers is None:
        raise PassConfigError("dyvte: label=answer has the model answer its calibration prompts, which needs the "
                              "model's token embeddings; calibrate through compile_pruned / vtcompile calibrate")
    continuations = {e: _continuation(program, e) for e in layers}
    residual = {e: program.residual_name(e) for e in layers}
    names = set(residual.values()) | {program.visual_name_at(e) for e in layers}
    feats = {e: [] for e in layers}
    labels = {e: [] for e in layers}
    keeps = _answer_kept if config.label == "answer" else _token_kept
    for args in tqdm(batches, desc="dyvte: router labels", unit="batch", disable=not progress):
        outputs, seen = run_with_taps(program.gm, args, names)
        kept = keeps(program.gm, args, outputs[0][:, -1].float(), config, answers)
        for e in layers:
            with torch.no_grad():
                labels[e].append(kept(continuations[e].gm).long())
            feats[e].append(router_features(seen[residual[e]], seen[program.visual_name_at(e)]))
    if not feats[layers[0]]:
        raise PassConfigError("dyvte: the calibration set is empty; give at least one prompt with an image")
    return ({e: torch.cat(feats[e]).detach().cpu() for e in layers}, {e: torch.cat(labels[e]).cpu() for e in layers})


def train_routers(x: dict, y: dict, dim: int, width: int, config: DyVTEConfig,
                  progress: bool = True) -> tuple[Routers, dict]:
    """Fit one router per layer on features x[e] [N, 2 dim] and labels y[e] [N] (full-batch AdamW, cross-entropy;
    with holdout, each router keeps its weights of the epoch with the lowest held-out loss). Seeded: the same data
    and config.seed give the same routers whatever the caller's random state. Returns (routers, training facts)."""
    from tqdm import tqdm

    layers = sorted(x)
    with torch.random.fork_rng(devices=[]):  # seeded init, the caller's random state untouched
        torch.manual_seed(config.seed)
        routers = Routers(layers, dim, width)
    n = len(y[layers[0]])
    n_hold = int(round(config.holdout * n)) if n > 1 else 0
    n_hold = min(n_hold, n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
    fit, held = order[n_hold:], order[:n_hold]
    opt = torch.optim.AdamW(routers.parameters(), lr=config.lr)
    best = {e: (math.inf, 0, None) for e in layers}  # per router: (held-out loss, epoch, weights)
    loss = torch.tensor(math.nan)
    for epoch in tqdm(range(config.epochs), desc="dyvte: router training", unit="epoch", disable=not progress):
        opt.zero_grad()
        loss = sum(nn.functional.cross_entropy(routers.logits(e, x[e][fit]), y[e][fit]) for e in layers) / len(layers)
        loss.backward()
        opt.step()
        if n_hold:
            with torch.no_grad():
                for e in layers:
                    h = float(nn.functional.cross_entropy(routers.logits(e, x[e][held]), y[e][held]))
                    if h < best[e][0]:
                        best[e] = (h, epoch + 1, {k: v.clone() for k, v in routers.mlps[str(e)].state_dict().items()})
    if n_hold:
        for e in layers:
            if best[e][2] is not None:  # None: the held-out loss was never finite; keep the last epoch
                routers.mlps[str(e)].load_state_dict(best[e][2])
    with torch.no_grad():
        acc = {str(e): float((routers.logits(e, x[e]).argmax(-1) == y[e]).float().mean()) for e in layers}
        margins = {}  # per layer and prompt: exit logit - keep logit (DyVTERecipe.prompts_by_exit)
        for e in layers:
            margins[str(e)] = routers.margin(e, x[e]).tolist()
    return routers, {
        "router_train_accuracy": acc, "samples": n, "final_loss": loss.item(),
        "holdout": None if not n_hold else {"prompts": n_hold, "epochs": {str(e): best[e][1] for e in layers},
                                            "loss": {str(e): best[e][0] for e in layers}},
        "margins": margins}


def calibrate(program: Program, config: DyVTEConfig, batches, progress: bool = True, answers=None) -> DyVTERecipe:
    """Train the routers on labels the frozen model gives itself (see the module docstring); answers: what lets
    the model answer its prompts (runtime.inputs.AnswerSteps), for label=answer."""
    t0 = time.perf_counter()
    config.check_risk()
    x, y = router_labels(program, config, batches, progress, answers)
    layers = sorted(x)
    held = None
    if config.max_loss > 0:  # a seeded share of the prompts chooses the threshold and never trains
        n = len(y[layers[0]])
        if n < 2:
            raise PassConfigError("dyvte: max_loss needs at least 2 calibration prompts (some train the routers, "
                                  "the others choose their threshold); raise samples")
        n_risk = min(max(1, int(round(config.risk_prompts * n))), n - 1)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed + 1))
        held, fit = order[:n_risk], order[n_risk:]
        x_risk, y_risk = {e: x[e][held] for e in layers}, {e: y[e][held] for e in layers}
        x, y = {e: x[e][fit] for e in layers}, {e: y[e][fit] for e in layers}
    width = config.width(program.geometry)
    routers, info = train_routers(x, y, program.geometry.hidden_size, width, config, progress)
    margins = info.pop("margins")
    risk = None
    if held is not None:
        with torch.no_grad():
            m = torch.stack([routers.margin(e, x_risk[e]) for e in layers])
        keeps = torch.stack([y_risk[e] for e in layers])
        if config.cuts == "layer":  # the first half of the held-out prompts orders the cuts, the second tests
            half = max(1, m.shape[1] // 2)
            skipped = [program.geometry.num_layers - 1 - e for e in layers]  # an exit's worth: layers skipped
            risk = choose_layer_cuts(m[:, :half], keeps[:, :half], m[:, half:], keeps[:, half:], config.max_loss,
                                     config.delta, skipped)
            m, keeps = m[:, half:], keeps[:, half:]
        else:
            risk = choose_cut(m, keeps, config.max_loss, config.delta)
        counts = {str(e): c for e, c in exit_counts(m, layers, risk["cut"]).items()}  # JSON keys
        risk.update(cut=cut_to_json(risk["cut"]), max_loss=config.max_loss,
                    delta=config.delta, prompts_by_exit=counts)
    return DyVTERecipe(layers=layers, hidden=width,
                       routers={k: v.detach().clone() for k, v in routers.state_dict().items()},
                       margins={str(e): torch.tensor(m) for e, m in margins.items()},
                       exit_label_rate={str(e): float(y[e].float().mean()) for e in layers}, **info,
                       calibration_seconds=time.perf_counter() - t0, config_hash=program.geometry.config_hash(),
                       risk=risk)


PASS = register(PassDef(
    name="dyvte",
    summary="visual-token exit: all visual tokens leave after the layer where a trained router fires (DyVTE); "
            "static form exit_layer=K",
    config=DyVTEConfig, plan=plan, apply=apply, min_layers=2, calibrate=calibrate, recipe=DyVTERecipe,
    branch_plans=branch_plans, calibration_answers=True))
