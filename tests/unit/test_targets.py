"""Lowering targets: registry, parity with eager on every pass family, one compile per stage, TensorRT's
graph transform (CPU).

Parity matrix: by default every pass family runs on at least one compiled target and every graph construct on
both (see _ONLY_FULL), the two tiny geometries split between them so that each target sees both (a cold Inductor
compile costs 15-145 s on two shared cores). VTCOMPILE_FULL_MATRIX=1 runs every (target, pass, geometry)
combination. Inductor compiles
scalar C++ kernels here (cpp.vec_isa_ok=False, half the cold compile time): what these tests guard is the
graph-level lowering (dynamic sequence, unbacked batch, symbolic-k topk), not Inductor's vectorizer; the
speed benchmark (bench/speed.py) checks the default vectorized kernels against eager on its geometry.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch._inductor.config

from vtcompile import compile_pruned
from vtcompile.compiler.export import export_stage
from vtcompile.compiler.staged import whole
from vtcompile.errors import TargetUnavailableError
from vtcompile.models.llava import example_inputs
from vtcompile.runtime.executable import LazyStage
from vtcompile.targets import TARGETS, get_target
from vtcompile.targets.tensorrt import trt_friendly

from .common import adapter, compiled, prompt

TOL = 1e-4
aten = torch.ops.aten
# Pass families: no pass, a cut scored inside the graph before a layer (fastv), several cuts with the next
# layer's q/k cloned in (pyramiddrop), cuts after a layer's attention from a recipe (fitprune), every
# visual token dropped after a layer (dyvte's static exit; its routers are tested stage by stage below).
# randomdrop draws from the backend's own generator, so no target can match eager's draws; its token
# counts and the oracle are tested in test_rewrite_primitives.py.
PASSES = {"none": None, "fastv": "fastv", "pyramiddrop": "pyramiddrop", "fitprune": "fitprune:recipe",
          "dyvte": "dyvte:exit_layer=1", "gprune": "gprune", "divprune": "divprune:keep=0.25",
          "fitprune+heads": "fitprune:recipe", "cdpruner": "cdpruner:keep=0.25", "dart": "dart"}
# Head passes ride on fitprune's graph (a lowering of their own would cost the suite 20-45 s per target): query
# heads sliced out of layers 1 and 2, layer 3's attention removed; plain fitprune is in the full matrix.
HEAD_SPECS = ["headskip:heads=1.0/2.1/2.3", "attnskip:layers=3"]
_SPLIT = {("inductor", "none"): "tiny", ("inductor", "fastv"): "tiny-gqa", ("inductor", "pyramiddrop"): "tiny",
          ("inductor", "fitprune"): "tiny-gqa", ("inductor", "dyvte"): "tiny",
          ("onnx", "none"): "tiny-gqa", ("onnx", "fastv"): "tiny", ("onnx", "pyramiddrop"): "tiny-gqa",
          ("onnx", "fitprune+heads"): "tiny", ("inductor", "fitprune+heads"): "tiny-gqa",
          ("onnx", "fitprune"): "tiny", ("onnx", "dyvte"): "tiny-gqa", ("inductor", "gprune"): "tiny-gqa",
          ("inductor", "divprune"): "tiny", ("onnx", "gprune"): "tiny", ("onnx", "divprune"): "tiny-gqa",
          ("inductor", "cdpruner"): "tiny-gqa", ("onnx", "cdpruner"): "tiny", ("inductor", "dart"): "tiny",
          ("onnx", "dart"): "tiny-gqa"}


# The default suite lowers each pass family on at least one compiled target and each graph construct on both
# (the pass-free graph is part of every pass graph: fastv's on both targets, below):
# pyramiddrop's cuts are fastv's primitive several times (on onnx here); the pre-LLM selectors run as cdpruner on
# both targets: the selector form (visual_selection) with the prompt's text embeddings and mask as inputs and a
# greedy loop with a static trip count (divprune's loop and gprune's function are the same constructs, in the full
# matrix; on a loaded 2-core EPYC inductor-divprune took 96 s, onnx-gprune 20 s, cdpruner 115 s and 26 s). DART's
# graph (pivots by layer 1's key norms, a cosine selection, a cut before layer 2) is lowered to ONNX, saved, loaded
# and generated from by test_cli_optimize_onnx_then_run_with_input_ids (test_artifacts.py); Inductor in the full matrix.
# fastv's parity on both targets is asserted
# by test_target_artifact_round_trip (inductor: compiled once for every prompt shape, saved, loaded in a new
# process) and test_cli_optimize_onnx_then_run_with_input_ids (onnx), the static exit's stages on both targets by
# test_dynamic_exits_lower_stage_by_stage (every exit stage of the routers: all visual tokens dropped after a layer).
# A cold Inductor compile costs 15-145 s of the suite's 12 minutes; VTCOMPILE_FULL_MATRIX=1 runs the rest too.
_ONLY_FULL = {("inductor", "pyramiddrop"), ("inductor", "gprune"), ("onnx", "divprune"), ("onnx", "none"),
              ("inductor", "divprune"), ("onnx", "gprune"),
              ("inductor", "none"),
              ("inductor", "fastv"), ("onnx", "fastv"), ("inductor", "dyvte"), ("onnx", "dyvte"),
              ("onnx", "fitprune"), ("inductor", "fitprune"), ("inductor", "dart"), ("onnx", "dart")}


def _matrix():
    full = os.environ.get("VTCOMPILE_FULL_MATRIX") == "1"
    for (target, family), geometry in _SPLIT.items():
        if (target, family) in _ONLY_FULL and not full:
            continue
        for g in (("tiny", "tiny-gqa") if full else (geometry,)):
            yield pytest.param(target, family, g, id=f"{target}-{family}-{g}")


@functools.lru_cache(maxsize=None)
def reference(geometry: str, family: str):
    """The eager compiled model of a pass family. FitPrune's cuts come from a recipe file (tokens removed after
    the attention of layers 0 and 2: the construct its calibrated recipes use, in two cuts instead of one per
    layer - a cold Inductor compile of a fitted recipe's graph took 200 s); the calibration itself is tested in
    test_fitprune.py."""
    if family.startswith("fitprune"):
        directory = tempfile.mkdtemp(prefix="vtcompile-fitprune-recipe-")
        atexit.register(shutil.rmtree, directory, True)
        path = Path(directory) / "recipe.json"
        path.write_text(json.dumps({"0": 4, "2": 2}))
        heads = HEAD_SPECS if family == "fitprune+heads" else []
        return compile_pruned(adapter(geometry), [f"fitprune:recipe={path}", *heads], progress=False)
    return compiled(geometry, PASSES[family])


def _forget_vector_isa_probe():
    """Drop Inductor's per-process memo of the CPU's vector ISAs (torch 2.13: `valid_vec_isa_list` and each ISA
    class's `__bool__` are functools caches that ignore cpp.vec_isa_ok once filled)."""
    from torch._inductor import cpu_vec_isa

    cpu_vec_isa.valid_vec_isa_list.cache_clear()
    for isa in vars(cpu_vec_isa).values():
        probe = getattr(isa, "__bool__", None) if isinstance(isa, type) else None
        if hasattr(probe, "cache_clear"):
            probe.cache_clear()


@contextlib.contextmanager
def fast_inductor():
    """Inductor settings for tests: scalar kernels compile in half the time (see the module docstring).

    Inductor probes the vector ISAs once per process and keeps the answer whatever cpp.vec_isa_ok says later. A
    first probe under the patch left the whole process without a vector ISA; a later default-config compile whose
    graph came from the on-disk cache (vectorised code from another process) was then built without the ISA's
    flags and failed (CI, 2026-12-02). A probe made before the patch would instead keep vectorising under it. So
    the memo is dropped on the way in and on the way out, and each side probes under its own setting."""
    _forget_vector_isa_probe()
    try:
        with torch._inductor.config.patch({"cpp.vec_isa_ok": False}):
            yield
    finally:
        _forget_vector_isa_probe()


@functools.lru_cache(maxsize=None)
def lowered(target: str, geometry: str, family: str):
    """The eager compiled model of (geometry, family) with its programs lowered to `target` (with_target: the
    same capture and rewritten program, so each test pays only the lowering; test_artifacts.py's
    inductor round trip and the CLI test go through compile_pruned(target=...) end to end)."""
    with fast_inductor():
        return reference(geometry, family).with_target(target)


@functools.lru_cache(maxsize=None)
def lowered_exits(target: str):
    """Trained DyVTE routers on `tiny` (test_dyvte's model), the program with exits lowered to `target`
    stage by stage, sharing the eager model's capture and recipes."""
    from .test_dyvte import trained

    return trained("tiny").with_target(target)


# (prompt kind, seed) -> exit layer per row under the trained routers: every exit (0, 1, 2, none), a batch
# whose rows exit at different layers (regrouped), and two prompt lengths (36 and 28 tokens).
EXIT_PROMPTS = {("mid_pad_b2", 9): [2, -1], ("image_first", 7): [1], ("mid_pad_b2", 11): [0, 2],
                ("image_first", 12): [-1]}


def assert_exit_parity(out, ref, mask) -> float:
    assert out.exit_layers == ref.exit_layers
    assert torch.equal(out.kept_positions, ref.kept_positions)
    real = (out.kept_positions >= 0) & torch.gather(mask, 1, out.kept_positions.clamp_min(0)).bool()
    diff = (out.logits - ref.logits).abs().amax(-1)[real].max().item()
    assert diff <= TOL, diff
    return diff


def assert_parity(out, ref, mask) -> float:
    assert torch.equal(out.kept_positions, ref.kept_positions)
    assert torch.equal(out.kept_visual, ref.kept_visual)
    real = torch.gather(mask, 1, out.kept_positions).bool()  # padding rows are undefined in both
    diff = (out.logits.float() - ref.logits.float()).abs().amax(-1)[real].max().item()
    assert diff <= TOL, diff
    return diff


def test_registry_is_complete():
    assert set(TARGETS) == {"eager", "inductor", "onnx", "tensorrt"}
    for t in TARGETS.values():
        for fn in ("lower", "save", "load", "is_available"):
            assert callable(getattr(t.module, fn)), (t.name, fn)
        assert isinstance(t.decodes, bool) and (t.decodes or t.decode_note)
    with pytest.raises(TargetUnavailableError, match="unknown target 'tvm'; targets: eager, inductor, onnx"):
        get_target("tvm")


def test_eager_lowering_calls_the_operators_directly(tmp_path):
    """The eager target runs a copy of each stage whose ATen calls skip OpOverload.__call__ (the same operators: the
    stage's own graph is unchanged, and the copy's outputs are bitwise the graph's); every oracle test of the eager
    target runs through it, and an eager artifact's stages load the same way."""
    from vtcompile import load_compiled

    cm = compiled("tiny", "fastv")
    ids, pixels, mask = prompt("tiny", "mid_pad_b2")
    cm(ids, pixels, mask)  # builds the program of this prompt's visual count
    exe = cm.executable(next(iter(cm.executables)))
    for lazy in list(exe.prefill_stages()) + [exe.step_stage()]:
        graph, run = lazy.stage.module.graph, lazy.lower()
        calls = [n for n in graph.nodes if n.op == "call_function"]
        direct = [n for n in run.graph.nodes if n.op == "call_function"]
        assert any(isinstance(n.target, torch._ops.OpOverload) for n in calls)
        noop = [n for n in calls if n.target is torch.ops.aten.to.dtype and n.args[0].meta["val"].dtype == n.args[1]]
        assert noop  # the float32 model converts float32 tensors to float32 (RMSNorm)
        calls = [n for n in calls if n not in noop]  # dropped: aten.to returns its input itself there
        assert len(calls) == len(direct)
        assert not any(isinstance(n.target, torch._ops.OpOverload) for n in direct)
        assert [str(getattr(n.target, "func", n.target)) for n in direct] == \
            [str(getattr(n.target, "_op", n.target)) for n in calls]
        args = lazy.examples()
        with torch.no_grad():
            want = lazy.stage.module(*[a.clone() for a in args])
            got = run(*[a.clone() for a in args])
        assert all(torch.equal(a, b) for a, b in zip(want, got))
    loaded = load_compiled(cm.save(tmp_path / "art"))
    exe = loaded.executable(next(iter(loaded.executables)))
    for lazy in list(exe.prefill_stages()) + [exe.step_stage()]:
        calls = [n for n in lazy.lower().graph.nodes if n.op == "call_function"]
        assert calls and not any(isinstance(n.target, torch._ops.OpOverload) for n in calls)


def test_fast_inductor_leaves_the_vector_isa_to_later_compiles():
    """In a fresh process: a first ISA probe inside fast_inductor() gives scalar kernels there and the machine's
    vector ISA after it (the same as a process that never patched); a probe made outside before the patch does
    not carry vectorisation into it. Otherwise a vectorised graph from the on-disk cache was built without the
    ISA's flags (CI failure of 2026-12-02), or the patch silently stopped saving compile time."""
    import subprocess
    import sys

    code = "\n".join([
        "from tests.unit.test_targets import fast_inductor",
        "from torch._inductor.cpu_vec_isa import pick_vec_isa",
        "with fast_inductor():",
        "    print(bool(pick_vec_isa()))",  # the process's first probe
        "print(repr(str(pick_vec_isa())))",
        "with fast_inductor():",
        "    print(bool(pick_vec_isa()))",  # after a default-config probe
        "print(repr(str(pick_vec_isa())))",
    ])
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def run(code):
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=root, timeout=300).stdout.splitlines()

    from torch._inductor.cpu_vec_isa import pick_vec_isa

    _forget_vector_isa_probe()  # a fresh probe here, outside the patch: what a process that never patched gets
    plain = repr(str(pick_vec_isa()))
    assert run(code) == ["False", plain, "False", plain]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_tensorrt_without_cuda_is_a_clear_error():
    from vtcompile.targets import tensorrt

    with pytest.raises(TargetUnavailableError, match="needs a CUDA GPU and the torch-tensorrt package"):
        get_target("tensorrt")
    with pytest.raises(TargetUnavailableError, match="needs a CUDA GPU and none is visible"):
        tensorrt.lower(whole(compiled("tiny", "fastv").program), None)
    from .test_dyvte import trained

    with pytest.raises(TargetUnavailableError, match="needs a CUDA GPU and none is visible"):
        tensorrt.prepare(trained("tiny").program)


