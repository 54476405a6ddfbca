"""Artifacts: a self-contained directory that runs in a new process without the original model files.

Layout (format 3):
    manifest.json             versions, model id + config hash, passes + configs, target, input spec, FLOPs
                              report, the stages, and the sha256 of every other file
    config.json               the model's LlavaConfig (geometry, image token id, vision settings)
    embeddings.safetensors    the token embedding table ("weight" [V, D])
    vision.pt2                vision tower + projector, torch.export'ed with a dynamic image count
    decoder-v<N>.pt2|.onnx    the rewritten decoder for N visual tokens per prompt, dynamic batch/sequence
                              (.pt2 for eager/inductor/tensorrt, .onnx [+ .onnx.data] for onnx)
    decoder-v<N>-layer<i>.pt2|.onnx, decoder-v<N>-exit<e>-layer<i>.pt2|.onnx, decoder-v<N>-routers.safetensors
                              a program with dynamic exits (dyvte with routers): one file per layer stage of
                              the base graph and of each exit continuation (in the target's format), and the
                              routers
    processor/                the model's processor files, when it has a processor

Loading checks, in order: the format, the vtcompile and torch versions the files were written with, the
sha256 of every file, and the config hash of the stored config; any mismatch is refused with what was
expected, what was found and what to do. The merge (token embeddings with image features written at the
image-token positions) runs in PyTorch from the stored embedding table and vision stage.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from . import __version__
from .errors import ArtifactError, InputError, UnsupportedModelError
from .models.llava import LlavaAdapter, ModelSpec, geometry_from_config

ARTIFACT_FORMAT = 3
MANIFEST = "manifest.json"
MAX_IMAGES = 64


# -- writing ------------------------------------------------------------------------------------------
class VisionStage(nn.Module):
    """pixel_values [n_images, 3, H, W] -> image features [n_images, N_visual, D] (tower + projector).

    Mirrors LlavaModel.get_image_features (feature layer(s), CLS crop, projector) without its final split
    into a per-image list, which would fix the image count in the export. Only the tower and projector are
    registered, so the export holds their weights and not the decoder's."""

    def __init__(self, adapter: LlavaAdapter):
        super().__init__()
        self.vision_tower = adapter.model.model.vision_tower
        self.projector = adapter.model.model.multi_modal_projector
        self.layer = adapter.model.config.vision_feature_layer
        self.strategy = adapter.model.config.vision_feature_select_strategy
        self.dtype = adapter.dtype

    def forward(self, pixel_values):
        out = self.vision_tower(pixel_values.to(self.dtype), output_hidden_states=True, return_dict=True)
        layers = [self.layer] if isinstance(self.layer, int) else list(self.layer)
        feats = [out.hidden_states[i] for i in layers]
        if self.strategy == "default":
            feats = [f[:, 1:] for f in feats]
        return self.projector(feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1))


def _export_vision(adapter: LlavaAdapter) -> torch.export.ExportedProgram:
    vc = adapter.model.config.vision_config
    example = torch.zeros(2, 3, vc.image_size, vc.image_size, dtype=adapter.dtype, device=adapter.device)
    images = torch.export.Dim("images", min=1, max=MAX_IMAGES)
    with torch.no_grad():
        return torch.export.export(VisionStage(adapter), (example,), dynamic_shapes=({0: images},))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_table(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): {"sha256": sha256(p), "bytes": p.stat().st_size}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def write_artifact(cm, out_dir: str | os.PathLike, force: bool = False) -> Path:
    """Write `cm` (a CompiledModel) as an artifact directory, via a temporary directory moved into place."""
    from safetensors.torch import save_file

    from .targets import get_target

    out = Path(out_dir)
    if out.exists() and not force:
        raise ArtifactError(f"output directory {out} already exists; choose another --out or pass --force "
                            "to replace it")
    programs = dict(cm.runtime.programs)
    dynamic = [n for n, p in programs.items() if getattr(p, "exits", None)]
    target = get_target(cm.target)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        t0 = time.perf_counter()
        adapter = cm.adapter
        manifest = cm.manifest()
        manifest["format"] = ARTIFACT_FORMAT
        manifest["device"] = str(adapter.device)
        adapter.model.config.to_json_file(str(tmp / "config.json"))
        save_file({"weight": adapter.model.get_input_embeddings().weight.detach().contiguous()},
                  str(tmp / "embeddings.safetensors"))
        torch.export.save(_export_vision(adapter), str(tmp / "vision.pt2"))
        if adapter.processor is not None:
            adapter.processor.save_pretrained(str(tmp / "processor"))
        stages = [_save_staged(program, cm.runtime._lowered[n], tmp, target) if n in dynamic
                  else target.save_stage(program, cm.runtime._lowered[n], tmp) for n, program in sorted(programs.items())]
        manifest.update({
            "config": "config.json",
            "embeddings": {"file": "embeddings.safetensors", "key": "weight"},
            "vision": {"file": "vision.pt2", "inputs": ["pixel_values [n_images,3,H,W]"],
                       "outputs": ["image_features [n_images,N_visual,D]"], "dynamic": {"images": [1, MAX_IMAGES]}},
            "processor": "processor" if adapter.processor is not None else None,
            "stages": stages,
            "files": _file_table(tmp),
            "write_seconds": time.perf_counter() - t0,
        })
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _save_staged(program, xp, directory: Path, target) -> dict:
    """Write a program with dynamic exits (compiler.staged.ExitProgram): every per-layer stage in the target's
    format (targets/staged.py: stages up to an exit are the base graph's and stored once) and the routers as
    safetensors."""
    from safetensors.torch import save_file

    from .targets import stage as st
    from .targets.staged import save_exit_program

    routers = getattr(xp.decide, "__self__", None)
    if not isinstance(routers, nn.Module):
        raise ArtifactError("the dynamic-exit program's decision rule is not a module with weights; only "
                            "DyVTE routers can be saved")
    try:
        staged = save_exit_program(program, xp, directory, target)
    except UnsupportedModelError as exc:
        raise ArtifactError(str(exc)) from exc
    router_file = f"{st.stem(program)}-routers.safetensors"
    save_file({k: v.detach().contiguous().cpu() for k, v in routers.state_dict().items()}, str(directory / router_file))
    files = [f for g in (staged["base"], *staged["exits"].values()) for s in g["stages"] for f in s["files"]]
    info = st.stage_info(program, files + [router_file], f"{target.stage_format}-staged")
    info["staged"] = dict(staged, decider={"pass": "dyvte", "file": router_file})
    return info


