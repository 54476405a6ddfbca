"""Arguments every command shares (model, passes, target, calibration) and the one way the CLI compiles a model.
Arguments are checked here before any model is loaded; what compiling means lives in the API below."""
from __future__ import annotations

import argparse
import logging
import time

from ..errors import PassConfigError

log = logging.getLogger("vtcompile.cli")
# the flags that choose a model and how to compile it: an artifact already holds them
MODEL_FLAGS = ("model", "weights", "random_weights", "layers", "dtype", "target", "calibration")


def model_args(p: argparse.ArgumentParser, seed_help: str = "seed of random weights (default 0)") -> None:
    from ..models import DEFAULT_MODEL

    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help=f"preset name (see `vtcompile models`) or a local checkpoint directory "
                        f"(default: {DEFAULT_MODEL})")
    g.add_argument("--weights", metavar="DIR", help="local checkpoint directory for a preset")
    g.add_argument("--random-weights", action="store_true",
                   help="build the preset's real geometry with random weights (speed/FLOPs work; every report "
                        "says so)")
    g.add_argument("--layers", type=int, metavar="N", help="keep only the first N decoder layers (CPU speed work)")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="weight dtype (default: float32; bfloat16 for the 7B/13B presets)")
    g.add_argument("--seed", type=int, default=None, help=seed_help)


def pass_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pass", dest="passes", action="append", default=[], metavar="NAME[:key=value,...]",
                   help="a pass to apply, with optional fields (NAME:field=value,field=value; `vtcompile passes` lists "
                        "the names and fields); repeat --pass to compose passes in order")


def calibration_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", metavar="DATA",
                   help="calibration data for the passes that fit a recipe on data (`vtcompile passes` marks them): "
                        "'testbed' (its train split; the default on the testbed model), a JSONL file (as for "
                        "eval), or 'synthetic' (random prompts, for random-weight smoke tests)")


def target_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None,
                   help="backend: eager (default, the rewritten graphs in PyTorch), inductor (AOTInductor: compiled "
                        "ahead of time, one compile for every batch, prompt length and decode step; an artifact "
                        "loads without compiling), onnx (ONNX Runtime; float32 on CPU; prefill and decode), "
                        "tensorrt (CUDA + torch-tensorrt; prefill only)")


def model_name(args) -> str:
    from ..models import DEFAULT_MODEL

    return args.model if args.model is not None else DEFAULT_MODEL


def spec_of(args):
    from ..models import resolve_spec

    return resolve_spec(model_name(args), args.weights, args.random_weights, args.layers, args.dtype,
                        args.seed if args.seed is not None else 0)


def parse_passes(args) -> list:
    """The --pass values, parsed (before any model is loaded)."""
    from ..passes import REGISTRY, resolve_passes

    for spec in args.passes:
        name, _, rest = spec.partition(":")
        if "," in name or any(part.strip() in REGISTRY for part in rest.split(",")):
            raise PassConfigError(f"--pass {spec!r} names several passes; give each its own --pass, in order "
                                  "(--pass NAME --pass NAME)")
    return resolve_passes(args.passes)


def check_calibration_flag(args, passes) -> None:
    """--calibration with no pass that calibrates would be ignored: an error, as compile_pruned's."""
    if getattr(args, "calibration", None) is not None and not any(p.calibrate for p, _ in passes):
        from ..passes import REGISTRY

        names = ", ".join(p.name for p, _ in passes) or "no pass"
        users = ", ".join(n for n, p in REGISTRY.items() if p.calibrate is not None)
        raise PassConfigError(f"--calibration applies to passes that fit a recipe on data ({users}); {names} "
                              "fit(s) none: drop --calibration")


def calibration_data(args, passes, spec) -> str | None:
    """--calibration, or on the shipped testbed its train split for passes that need data."""
    needs = [(p.name, getattr(c, "samples", 64)) for p, c in passes if p.calibrate is not None
             and c.needs_calibration()]  # each pass draws its own count (compiled._calibrate)
    if args.calibration is None and needs and spec.name == "testbed":
        counts = ", ".join(f"{name}: {n}" for name, n in needs)
        log.info(f"calibrating on prompts of the testbed's train split ({counts}; --calibration to change)")
        return "testbed"
    return args.calibration


def compile_from_args(args, target: str = "eager"):
    """Check the arguments, then load the model and compile it with the passes."""
    from ..compiled import CompiledModel
    from ..models import build_from_spec
    from ..targets import get_target

    passes = parse_passes(args)
    check_calibration_flag(args, passes)
    tgt = get_target(target or "eager")
    spec = spec_of(args)
    calibration = calibration_data(args, passes, spec)
    log.info(f"loading {spec.label} ...")
    t0 = time.perf_counter()
    adapter = build_from_spec(spec)
    for p, cfg in passes:
        p.check_supports(adapter.geometry)
        cfg.check_model(adapter.geometry)
    log.info(f"loaded in {time.perf_counter() - t0:.1f}s; capturing the decoder and applying {len(passes)} "
             "pass(es) ...")
    cm = CompiledModel.build(adapter, passes, tgt, getattr(args, "text_tokens", 64), calibration=calibration,
                             progress=not getattr(args, "quiet", False))
    r = cm.report
    log.info(f"compiled in {r.capture_seconds + r.calibration_seconds + r.compile_seconds:.1f} s (capture "
             f"{r.capture_seconds:.1f} s, calibration {r.calibration_seconds:.1f} s, passes + lowering to "
             f"{tgt.name} {r.compile_seconds:.1f} s)")
    return cm


def check_artifact_flags(args, artifact, what: str = "an artifact", seed: bool = False) -> None:
    """An artifact holds its model, passes and target: the flags that choose them are errors beside it (and --seed,
    where nothing would be sampled)."""
    from ..errors import VtcompileError

    if args.passes:
        raise VtcompileError(f"{artifact} already holds its passes; give {what} or --model/--pass, not both: drop "
                             "--pass")
    given = [f"--{f.replace('_', '-')}" for f in MODEL_FLAGS if getattr(args, f, None) not in (None, False)]
    given += ["--seed"] if seed and args.seed is not None else []
    if given:
        raise VtcompileError(f"{', '.join(given)} do(es) not apply to {what}: {artifact} runs the model, passes and "
                             "target it was compiled with. Drop them, or compile here with --model/--pass/--target "
                             f"instead of {what}")