@pytest.mark.parametrize("target,family,geometry", list(_matrix()))
def test_target_matches_eager(target, family, geometry):
    cm = lowered(target, geometry, family)
    ref = reference(geometry, family)
    kinds = ["mid_pad_b2", "image_first"]  # batch 2 with left padding, batch 1 with the image first
    if family in ("gprune", "divprune", "cdpruner") and target == "inductor":
        # a selector per image: Inductor once guarded the batch to the warm-up's range with two images
        kinds.append("two_images")
    for kind in kinds:
        ids, pixels, mask = prompt(geometry, kind)
        diff = assert_parity(cm(ids, pixels, mask), ref(ids, pixels, mask), mask)
        print(f"{target} {family} {geometry} {kind}: max |logit diff| {diff:.2e}")


# Inductor AOT-compiles one package per stage (4 + 3 + 2 + 1 of them, 8-10 s each on two cores): by default it runs
# the batch whose rows exit after layer 2 and never (regrouped between layers), which lowers the 4 main stages and
# one branch and leaves the other branches unlowered; VTCOMPILE_FULL_MATRIX=1 runs every exit and the round trip
# through an artifact, as onnx always does (inductor's packages in an artifact: test_target_artifact_round_trip).
_EXITS_BY_DEFAULT = {"inductor": [("mid_pad_b2", 9)], "onnx": list(EXIT_PROMPTS)}