def _load_staged(path: Path, info: dict, geometry, passes: list, target):
    """The ExitProgram stored by _save_staged, its stages loaded by the target, with the routers of the
    artifact's dyvte pass."""
    from safetensors.torch import load_file

    from .compiler.staged import ExitProgram
    from .passes.dyvte import load_routers, routers_recipe
    from .targets.staged import load_exit_graphs

    sg = info["staged"]
    base, exits, visual = load_exit_graphs(path, sg, target)
    config = next((c for p, c in passes if p.name == sg["decider"]["pass"]), None)
    if config is None:
        raise ArtifactError(f"{path}: the stored routers belong to pass {sg['decider']['pass']!r}, which the "
                            "manifest's passes do not list; re-create the artifact")
    program = SimpleNamespace(geometry=geometry)  # all load_routers reads of a Program
    routers = load_routers(config, program, routers_recipe(load_file(str(path / sg["decider"]["file"]))))
    return ExitProgram(base, exits, routers.decide, visual)


# -- reading ------------------------------------------------------------------------------------------
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


class _Embeddings(nn.Module):
    """What LlavaAdapter.merge needs of a model: its config and its input embeddings."""

    def __init__(self, config, weight: torch.Tensor):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding.from_pretrained(weight, freeze=True)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed


class ArtifactAdapter(LlavaAdapter):
    """The model side of a loaded artifact: embeddings, vision stage, config and processor; no decoder.

    merge() is LlavaAdapter's (same checks and errors). The unpruned decoder is not in the artifact: where a
    caller needs it (a fidelity reference), decoder_stage() rebuilds the original model from the manifest's
    model reference when that is available, and says so clearly when it is not.
    """

    def __init__(self, config, embeddings: torch.Tensor, vision: nn.Module, spec: ModelSpec, processor=None):
        self.config = config
        self.model = _Embeddings(config, embeddings)
        self.vision = vision
        self.spec = spec
        self.processor = processor
        self._original = None

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values.to(device=self.device, dtype=self.dtype))

    def original(self) -> LlavaAdapter:
        """The unpruned model the artifact was made from, rebuilt from its reference (preset or checkpoint)."""
        if self._original is None:
            from .models import build_from_spec

            if self.spec.source not in ("random", "checkpoint") or (
                    self.spec.source == "checkpoint" and not Path(self.spec.path or "").is_dir()):
                raise ArtifactError(
                    f"this artifact holds the compiled (pruned) stages only; the unpruned model "
                    f"({self.spec.name}, source {self.spec.source}) is not available here to rebuild it")
            adapter = build_from_spec(self.spec)
            if adapter.geometry.config_hash() != self.geometry.config_hash():
                raise ArtifactError(f"the model rebuilt from {self.spec.name} has config hash "
                                    f"{adapter.geometry.config_hash()}, the artifact {self.geometry.config_hash()}")
            self._original = adapter
        return self._original

    def decoder_stage(self):
        return self.original().decoder_stage()


