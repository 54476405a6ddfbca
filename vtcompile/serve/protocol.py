"""OpenAI chat completions <-> the engine: request checking, prompts, detokenisation, response objects.

No web framework here (app.py is the thin HTTP layer). Every problem with a request is a ServeError carrying the
HTTP status and OpenAI's error fields (message, type, param, code); the server answers it as JSON and never with a
traceback.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from ..errors import VtcompileError
from .errors import ServeError


@dataclass
class ChatRequest:
    input_ids: object  # torch [1, S]
    pixel_values: object
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    n_images: int
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ServeError(f"{name} must be {kind}, found {value!r}", param=name, code="invalid_value")
    if not low <= value <= high:
        raise ServeError(f"{name} must be in [{low}, {high}], found {value}", param=name, code="invalid_value")
    return value


class ChatProtocol:
    """Checks chat requests for one served model and builds its prompts and responses."""

    def __init__(self, name: str, frontend, images_per_request: int, image_policy, max_tokens_limit: int,
                 default_max_tokens: int = 16):
        self.name = name
        self.frontend = frontend
        self.processor = frontend.processor
        if self.processor is None or getattr(self.processor, "tokenizer", None) is None:
            raise VtcompileError("serving chat requests needs the model's processor (tokenizer + image processor); "
                                 "this model has none (tiny random presets). Serve the testbed, an artifact of it, or "
                                 "a checkpoint with its processor files")
        self.tokenizer = self.processor.tokenizer
        self.images_per_request = images_per_request
        self.policy = image_policy
        self.max_tokens_limit = max_tokens_limit
        self.default_max_tokens = min(default_max_tokens, max_tokens_limit)
        self.context = frontend.max_positions

    # -- requests ----------------------------------------------------------------------------------
    def parse(self, raw: bytes) -> ChatRequest:
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ServeError(f"the request body is not valid JSON ({exc})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ServeError("the request body must be a JSON object", code="invalid_json")
        model = body.get("model")
        if model is not None and model != self.name:
            raise ServeError(f"the model {model!r} does not exist; this server serves {self.name!r} (GET /v1/models)",
                             status=404, param="model", code="model_not_found")
        if body.get("n", 1) != 1:
            raise ServeError("n must be 1 (one choice per request)", param="n", code="invalid_value")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is None:
            max_tokens = self.default_max_tokens
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", None, 1, self.max_tokens_limit, integer=True)
        temperature = float(_number(body, "temperature", 0.0 if self._greedy_default() else 1.0, 0.0, 2.0))
        top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0))
        if top_p == 0:
            raise ServeError("top_p must be > 0", param="top_p", code="invalid_value")
        seed = _number(body, "seed", None, -2 ** 63, 2 ** 63 - 1, integer=True)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise ServeError("stop must be a string or a list of at most 4 non-empty strings", param="stop",
                             code="invalid_value")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ServeError("stream must be true or false", param="stream", code="invalid_value")
        options = body.get("stream_options") or {}
        include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
        prompt, images = self._messages(body.get("messages"))
        ids, pixels = self._encode(prompt, images)
        n = int(ids.shape[1])
        if self.context is not None and n >= self.context:
            raise ServeError(f"the prompt has {n} tokens; the model's context holds {self.context} positions for the "
                             "prompt and the answer together", param="messages", code="context_length_exceeded")
        if self.context is not None and n + max_tokens > self.context:
            raise ServeError(f"the prompt ({n} tokens) plus max_tokens={max_tokens} exceeds the model's context of "
                             f"{self.context} positions; ask for at most {self.context - n} tokens",
                             param="max_tokens", code="context_length_exceeded")
        return ChatRequest(ids, pixels, int(max_tokens), temperature, top_p, seed, stop, stream, include_usage,
                           len(images))

    def _greedy_default(self) -> bool:
        """Without a temperature, the model's own generation defaults decide (greedy unless they sample)."""
        return not self.frontend.generation.get("do_sample", False)

    def _messages(self, messages) -> tuple[str, list]:
        from .images import load_image

        if not isinstance(messages, list) or not messages:
            raise ServeError("messages must be a non-empty list of {role, content} objects", param="messages",
                             code="invalid_value")
        turns, images = [], []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise ServeError(f"messages[{i}] must be an object with role system, user or assistant",
                                 param="messages", code="invalid_value")
            content = m.get("content")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list):
                raise ServeError(f"messages[{i}].content must be a string or a list of content parts",
                                 param="messages", code="invalid_value")
            out = []
            for j, part in enumerate(parts):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    out.append({"type": "text", "text": part["text"]})
                elif kind == "image_url":
                    ref = part.get("image_url")
                    url = ref.get("url") if isinstance(ref, dict) else ref
                    if len(images) >= self.images_per_request:
                        raise ServeError(f"too many images: this model takes {self.images_per_request} image(s) per "
                                         "request", param="messages", code="too_many_images")
                    images.append(load_image(url, self.policy, f"messages[{i}].content[{j}]"))
                    out.append({"type": "image"})
                else:
                    raise ServeError(f"messages[{i}].content[{j}] must be a text part or an image_url part",
                                     param="messages", code="invalid_value")
            turns.append({"role": m["role"], "content": out})
        if len(images) != self.images_per_request:
            raise ServeError(f"this model takes {self.images_per_request} image(s) per request (an image_url content "
                             f"part); found {len(images)}", param="messages", code="missing_image")
        return self._template(turns), images

    def _template(self, turns: list[dict]) -> str:
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(turns, add_generation_prompt=True)
        from ..data import format_prompt

        users = [t for t in turns if t["role"] == "user"]
        if len(turns) != 1 or not users:
            raise ServeError("this model's processor has no chat template: send one user message",
                             param="messages", code="invalid_value")
        text = " ".join(p["text"] for p in users[0]["content"] if p["type"] == "text")
        return format_prompt(self.processor, text, sum(p["type"] == "image" for p in users[0]["content"]))

    def _encode(self, prompt: str, images: list):
        enc = self.processor(images=images or None, text=[prompt], return_tensors="pt")
        return enc["input_ids"], enc.get("pixel_values")

    # -- responses ---------------------------------------------------------------------------------
    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True).lstrip()

    def response(self, req: ChatRequest, text: str, finish: str, completion_tokens: int, extra: dict) -> dict:
        n = int(req.input_ids.shape[1])
        return {"id": req.id, "object": "chat.completion", "created": req.created, "model": self.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finish}],
                "usage": {"prompt_tokens": n, "completion_tokens": completion_tokens,
                          "total_tokens": n + completion_tokens},
                "vtcompile": extra}

    def chunk(self, req: ChatRequest, delta: dict, finish: str | None = None, extra: dict | None = None,
              usage: dict | None = None) -> str:
        obj = {"id": req.id, "object": "chat.completion.chunk", "created": req.created, "model": self.name,
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if usage is not None:
            obj["usage"] = usage
        if extra is not None:
            obj["vtcompile"] = extra
        return f"data: {json.dumps(obj)}\n\n"

    def usage_chunk(self, req: ChatRequest, usage: dict) -> str:
        """The last chunk with stream_options.include_usage: no choices, the usage."""
        obj = {"id": req.id, "object": "chat.completion.chunk", "created": req.created, "model": self.name,
               "choices": [], "usage": usage}
        return f"data: {json.dumps(obj)}\n\n"


class StopChecker:
    """Incremental text of an answer, cut at the first stop string; holds back text that could begin one."""

    def __init__(self, protocol: ChatProtocol, stop: list[str]):
        self.protocol, self.stop = protocol, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.sent = 0
        self.text = ""
        self.stopped = False

    def feed(self, tokens: list[int], final: bool = False) -> str:
        """The new text to send after `tokens` (all of the answer's tokens so far)."""
        text = self.protocol.text(tokens)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self.stopped, final = text[:cut], True, True
        self.text = text
        end = len(text) if final else max(self.sent, len(text) - self.hold)
        out = text[self.sent:end]
        self.sent = end
        return out