@pytest.mark.parametrize("target", ["inductor", "onnx"])
def test_dynamic_exits_lower_stage_by_stage(target, tmp_path):
    """DyVTE with routers on a non-eager target: every per-layer stage lowered on its own (inductor: an AOTInductor
    package each) at its first call, the same exits and logits as the eager stages for every batch and prompt
    length. The lowered program then saves every stage (the packages and ONNX files made above, nothing compiled
    again) and loads back to the same exits and logits."""
    from vtcompile import load_compiled

    from .test_dyvte import trained

    full = os.environ.get("VTCOMPILE_FULL_MATRIX") == "1"
    prompts = list(EXIT_PROMPTS) if full else _EXITS_BY_DEFAULT[target]
    cm, ref = lowered_exits(target), trained("tiny")
    with fast_inductor():
        for kind, seed in prompts:
            exits = EXIT_PROMPTS[(kind, seed)]
            ids, pixels, mask = prompt("tiny", kind, seed=seed)
            out = cm(ids, pixels, mask)
            assert out.exit_layers == exits  # the routers still route as this test assumes
            diff = assert_exit_parity(out, ref(ids, pixels, mask), mask)
            print(f"{target} dyvte {kind} seed {seed} exits {exits}: max |logit diff| {diff:.2e}")
    exe = cm.executable(16)
    stages = exe.prefill_stages()
    assert len(stages) == 4 + 3 + 2 + 1 and all(isinstance(m, LazyStage) for m in stages)
    ran = [m for m in stages if m.lowered is not None]
    kind = {"inductor": "AotStage", "onnx": "OnnxStage"}[target]
    assert ran and all(type(m.lowered).__name__ == kind and m.compile_seconds > 0 for m in ran)
    exits = {e for p in prompts for e in EXIT_PROMPTS[p]}
    main = 4 if -1 in exits else 1 + max(exits)  # layer stages up to the last exit, all 4 when a row never exits
    assert len(ran) == main + sum(4 - 1 - e for e in exits if e >= 0)  # a branch no row took was never lowered
    if len(ran) < len(stages):
        return

    seconds = [m.compile_seconds for m in stages]
    path = cm.save(tmp_path / target)  # the stages' files made when they were lowered above
    assert [m.compile_seconds for m in stages] == seconds
    program = json.loads((path / "manifest.json").read_text())["programs"][0]
    files = [f for s in program["stages"].values() for f in s["files"]]
    ext = {"inductor": ".pt2", "onnx": ".onnx"}[target]
    assert sum(f.endswith(ext) for f in files) == 4 + 3 + 2 + 1
    lm = load_compiled(path)
    assert lm.target.name == target
    for (kind, seed), exits in EXIT_PROMPTS.items():
        ids, pixels, mask = prompt("tiny", kind, seed=seed)
        out = lm(ids, pixels, mask)
        assert out.exit_layers == exits
        assert_exit_parity(out, ref(ids, pixels, mask), mask)


