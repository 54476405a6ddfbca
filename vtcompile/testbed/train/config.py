"""Every setting of a training run, with its default, once: ``TrainConfig``. The command line and the
``config`` section of recipe.json are derived from its fields (as ``vtcompile.passes.base`` derives pass
flags from pass configs): a field ``polish_exit_layers`` is the flag ``--polish-exit-layers``, its help text
lives in the field's metadata."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields

from .. import build, scenes

PRECISIONS = ("fp32", "bf16")
VISION_ATTENTIONS = ("sdpa", "eager")
# The decoder always trains with eager attention: the grounding loss reads its attention weights and the
# visual-exit hooks edit its additive mask.
DECODER_TRAINING_ATTENTION = "eager"
N_LAYERS = build.TEXT["num_hidden_layers"]


def opt(default, help: str, **meta):
    """A config field: its default (dicts are copied per instance), help text and CLI details (``flag``: another
    flag name than the field's; ``choices``)."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class TrainConfig:
    """A testbed training run: four phases (1 vision tower alone, 2 end to end, 3 polish, 4 finish) and how
    they are run. Validated on construction; ``to_dict()`` / ``from_dict()`` round-trip through JSON."""

    seed: int = opt(0, "seed of the model's initialisation, the training data and every random choice")

    # Phase 1: the vision tower alone with per-patch probes. (700 steps since the list kind; see polish_turn_weights)
    vision_steps: int = opt(700, "vision-tower-only steps (phase 1)")
    vision_batch_size: int = opt(32, "images per phase-1 step")
    vision_lr: float = opt(2e-3, "learning rate of phase 1")

    # Phase 2: end to end with the probes, a decaying grounding loss and the background-token curriculum.
    steps: int = opt(3200, "end-to-end steps (phase 2)")
    batch_size: int = opt(16, "images (dialogues) per step of phases 2-4")
    lr: float = opt(1e-3, "peak learning rate of phase 2")
    weight_decay: float = opt(0.05, "AdamW weight decay (matrices except embeddings and norms in phases 2-4)")
    warmup: int = opt(100, "linear warmup steps of phase 2 (phase 1: at most a fifth of its steps)")
    final_lr_frac: float = opt(0.05, "phase 2's cosine schedule ends at this fraction of --lr")
    turns: int = opt(8, "questions per training image (multi-turn dialogue)")
    turn_weights: dict[str, int] = opt(
        {"relpos": 2, "count": 3},
        "how often each kind comes up in the extra turns, e.g. 'relpos=3,count=2'; kinds not named get 1")
    aux_weight: float = opt(1.0, "weight of the per-patch probe loss in phase 2")
    attn_weight: float = opt(1.0, "initial weight of the grounding loss")
    attn_until: float = opt(0.7, "fraction of phase-2 steps over which the grounding loss decays to 0")
    attn_layers: tuple[int, ...] | None = opt(
        None, "decoder layers whose attention the grounding loss supervises, e.g. '1,2' (none: 1..EXIT_AFTER, "
              "or 1..L-1 without visual-exit training)")
    bg_start: float = opt(0.0, "curriculum: fraction of background visual tokens fed to the decoder at first")
    bg_from: float = opt(0.15, "fraction of phase-2 steps where that fraction starts to grow")
    bg_until: float = opt(0.45, "fraction of phase-2 steps where it reaches 1")
    exit_after: int | None = opt(
        None, "visual-exit training in phase 2: layer after which some rows (--exit-frac) see no visual token, "
              "or 'none'")
    exit_frac: float = opt(0.5, "fraction of the dialogues that exit in phase 2")
    count_sink: int = opt(0, "count questions: sink tokens of the second half of the heads (0: none, its "
                             "grounding reads the counted objects' tokens)")

    # Phase 3 (polish): 1400 steps, counts weighted 6, visual-exit training. Half the rows lose their visual
    # tokens after a layer drawn from 1-4 (a visual-token exit), except the tokens of count turns, which keep seeing them
    # (polish_exit_keep): counting needs the visual tokens late, the other kinds learn to gather early, so
    # per-question exits (decided by routers) have room. On the phase-2 weights of this recipe (2-core AMX Xeon),
    # trials of 1400 steps with 1 thread (test 1000): no exits (the previous checkpoint's phase 3) 94.7%, counts
    # 83.0%; exits with count turns kept 94.8%, counts 83.5%, and a static exit after layer 1 then costs 16.3
    # points (test300; counts cannot exit), the exit oracle of the exit bench (bench/) saves 62.1%. Exits for every turn
    # (1000 steps, then a 400-step finish without exits) 93.0%, counts 75.5%; the same with no loss on count
    # answers in exiting rows instead of keeping their visual tokens: 92.4%, counts 73.0%. The previous
    # checkpoint's phase 3, on its own phase-2 weights: val 92.7 -> 93.4%, val counts 77.5 -> 84.0%.
    polish_steps: int = opt(1400, "phase-3 steps: answer loss only, a fresh optimizer, count-heavy dialogues, "
                                  "optionally visual-exit training (0: no phase 3)")
    polish_lr: float = opt(5e-4, "phase-3 peak learning rate")
    # With answers that end (eos) and the list kind, the previous defaults (vision 800, steps 3400, counts weighted
    # 2 and 6 here, exits keeping count and list turns; one thread, test 1000) reached 95.5%, list 95.8%, but counts
    # 77.8% (val 82.0%), in ~49 CPU-minutes. Counts weighted 3 in phase 2 and 8 here, with 700 vision and 3200
    # end-to-end steps to stay within 30 minutes on 2 cores (two threads): phase 2 ended at val 92.1%, counts
    # 64.7%; this phase took it to val 96.2% / test 97.3%, counts 88.0% / 88.0%, list 89.2% / 95.8%.
    polish_turn_weights: dict[str, int] = opt({"relpos": 2, "count": 8}, "--turn-weights of phase 3")
    polish_exit_layers: tuple[int, ...] = opt(
        (1, 2, 3, 4), "phase 3: layers after which the exiting rows lose their visual tokens (one drawn per row), "
                      "or 'none'")
    polish_exit_frac: float = opt(0.5, "phase 3: fraction of the dialogues that exit")
    # The list kind reads every object, one after another, like a count: its turns keep the visual tokens too.
    polish_exit_keep: tuple[str, ...] = opt(
        ("count", "list"), "phase 3: question kinds whose turns keep the visual tokens in the exiting rows (their "
                           "tokens attend to them in every layer), comma-separated, or 'none'")

    # Phase 4 (finish; not the default): phase 3 again without exits. After a phase 3 with exits for every turn
    # (after layers 1-4 in half the rows; val 92.0%, counts 75.0%), 400 more steps took val to 92.7% and counts to
    # 80.5%; keeping the count turns' visual tokens in phase 3 makes it unnecessary.
    finish_steps: int = opt(0, "phase-4 steps: phase 3 again (fresh optimizer, new dialogues) with every visual "
                               "token (0: no phase 4)")
    finish_lr: float = opt(2e-4, "phase-4 peak learning rate")

    # How the steps run. bf16 autocast: weights, optimizer state and the losses stay fp32; on a CPU with
    # avx512_bf16 a step takes about 0.7x the time, so more steps fit the same budget: phases 1-2 of the previous
    # shipped checkpoint, bf16 with 3400 end-to-end steps, reached 76% on test counts in 1318 s against 59.5% for
    # fp32 with 2600 in 1685 s; a run with 4400 steps, the schedule stretched with it, reached only 79.2% overall
    # and 72% on counts: runs vary. Evaluation is fp32.
    precision: str = opt("bf16", "training forward passes: fp32, or bf16 autocast (faster on CPUs with "
                                 "avx512_bf16/AMX; weights, optimizer and losses stay fp32)", choices=PRECISIONS)
    # Eager vision attention is the shipped checkpoint's run; sdpa there (the default of the checkpoint before it)
    # made a training step about 20% slower (0.26-0.28 s against 0.21-0.22 s per phase-3 step with exits, bf16,
    # 2 threads; sdpa's CPU backward is slow at this size) and gives other numerics.
    vision_attention: str = opt("eager", "attention of the vision tower in the training steps (sdpa: about 20% "
                                         "slower steps on CPU, other numerics)", choices=VISION_ATTENTIONS)
    # torch.compile (Inductor, dynamic shapes) of every decoder and vision layer for the training steps; evaluation
    # runs them eager. On a 2-core AMX Xeon, full-length phase-2/3 steps (16 dialogues of ~250 tokens, bf16) took
    # 0.36 s plain / 0.35 s with the grounding loss's attention maps / 0.33 s with visual-exit hooks, against
    # 0.55 / 0.58 / 0.62 s uncompiled with sdpa vision attention (eager vision attention in both the compiled
    # runs), after 25-45 s of compiling.
    compile_layers: bool = opt(True, "torch.compile every decoder and vision layer for the training steps (needs "
                                     "a C++ compiler; about 1.5x faster steps after a minute of compiling; "
                                     "--no-compile: no compiler needed, other numerics than the shipped run)",
                               flag="--compile")
    threads: int | None = opt(None, "torch threads (none: torch's choice)")

    # Evaluation: no effect on the weights.
    val_size: int = opt(1000, "validation questions scored at the end")
    test_size: int = opt(0, "also evaluate this many test questions")
    eval_every: int = opt(500, "steps between val(250) checks (0: none; no effect on training)")

    def __post_init__(self):
        for f in fields(self):  # lists from JSON / callers become tuples: the config stays hashable-ish and equal
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))
        if self.exit_after is not None:
            if not 0 <= self.exit_after < N_LAYERS - 1:
                raise ValueError(f"exit_after {self.exit_after} outside 0..{N_LAYERS - 2} (the last layer has no "
                                 "'after')")
            if not 0.0 <= self.exit_frac <= 1.0:
                raise ValueError(f"exit_frac {self.exit_frac} is not a fraction in [0, 1]")
        exiting = self.exit_after is not None and self.exit_frac > 0
        layers = self.grounding_layers
        for name in ("turn_weights", "polish_turn_weights"):
            bad = {k: n for k, n in getattr(self, name).items()
                   if k not in scenes.KINDS or isinstance(n, bool) or not isinstance(n, int) or n < 1}
            if bad:
                raise ValueError(f"{name} {bad}: expected KIND=N with KIND one of {', '.join(scenes.KINDS)} "
                                 "and N >= 1")
        if any(not 0 <= i < N_LAYERS for i in layers):
            raise ValueError(f"attn_layers {layers} outside 0..{N_LAYERS - 1}")
        if exiting and any(i > self.exit_after for i in layers):
            raise ValueError(f"the grounding loss supervises visual attention in layers {layers}, but rows "
                             f"with a visual exit after layer {self.exit_after} have none there: pass "
                             f"attn_layers <= {self.exit_after}")
        if self.count_sink < 0:
            raise ValueError(f"count_sink {self.count_sink} must be >= 0 (0: no second sink)")
        for name, phase in (("polish_steps", "phase 3"), ("finish_steps", "phase 4")):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)} must be >= 0 (0: no {phase})")
        if any(not 0 <= i < N_LAYERS - 1 for i in self.polish_exit_layers):
            raise ValueError(f"polish_exit_layers {list(self.polish_exit_layers)} outside 0..{N_LAYERS - 2} (the "
                             "last layer has no 'after')")
        if not 0.0 <= self.polish_exit_frac <= 1.0:
            raise ValueError(f"polish_exit_frac {self.polish_exit_frac} is not a fraction in [0, 1]")
        if any(k not in scenes.KINDS for k in self.polish_exit_keep):
            raise ValueError(f"polish_exit_keep {list(self.polish_exit_keep)}: expected question kinds among "
                             f"{', '.join(scenes.KINDS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.vision_attention not in VISION_ATTENTIONS:
            raise ValueError(f"vision_attention {self.vision_attention!r}: expected one of "
                             f"{', '.join(VISION_ATTENTIONS)}")

    @property
    def grounding_layers(self) -> list[int]:
        """The decoder layers the grounding loss supervises (``attn_layers``, or its default)."""
        if self.attn_layers:
            return list(self.attn_layers)
        exiting = self.exit_after is not None and self.exit_frac > 0
        return list(range(1, (self.exit_after + 1) if exiting else N_LAYERS))

    @property
    def training_attention(self) -> tuple[str, str]:
        """Attention implementations (decoder, vision tower) of the training steps."""
        return DECODER_TRAINING_ATTENTION, self.vision_attention

    def to_dict(self) -> dict:
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {', '.join(sorted(unknown))}")
        return cls(**d)

    def command_line(self) -> str:
        """The flags that differ from the defaults: ``python -m vtcompile.testbed.train --out DIR`` + this
        reproduces the run."""
        default = TrainConfig()
        out = []
        for f in fields(self):
            v = getattr(self, f.name)
            if v == getattr(default, f.name):
                continue
            flag = _flag(f)
            if _types()[f.name] is bool:
                out.append(flag if v else "--no-" + flag[2:])
            else:
                out.append(f"{flag} {format_value(v)}")
        return " ".join(out)


def _jsonable(v):
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, dict):
        return dict(v)
    return v


