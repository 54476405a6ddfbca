"""Inputs a careless user gives the API: each is a clear InputError (what was expected, what was found, what to do)
or, where the model can still answer, a warning - never a traceback from deep inside torch or transformers, and
never a silently wrong answer. The CLI's side (exit codes, stderr) is in test_cli.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vtcompile import compile_pruned
from vtcompile.data import PromptEncoder, open_image, prompt_inputs, warn_unknown_words
from vtcompile.errors import InputError, PassConfigError

from .common import adapter, compiled, prompt


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    """A 16-bit greyscale PNG (PIL mode I;16) reaches the model as the same pixels as its 8-bit version; PIL's own
    convert("RGB") clips every value above 255, which made such images white."""
    grey8 = np.tile(np.arange(0, 256, dtype=np.uint8), (32, 1))
    Image.fromarray(grey8).save(tmp_path / "g8.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # 0..65535, the same levels
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    a, b = np.asarray(open_image(tmp_path / "g8.png")), np.asarray(open_image(tmp_path / "g16.png"))
    assert a.shape == b.shape == (32, 256, 3) and np.array_equal(a, b)
    assert (np.asarray(Image.open(tmp_path / "g16.png").convert("RGB")) == 255).mean() > 0.99  # what PIL did
    frontend = adapter("testbed").frontend
    px8 = prompt_inputs(frontend, [tmp_path / "g8.png"], ["what color is the circle?"])["pixel_values"]
    px16 = prompt_inputs(frontend, [tmp_path / "g16.png"], ["what color is the circle?"])["pixel_values"]
    assert torch.equal(px8, px16)


def test_empty_and_unknown_word_prompts_warn(caplog):
    tok = adapter("testbed").frontend.tokenizer
    with caplog.at_level("WARNING", logger="vtcompile"):
        assert warn_unknown_words(tok, ["what color is the circle?"]) == []
        assert caplog.text == ""
        assert warn_unknown_words(tok, ["", "   ", "what is the flux capacitor doing", "what color is the blob?"]) \
            == [0, 1, 2]
    said = caplog.text
    assert "prompt 1 is empty" in said and "prompt 2 is empty" in said
    assert "prompt 3: 3 of its 6 words are unknown to the model's tokenizer (<unk>): 'flux', 'capacitor', 'doing'" \
        in said
    assert "`vtcompile models` lists the words of the shipped testbed" in said
    assert "prompt 4" not in said  # one unknown word of six: the model can still read the question


def test_two_image_placeholders_with_one_image_is_refused():
    encoder = PromptEncoder(adapter("testbed").processor)
    image = Image.new("RGB", (64, 64))
    with pytest.raises(InputError, match="prompt 1 holds 2 <image> placeholders but 1 image"):
        encoder.batch(["USER: <image><image>\nwhat color is the circle? ASSISTANT:"], [image])
    with pytest.raises(InputError, match="prompt 2 holds 1 <image> placeholders but 0 image"):
        encoder.batch(["what?", "<image> what?"], [image, None])
    ids, pixels, mask = encoder.batch(["USER: <image>\nwhat color is the circle? ASSISTANT:"], [image])
    assert int((ids == adapter("testbed").image_token_id).sum()) == 144 and pixels.shape[0] == 1


@pytest.mark.parametrize("change,needle", [
    (lambda ids, px, m: (torch.cat([ids[:, :-1], torch.full_like(ids[:, -1:], 4096)], 1), px, m),
     r"token id\(s\) 4096 are outside the model's vocabulary of \d+ ids \(0..\d+\)"),
    (lambda ids, px, m: (torch.where(m.bool(), ids, -1), px, m), r"token id\(s\) -1 are outside"),
    (lambda ids, px, m: (ids[:0], px[:0], m[:0]), r"at least one row and one token, found shape \(0, "),
    (lambda ids, px, m: (ids, px[:, :1], m), r"pixel_values has shape \(2, 1, 32, 32\), the vision tower takes "
                                             r"\[n_images, 3, 32, 32\]"),
    (lambda ids, px, m: (ids, px[..., :16, :16], m), r"has shape \(2, 3, 16, 16\).*3 channels at 32x32"),
    (lambda ids, px, m: (ids, px.long(), m), "pixel_values must be a floating-point tensor"),
    (lambda ids, px, m: (ids, px, torch.cat([m[:1], torch.zeros_like(m[1:])])), r"attention_mask row\(s\) \[1\] are "
                                                                                 "all zeros"),
    (lambda ids, px, m: (ids, px, m * 2), "only 0 .padding. and 1"),
])
def test_bad_tensors_are_clear_errors(change, needle):
    """Out-of-vocabulary ids (an IndexError inside torch.embedding before), an empty batch, 1-channel or wrong-size
    pixels (raw conv errors), an all-zero mask row (diagnosed as left padding before) - through prefill and generate."""
    cm = compiled("tiny", "fastv")
    args = change(*prompt("tiny", "mid_pad_b2"))
    with pytest.raises(InputError, match=needle):
        cm(*args)
    with pytest.raises(InputError, match=needle):
        cm.generate(*args, max_new_tokens=2)


def test_over_long_prompt_gives_the_limit():
    cm = compiled("tiny", "fastv")
    ids, pixels, mask = prompt("tiny", "mid_pad_b2")  # 36 tokens; the tiny model's context is 512 positions
    with pytest.raises(InputError, match="plus max_new_tokens=500 exceeds the model's context of 512 positions; ask "
                                         "for at most 476 new tokens"):
        cm.generate(ids, pixels, mask, max_new_tokens=500)
    pad = torch.full((2, 480), 5)
    long_ids, long_mask = torch.cat([pad, ids], 1), torch.cat([torch.ones_like(pad), mask], 1)
    with pytest.raises(InputError, match="the prompt alone has 516 tokens; the model's context holds 512 positions .* "
                                         "at most 511 tokens"):
        cm.generate(long_ids, pixels, long_mask, max_new_tokens=1)


def test_the_same_pass_twice_is_refused_with_what_to_do():
    """fastv twice cut at the same layer, where the second scorer would read tokens the first removed (it died in
    FX's broadcasting before: "Attempting to broadcast a dimension of length s49"). The CLI's exit code:
    test_cli.py::test_careless_flags_from_the_shell."""
    with pytest.raises(PassConfigError, match="pass 'fastv' removes tokens before layer 2, where pass 'fastv' already "
                                              "removed tokens; .*one fastv removing a larger share.*before layer 3"):
        compile_pruned(adapter("tiny"), ["fastv", "fastv:r=0.3"], progress=False)
