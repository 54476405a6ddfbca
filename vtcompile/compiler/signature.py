"""Named signatures of the graphs the compiler produces.

A decoder graph takes and returns flat tuples (what torch.export, Inductor and ONNX want); its Signature says
what each position is. Every output also says which layer's state it holds (``layer``: the cut position it is
read at, so a rewrite at cut b redirects only outputs read at or after b) and which axis is the token axis
(so the runtime can regroup rows that kept different numbers of tokens).

Prefill (the pruned program):
    inputs   inputs_embeds [B,S,D], attention_mask [B,S], position_ids [B,S], visual_mask [B,S]
    outputs  logits [B,S',V], positions [B,S'] (original index of each kept position), visual [B,S'],
             and for each layer l whose attention runs: key_positions_l [B,S_l] (the original positions of the
             keys that layer's attention saw), k_l / v_l [B,H_kv,S_l,hd] (its keys after RoPE and its values,
             before any GQA repeat: exactly what a KV cache of that layer holds).
Decode step (one compiled graph for every step):
    inputs   inputs_embeds [B,T,D], position_ids [B,T] (RoPE positions of the new tokens), query_index [B,T]
             (their sequence indices: what masks compare, compiler.attention), write_index [L] (per layer: the cache
             slot of the first new token), and per layer k_cache_l / v_cache_l [B,H_kv,C_l,hd] and key_index_l
             [B,C_l] (the original sequence index of the key in each slot, -1 where none), all written in place
    outputs  logits [B,T,V] (and, in the functional form for backends without input mutation, the written
             caches k_cache_l, v_cache_l, key_index_l)
"""
from __future__ import annotations

from dataclasses import dataclass

PREFILL_INPUTS = ("inputs_embeds", "attention_mask", "position_ids", "visual_mask")
END = float("inf")  # `layer` of an output read after the last layer (logits and final bookkeeping)


@dataclass(frozen=True)
class Output:
    name: str
    layer: float = END  # the cut position the value is read at
    token_axis: int | None = 1
    fill: float = 0  # what padding holds when rows of different lengths are regrouped

    def to_dict(self) -> dict:
        return {"name": self.name, "layer": None if self.layer == END else self.layer,
                "token_axis": self.token_axis, "fill": self.fill}

    @classmethod
    def from_dict(cls, d: dict) -> "Output":
        return cls(d["name"], END if d.get("layer") is None else d["layer"], d.get("token_axis"), d.get("fill", 0))


@dataclass(frozen=True)
class Signature:
    inputs: tuple[str, ...]
    outputs: tuple[Output, ...]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    def output(self, name: str) -> Output:
        return next(o for o in self.outputs if o.name == name)

    def unpack(self, values) -> dict:
        """{output name: value} from a graph's flat output tuple."""
        values = tuple(values)
        if len(values) != len(self.outputs):
            raise ValueError(f"expected {len(self.outputs)} outputs ({', '.join(self.output_names)}), "
                             f"found {len(values)}")
        return dict(zip(self.output_names, values))

    def cache_layers(self) -> list[int]:
        """Layers whose attention runs (and so have a KV cache), in order."""
        return sorted(int(o.name[2:]) for o in self.outputs if o.name.startswith("k_"))

    def to_dict(self) -> dict:
        return {"inputs": list(self.inputs), "outputs": [o.to_dict() for o in self.outputs]}

    @classmethod
    def from_dict(cls, d: dict) -> "Signature":
        return cls(tuple(d["inputs"]), tuple(Output.from_dict(o) for o in d["outputs"]))


def prefill_signature(layers: list[int]) -> Signature:
    outs = [Output("logits"), Output("positions", fill=-1), Output("visual")]
    for layer in layers:
        outs += [Output(f"key_positions_{layer}", layer, 1, -1), Output(f"k_{layer}", layer, 2),
                 Output(f"v_{layer}", layer, 2)]
    return Signature(PREFILL_INPUTS, tuple(outs))


def decode_signature(layers: list[int], in_place: bool = True) -> Signature:
    """The decode step's signature; the functional form (in_place=False) also returns each written cache."""
    inputs = ["inputs_embeds", "position_ids", "query_index", "write_index"]
    for layer in layers:
        inputs += [f"k_cache_{layer}", f"v_cache_{layer}", f"key_index_{layer}"]
    outputs = [Output("logits")]
    if not in_place:
        for layer in layers:
            outputs += [Output(f"k_cache_{layer}", token_axis=2), Output(f"v_cache_{layer}", token_axis=2),
                        Output(f"key_index_{layer}", token_axis=1, fill=-1)]
    return Signature(tuple(inputs), tuple(outputs))