def test_onnx_refuses_bfloat16_with_a_clear_message():
    from vtcompile.models import load_model

    with pytest.raises(TargetUnavailableError, match="--dtype float32"):
        compile_pruned(load_model("tiny", dtype="bfloat16"), "fastv", target="onnx")


@pytest.mark.parametrize("geometry,spec", [("tiny-gqa", "fastv"), ("tiny", "pyramiddrop")])
def test_tensorrt_graph_transform_static_k_and_index_select(geometry, spec):
    """The graph TensorRT gets: topk with constant k, no sort, index_select for the token-axis gathers."""
    program = compiled(geometry, spec).program
    gm = trt_friendly(program)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    topks = [n for n in calls if n.target is aten.topk.default]
    assert [n.args[1] for n in topks] == [r.after for r in program.rewrites]  # static k = visual tokens kept
    assert not any(n.target is aten.sort.default for n in calls)
    assert sum(n.target is aten.index_select.default for n in calls) >= 5 * len(program.rewrites)
    assert sum(n.target is aten.gather.default for n in calls) == 2 * len(program.rewrites)  # the 4-D mask only
    for kind in ("mid_pad_b2", "two_images", "image_first"):
        ids, pixels, mask = prompt(geometry, kind)
        prep = compiled(geometry, spec).prepare(ids, pixels, mask)
        if prep.n_visual != program.n_visual:
            continue
        with torch.no_grad():
            ref, out = program.gm(*prep.as_args()), gm(*prep.as_args())
        assert all(torch.equal(a, b) for a, b in zip(out[1:], ref[1:]) if not a.is_floating_point())
        assert (out[0] - ref[0]).abs().max().item() <= 1e-6
    transformed = program.clone()
    transformed.gm = gm
    ep = export_stage(whole(transformed), tuple(program.fake_inputs.examples))  # it re-exports, symbolic dims
    ids, pixels, mask = example_inputs(adapter(geometry), batch=3, text_before=7, text_after=20, seed=3)
    args = compiled(geometry, spec).prepare(ids, pixels, mask).as_args()
    with torch.no_grad():
        assert torch.equal(ep.module()(*args)[1], program.gm(*args)[1])