class _Stage:
    """What the runtime needs to know about a stored stage (Program's bookkeeping, without the graph)."""

    def __init__(self, info: dict):
        self.n_visual = int(info["n_visual"])
        self.schedule = list(info.get("visual_tokens_per_layer", []))
        self.applied = list(info.get("passes", []))
        self.exits = {}
        self.info = info


def _artifact_runtime(adapter: ArtifactAdapter, stages: dict, lowered: dict, path: Path):
    from .compiler.runtime import StagedRuntime

    class ArtifactRuntime(StagedRuntime):
        """StagedRuntime over stored stages: the same input checks and merge, no graph building."""

        def program(self, n_visual: int):
            if n_visual not in self.programs:
                have = ", ".join(f"{n} ({n // max(1, adapter.geometry.visual_tokens_per_image)} image(s))"
                                 for n in sorted(self.programs))
                raise InputError(f"the artifact {path} holds decoder stages for {have} visual tokens per prompt; "
                                 f"this prompt has {n_visual}. Re-create the artifact from a model that was run "
                                 "on such prompts, or give one image per prompt.")
            return self.programs[n_visual]

    runtime = ArtifactRuntime(adapter, None, [], None)
    runtime.programs = dict(stages)
    runtime._lowered = dict(lowered)
    return runtime


class LoadedModel:
    """A compiled model loaded from an artifact: callable like CompiledModel, with its report and manifest."""

    def __init__(self, path: Path, manifest: dict, adapter: ArtifactAdapter, runtime, passes: list, report):
        self.path = path
        self.manifest = manifest
        self.adapter = adapter
        self.runtime = runtime
        self.passes = passes
        self.target = manifest["target"]
        self.report = report

    @property
    def recipes(self) -> dict:
        return self.manifest.get("report", {}).get("recipes", {})

    @property
    def program(self):
        return self.runtime.program(self.adapter.geometry.visual_tokens_per_image)

    def __call__(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None):
        return self.runtime(input_ids, pixel_values, attention_mask)

    def save(self, out_dir, force: bool = False) -> Path:
        """Copy the artifact (it is already in its final form)."""
        out = Path(out_dir)
        if out.exists() and not force:
            raise ArtifactError(f"output directory {out} already exists; choose another --out or pass --force")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(self.path, out)
        return out


def _report(manifest: dict, geometry):
    """The compile report stored in the manifest, as a Report (tables print as after compile_pruned)."""
    import dataclasses

    from .api import Report
    from .compiler.flops import FlopsReport

    r = dict(manifest["report"])
    f = r["flops"]
    schedule = list(f["visual_tokens_per_layer"])
    mlp = f.get("visual_tokens_per_layer_mlp")
    try:
        r["flops"] = FlopsReport(geometry, f["n_visual"], f["n_text"], schedule, list(mlp) if mlp else None)
    except TypeError:  # a FlopsReport without an MLP schedule
        r["flops"] = FlopsReport(geometry, f["n_visual"], f["n_text"], schedule)
    names = {fl.name for fl in dataclasses.fields(Report)}
    return Report(**{k: v for k, v in r.items() if k in names})