def format_value(v) -> str:
    """A field value as the command line writes it: '1,2,3', 'relpos=2,count=2', 'none'."""
    if v is None or (isinstance(v, (tuple, dict)) and not v):
        return "none"
    if isinstance(v, tuple):
        return ",".join(map(str, v))
    if isinstance(v, dict):
        return ",".join(f"{k}={n}" for k, n in v.items())
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


def _types() -> dict:
    return typing.get_type_hints(TrainConfig)


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _metavar(kind) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return _metavar(next(a for a in args if a is not type(None))) + "|none"
    if origin is tuple:
        return "A,B,..." if args[0] is str else "I,J,..."
    if origin is dict:
        return "KIND=N,..."
    return {int: "N", float: "X"}.get(kind, "S")


def _parse(kind):
    """The argparse ``type`` of a field type: one function from the command-line text to the field value."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):  # Optional[X]: 'none' or X
        inner = _parse(next(a for a in args if a is not type(None)))
        return lambda s: None if s.strip().lower() == "none" else inner(s)
    if origin is tuple:
        elem = args[0]
        return lambda s: () if s.strip().lower() == "none" else tuple(
            elem(x.strip()) for x in s.split(",") if x.strip())
    if origin is dict:
        def weights(s):
            out = {}
            for item in filter(None, (x.strip() for x in s.split(","))):
                k, _, n = item.partition("=")
                if not n.isdigit():
                    raise ValueError(f"{item!r} is not KIND=N")
                out[k] = int(n)
            return out
        return weights
    return kind


def _argparse_type(f: dataclasses.Field, kind):
    parse = _parse(kind)

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc} (expected: {f.metadata['help']})") from None
    convert.__name__ = f.name
    return convert


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """One flag per ``TrainConfig`` field, its default and help text taken from the field."""
    kinds = _types()
    for f in fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f"{f.metadata['help']} (default: {format_value(default)})".replace("%", "%%")
        if kinds[f.name] is bool:
            ap.add_argument(_flag(f), dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            ap.add_argument(_flag(f), dest=f.name, type=_argparse_type(f, kinds[f.name]), default=default,
                            choices=f.metadata.get("choices"),
                            metavar=None if "choices" in f.metadata else _metavar(kinds[f.name]), help=text)


def from_args(ns: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of parsed arguments (raises ValueError on an inconsistent combination)."""
    return TrainConfig(**{f.name: getattr(ns, f.name) for f in fields(TrainConfig)})
