"""Artifacts: a self-contained directory that runs (prefill and generate) in a new process without the model files.

Layout (format 5):
    manifest.json             versions, model id + config hash, passes + configs, target, input spec, the report,
                              generation defaults, the programs and their stages, the sha256 of every other file, and
                              `manifest_sha256`: the sha256 of the manifest's own content (its canonical JSON without
                              that field), so an edited field (a pass config) is refused like an edited file
    config.json               the model's config (LlavaConfig, Qwen2VLConfig, ...: geometry, image token id, vision)
    embeddings.safetensors    the token embedding table ("weight" [V, D]; the manifest holds the factor the model
                              multiplies its rows by: Gemma's sqrt(D), 1 elsewhere)
    vision.pt2                LLaVA: vision tower + projector, torch.export'ed with a dynamic image count
    vision.safetensors        Qwen2-VL: the vision tower's weights, rebuilt by transformers' own class from config.json
                              (its attention spans come from the patch grids' values, which an export cannot keep
                              symbolic; models.qwen2_vl.Qwen2VLFamily.save_vision)
    <stage>.pt2 | .onnx       every stage of every program, in the target's format (runtime/executable.py; inductor:
                              an AOTInductor package, loaded without compiling; eager: the torch.export'ed graph): for
                              a static program decoder-v<N> (N visual tokens per prompt) and its decode step
                              decoder-v<N>-decode; for a program with branches one stage per layer of the base
                              graph and of each branch (decoder-v<N>-layer<i>, decoder-v<N>-branch<e>-layer<i>)
    <program>-decision.safetensors a program's branch decision (compiler.branches: its kind and settings in the
                              manifest, its tensors here; rebuilt by the class its pass registered)
    processor/                the model's processor files, when it has a processor

Loading checks, in order: the format, the manifest's digest of itself, the vtcompile and torch versions the files
were written with, the sha256 of every file, and the config hash of the stored config; any mismatch is refused with
what was expected, what was found and what to do. (The digests detect corruption and edits, they are no signature
against someone who rewrites them.) Stages are loaded at their first call.

Writing never leaves a half-written artifact (a temporary sibling moved into place, stale ones from killed writes
removed: vtcompile/files.py) and never deletes what vtcompile did not write: --force replaces an artifact only when
the directory holds nothing but the files its manifest lists.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .compiler.branches import load_decision
from .compiler.signature import Signature
from .compiler.staged import Stage, StagedGraph, StagePlan
from .errors import ArtifactError, UnsupportedModelError
from .files import apply_umask, old_dir, temp_dir
from .models import Frontend, ModelSpec, family_of_config
from .report import Report
from .runtime.executable import Executable, LazyStage

ARTIFACT_FORMAT = 5
MANIFEST = "manifest.json"
DIGEST = "manifest_sha256"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_table(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): {"sha256": sha256(p), "bytes": p.stat().st_size}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no whitespace) without its own digest field."""
    body = {k: v for k, v in manifest.items() if k != DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sign(manifest: dict) -> dict:
    """The manifest with its digest (write_artifact calls this last)."""
    return {**{k: v for k, v in manifest.items() if k != DIGEST}, DIGEST: manifest_digest(manifest)}


def _unlisted(out: Path) -> list[str]:
    """What an existing artifact directory holds beyond its manifest and the files the manifest lists (directories
    that hold only listed files count as listed); every entry when the manifest cannot be read."""
    try:
        listed = set(json.loads((out / MANIFEST).read_text()).get("files", {}))
    except (OSError, ValueError, AttributeError):
        listed = set()
    parents = {d.as_posix() for f in listed for d in Path(f).parents if d != Path(".")}
    extra = []
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if rel == MANIFEST or rel in listed or (p.is_dir() and not p.is_symlink() and rel in parents):
            continue
        extra.append(rel + ("/" if p.is_dir() else ""))
    return extra


def check_destination(out: Path, force: bool) -> None:
    """Refuse to write over something: an existing path without --force, and (even with it) anything that is
    not a vtcompile artifact or holds files its manifest does not list - replacing a directory deletes it, and no
    command deletes what it did not make."""
    out = Path(out)
    if not out.exists():
        return
    if not force:
        raise ArtifactError(f"output directory {out} already exists; choose another --out or pass --force "
                            "to replace it")
    if not out.is_dir() or not (out / MANIFEST).is_file():
        raise ArtifactError(f"{out} exists and is not a vtcompile artifact (no {MANIFEST}); --force only replaces "
                            "an artifact. Choose another --out, or remove it yourself if it should go.")
    extra = _unlisted(out)
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise ArtifactError(f"{out} holds {len(extra)} file(s) its manifest does not list ({shown}); --force replaces "
                            "an artifact only when nothing else is in it, because replacing it deletes the whole "
                            "directory. Move them out, or choose another --out.")


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    check_destination(out, force)  # again: the directory may have appeared, or gained files, while we wrote
    apply_umask(tmp)  # mkdtemp made it private; safetensors writes 0600
    if out.exists():
        old = old_dir(out)
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


# -- writing --------------------------------------------------------------------------------------------
def _save_stage(lazy: LazyStage, target, directory: Path) -> dict:
    try:
        if target.saves_lowered and lazy.lowered is None:
            lazy.lower()  # compiled once: saved here, and run in this process without compiling it again
        files = target.save(lazy.stage, lazy.exported, lazy.lowered, directory)
    except UnsupportedModelError as exc:
        raise ArtifactError(str(exc)) from exc
    return dict(lazy.stage.info(), files=files)


def _save_program(exe: Executable, target, directory: Path) -> dict:
    from safetensors.torch import save_file

    plan = exe.plan
    stages = {s.name: _save_stage(s.module, target, directory) for s in plan.all_stages()}
    entry = {"name": plan.name, "n_visual": exe.n_visual, "schedule": list(exe.schedule),
             "signature": plan.signature.to_dict(), "base": plan.base.info(),
             "branches": {str(e): g.info() for e, g in sorted(plan.branches.items())},
             "visual": {str(e): n for e, n in plan.visual.items()}, "stages": stages, "decision": None, "decode": None}
    if plan.decision is not None:  # saved by kind, rebuilt by the class its pass registered (compiler.branches)
        name = f"{plan.name}-decision.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in plan.decision.state().items()}, str(directory / name))
        entry["decision"] = {"kind": plan.decision.kind, "meta": plan.decision.meta(), "file": name}
    if target.decodes:
        step = exe.step_stage()
        entry["decode"] = dict(_save_stage(step, target, directory), graph=dict(exe.decode_info))
    return entry


def write_artifact(cm, out_dir: str | os.PathLike, force: bool = False) -> Path:
    """Write a CompiledModel built from a model as an artifact directory (temporary directory moved into place)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    adapter = cm.adapter
    check_destination(out, force)
    tmp = temp_dir(out)
    try:
        t0 = time.perf_counter()
        manifest = cm.manifest()
        adapter.model.config.to_json_file(str(tmp / "config.json"))
        embed = adapter.model.get_input_embeddings()
        save_file({"weight": embed.weight.detach().contiguous()}, str(tmp / "embeddings.safetensors"))
        vision = adapter.save_vision(tmp)
        if adapter.processor is not None:
            adapter.processor.save_pretrained(str(tmp / "processor"))
        programs = [_save_program(exe, cm.target, tmp) for _, exe in sorted(cm.executables.items())]
        manifest.update({
            "format": ARTIFACT_FORMAT,
            "device": str(adapter.device),
            "config": "config.json",
            "embeddings": {"file": "embeddings.safetensors", "key": "weight", "scale": embedding_scale(embed)},
            "vision": vision,
            "processor": "processor" if adapter.processor is not None else None,
            "programs": programs,
            "files": _file_table(tmp),
            "write_seconds": time.perf_counter() - t0,
        })
        (tmp / MANIFEST).write_text(json.dumps(sign(manifest), indent=2, sort_keys=True))
        _move_into_place(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def copy_artifact(src: Path, out_dir: str | os.PathLike, force: bool = False) -> Path:
    """Save a loaded artifact elsewhere (it is already in its final form)."""
    out = Path(out_dir)
    check_destination(out, force)
    tmp = temp_dir(out)
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        _move_into_place(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# -- reading --------------------------------------------------------------------------------------------
def read_manifest(path: Path) -> dict:
    mf = path / MANIFEST
    if not mf.is_file():
        raise ArtifactError(f"{path} is not a vtcompile artifact: no manifest.json")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{mf} is corrupt ({exc}); re-create the artifact with vtcompile optimize") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ArtifactError(f"{path} has artifact format {found!r}; this vtcompile reads format "
                            f"{ARTIFACT_FORMAT}. Re-create it with this version (vtcompile optimize ... --out DIR).")
    if manifest.get(DIGEST) != manifest_digest(manifest):
        raise ArtifactError(f"{mf} does not match its own digest ({DIGEST}): its content was edited or corrupted "
                            "after it was written (a pass config, a version, a checksum). Re-create the artifact "
                            "with vtcompile optimize ... --out DIR rather than editing it.")
    return manifest


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def check_versions(path: Path, manifest: dict) -> None:
    versions = manifest.get("versions") or {}
    made = versions.get("vtcompile")
    if made != __version__:
        raise ArtifactError(f"{path} was written by vtcompile {made}; this is vtcompile {__version__}, whose stage "
                            "files may differ. Re-create the artifact with this version.")
    made_torch = versions.get("torch", "?")
    if _minor(made_torch) != _minor(torch.__version__):
        raise ArtifactError(f"{path} was written with torch {made_torch}; this is torch {torch.__version__}. "
                            "torch.export files are only read by the torch minor version that wrote them; "
                            "re-create the artifact here.")


def check_files(path: Path, manifest: dict) -> None:
    """Every file listed in the manifest exists and has the recorded sha256."""
    table = manifest.get("files")
    if not isinstance(table, dict) or not table:
        raise ArtifactError(f"{path / MANIFEST} lists no files and their sha256; re-create the artifact")
    for rel, entry in sorted(table.items()):
        f = path / rel
        if not f.is_file():
            raise ArtifactError(f"{path} is incomplete: {rel} is listed in the manifest but missing")
        if f.stat().st_size != entry.get("bytes") or sha256(f) != entry.get("sha256"):
            raise ArtifactError(f"{f} does not match the manifest (sha256 {entry.get('sha256', '?')[:16]}..., "
                                f"{entry.get('bytes')} bytes expected): the file is corrupt or was modified. "
                                "Re-create the artifact.")


def verify(path: str | os.PathLike) -> dict:
    """The manifest of an artifact whose format, versions and file checksums are right (what `inspect` and
    loading check first)."""
    path = Path(path)
    manifest = read_manifest(path)
    check_versions(path, manifest)
    check_files(path, manifest)
    return manifest


@dataclass
class Contents:
    """What an artifact holds, ready for CompiledModel: front end, passes, target, report, programs."""

    path: Path
    manifest: dict
    frontend: Frontend
    spec: ModelSpec
    passes: list
    target: object
    report: Report
    executables: dict[int, Executable]


def _loaded_stage(path: Path, target, info: dict) -> Stage:
    """A stored stage, loaded by the target at its first call."""
    stage = Stage.from_info(info)
    return dataclasses.replace(stage, module=LazyStage(stage, target,
                                                       loader=lambda: target.load(stage, path, info["files"])))


def _load_program(path: Path, entry: dict, target, geometry) -> Executable:
    from safetensors.torch import load_file

    stages = {name: _loaded_stage(path, target, info) for name, info in entry["stages"].items()}

    def graph(info: dict) -> StagedGraph:
        return StagedGraph([stages[n] for n in info["stages"]], info["placeholders"], info["results"],
                           info["residual"])

    decision = None
    if entry["decision"]:
        info = entry["decision"]
        try:
            decision = load_decision(info["kind"], info["meta"], load_file(str(path / info["file"])), geometry)
        except KeyError as exc:
            raise ArtifactError(f"{path}: the stored branch decision cannot be rebuilt ({exc}); re-create the "
                                "artifact with this version of vtcompile") from None
    plan = StagePlan(entry["name"], Signature.from_dict(entry["signature"]), graph(entry["base"]),
                     {int(e): graph(g) for e, g in entry["branches"].items()}, decision,
                     {int(e): n for e, n in entry["visual"].items()})
    decode, decode_info = None, {}
    if entry.get("decode"):
        decode, decode_info = _loaded_stage(path, target, entry["decode"]).module, entry["decode"]["graph"]
    return Executable(entry["n_visual"], list(entry["schedule"]), plan, target, decode=decode, decode_info=decode_info)


def embedding_scale(embed: nn.Module) -> float:
    """The factor a model's token embedding multiplies its rows by (Gemma: sqrt(hidden size)); 1.0 for a plain
    nn.Embedding."""
    scale = getattr(embed, "embed_scale", None)
    return 1.0 if scale is None else float(scale)


class _Embedding(nn.Module):
    """The stored embedding table, times the model's scale in the table's dtype (as transformers' scaled embeddings
    compute it)."""

    def __init__(self, weight: torch.Tensor, scale: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = float(scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(ids, self.weight)
        return rows if self.scale == 1.0 else rows * torch.tensor(self.scale).to(self.weight.dtype)


def read_artifact(path: str | os.PathLike) -> Contents:
    """Read an artifact written by write_artifact; refuses anything that does not match its manifest."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from .passes import get_pass
    from .targets import TARGETS, get_target

    path = Path(path)
    manifest = verify(path)
    mf = path / MANIFEST
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        expected = manifest["config_hash"]
        family = family_of_config(config)
        geometry = family.geometry_of(config)
        found = geometry.config_hash()
        if found != expected:
            raise ArtifactError(f"the model config stored in {path} has config hash {found}, the manifest says "
                                f"{expected}: the artifact was modified; re-create it")
        name = manifest["target"]
        if name not in TARGETS:
            raise ArtifactError(f"{path} was compiled for target {name!r}, unknown to this vtcompile")
        target = get_target(name)
        device = manifest.get("device", "cpu")
        if device != "cpu" and not torch.cuda.is_available():
            if getattr(target.module, "DEVICE_BOUND", False):
                raise ArtifactError(f"{path} holds {name} stages compiled for {device}, and this machine has no CUDA; "
                                    "re-create the artifact here (vtcompile optimize ... --target "
                                    f"{name} --out DIR) or run it on a CUDA machine")
            device = "cpu"
        spec = ModelSpec.from_dict(manifest["model"])
        passes = [(get_pass(p["pass"]), get_pass(p["pass"]).config.from_dict(p["config"]))
                  for p in manifest["passes"]]
        weight = load_file(str(path / manifest["embeddings"]["file"]), device=device)[manifest["embeddings"]["key"]]
        report = Report.from_dict(manifest["report"], geometry)
        processor = None
        if manifest.get("processor"):
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(str(path / manifest["processor"]), local_files_only=True)
        vision = family.load_vision(config, path, manifest["vision"], device)
        frontend = family.frontend_from_parts(config, _Embedding(weight, manifest["embeddings"].get("scale", 1.0)),
                                              vision, processor,
                                              manifest.get("generation"))
        executables = {}
        for entry in manifest["programs"]:
            exe = _load_program(path, entry, target, geometry)
            executables[exe.n_visual] = exe
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{mf} is missing or has a malformed field ({exc!r}); re-create the artifact") from None
    return Contents(path, manifest, frontend, spec, passes, target, report, executables)