def read_artifact(path: str | os.PathLike) -> LoadedModel:
    """Load an artifact written by write_artifact; refuses anything that does not match its manifest."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from .passes import get_pass
    from .targets import TARGETS, get_target

    path = Path(path)
    manifest = read_manifest(path)
    check_versions(path, manifest)
    check_files(path, manifest)
    mf = path / MANIFEST
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        expected = manifest["config_hash"]
        found = geometry_from_config(config).config_hash()
        if found != expected:
            raise ArtifactError(f"the model config stored in {path} has config hash {found}, the manifest says "
                                f"{expected}: the artifact was modified; re-create it")
        name = manifest["target"]
        if name not in TARGETS:
            raise ArtifactError(f"{path} was compiled for target {name!r}, unknown to this vtcompile")
        target = get_target(name)
        spec = ModelSpec.from_dict(manifest["model"])
        passes = [(get_pass(p["pass"]), get_pass(p["pass"]).config.from_dict(p["config"]))
                  for p in manifest["passes"]]
        stage_infos = manifest["stages"]
        device = manifest.get("device", "cpu")
        device = device if device == "cpu" or torch.cuda.is_available() else "cpu"
        embeddings = load_file(str(path / manifest["embeddings"]["file"]), device=device)[manifest["embeddings"]["key"]]
        vision_file = manifest["vision"]["file"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{mf} is missing or has a malformed field ({exc!r}); re-create the artifact") from None
    processor = None
    if manifest.get("processor"):
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(path / manifest["processor"]), local_files_only=True)
    vision = torch.export.load(str(path / vision_file)).module()
    adapter = ArtifactAdapter(config, embeddings, vision, spec, processor)
    stages, lowered = {}, {}
    for info in stage_infos:
        st = _Stage(info)
        stages[st.n_visual] = st
        lowered[st.n_visual] = (_load_staged(path, info, adapter.geometry, passes, target) if info.get("staged")
                                else target.load_stage(path, info))
    runtime = _artifact_runtime(adapter, stages, lowered, path)
    return LoadedModel(path, manifest, adapter, runtime, passes, _report(manifest, adapter.geometry))


# -- running a prompt (vtcompile run) -------------------------------------------------------------------
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _image(path) -> "PIL.Image.Image":  # noqa: F821
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path).convert("RGB")
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from None


def _plain_pixels(adapter, image) -> torch.Tensor:
    """Resize + CLIP normalisation, for models without a processor (tiny random models)."""
    import numpy as np

    size = adapter.config.vision_config.image_size
    arr = np.asarray(image.resize((size, size)), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)
    x = (x - torch.tensor(_CLIP_MEAN)[:, None, None]) / torch.tensor(_CLIP_STD)[:, None, None]
    return x.unsqueeze(0)


def prompt_inputs(model, image=None, prompt: str | None = None, input_ids=None):
    """(input_ids, pixel_values, attention_mask) for one prompt.

    With the artifact's processor: the image and the prompt text in the model's chat format. Without one
    (tiny random models): `input_ids`, a list of token ids where each image is one image-token id (expanded
    to the visual tokens per image) or already expanded; the image is resized and CLIP-normalised.
    """
    adapter = model.adapter
    img = _image(image) if image is not None else None
    if input_ids is None:
        if prompt is None:
            raise InputError("give --prompt TEXT (with the artifact's processor) or --input-ids JSON")
        proc = adapter.processor
        if proc is None:
            raise InputError(
                "this artifact has no processor (tokenizer + image processor): the model it was made from had none, "
                "as tiny random models do. Pass token ids instead: --input-ids '[5, 9, "
                f"{adapter.image_token_id}, 7]' (one image token id {adapter.image_token_id} per --image).")
        token = getattr(proc, "image_token", "<image>")
        text = f"USER: {token}\n{prompt} ASSISTANT:" if img is not None else f"USER: {prompt} ASSISTANT:"
        if getattr(proc, "chat_template", None):
            content = ([{"type": "image"}] if img is not None else []) + [{"type": "text", "text": prompt}]
            text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        enc = proc(images=img, text=text, return_tensors="pt") if img is not None else \
            proc(text=text, return_tensors="pt")
        return enc["input_ids"], enc.get("pixel_values"), enc.get("attention_mask")
    ids = [int(t) for t in input_ids]
    per_image = adapter.geometry.visual_tokens_per_image
    n_tok = sum(t == adapter.image_token_id for t in ids)
    n_img = 1 if img is not None else 0
    if n_tok == n_img and n_img:  # one placeholder per image: expand it like a processor does
        ids = [x for t in ids for x in ([t] * per_image if t == adapter.image_token_id else [t])]
    elif n_tok != n_img * per_image:
        raise InputError(f"--input-ids hold {n_tok} image token(s) (id {adapter.image_token_id}) for {n_img} "
                         f"image(s); give one placeholder (or {per_image} tokens) per --image")
    pixels = _plain_pixels(adapter, img) if img is not None else None
    ids_t = torch.tensor([ids])
    return ids_t, pixels, torch.ones_like(ids_t)


@torch.no_grad()
def next_token(model, input_ids, pixel_values, attention_mask, top: int = 5) -> dict:
    """Greedy prefill: the most likely next token after the prompt, its top alternatives and the timing."""
    t0 = time.perf_counter()
    out = model(input_ids, pixel_values, attention_mask)
    seconds = time.perf_counter() - t0
    probs = torch.softmax(out.logits[0, -1].float(), dim=-1)
    p, ids = probs.topk(min(top, probs.numel()))
    tok = getattr(model.adapter.processor, "tokenizer", None)

    def text(i: int) -> str | None:
        return tok.decode([i]) if tok is not None else None

    return {"token_id": int(ids[0]), "text": text(int(ids[0])), "prefill_seconds": seconds,
            "prompt_tokens": int(input_ids.shape[1]), "kept_tokens": int(out.kept_positions.shape[1]),
            "kept_visual": int(out.kept_visual[0].sum()),
            "exit_layer": out.exit_layers[0] if out.exit_layers else None,  # dynamic exits: -1 = none
            "top": [{"token_id": int(i), "text": text(int(i)), "prob": float(q)} for q, i in zip(p, ids)]}
