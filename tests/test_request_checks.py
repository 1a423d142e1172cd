"""Checks on user input shared by the TUI and --batch: the img2img source and A1111 prompt syntax."""

from __future__ import annotations

import pytest
from PIL import Image

from core.errors import RequestError
from core.request import prompt_syntax_warnings, resolve_init_image


def test_init_image_is_resolved_and_must_open_as_an_image(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "source.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    assert resolve_init_image("source.png", tmp_path) == str((tmp_path / "source.png").resolve())
    assert resolve_init_image(str(tmp_path / "sub" / ".." / "source.png")) == str((tmp_path / "source.png").resolve())
    with pytest.raises(RequestError, match=r"does not exist"):
        resolve_init_image("missing.png", tmp_path)
    with pytest.raises(RequestError, match=r"an image file \(PNG, JPEG, WebP\); .*notes.txt' is not one"):
        resolve_init_image("notes.txt", tmp_path)


@pytest.mark.parametrize(("prompt", "found"), [
    ("a cat, [red:blue:0.5] (word:1.2) <lora:x:1>", []),  # prompt editing is applied now
    ("[dog|cat] <LYCO:y:0.5>, [cat:0.3], [from::10]", []),  # and alternation
    ("[blurry], (a:1.2), \\[not:an:0.5] edit", []),  # weighting and escaped brackets
    ("a [red:blue:0.5] cat, [dog|cat", ["[dog|cat", "[red:blue:0.5]"]),  # unclosed: the whole prompt is text
    ("[dog|cat] | bird", ["[dog|cat]"]),  # a '|' outside brackets: A1111's grammar reads none of it
])
def test_prompt_editing_that_cannot_be_read_is_named(prompt, found):
    warnings = prompt_syntax_warnings(prompt, "")
    assert len(warnings) == (1 if found else 0)
    if found:
        assert warnings[0].startswith(f"{', '.join(found)} in the prompt: ") and "used as text" in warnings[0]


@pytest.mark.parametrize("label, hint", [
    ("DPM++ 2M Karras", "did you mean sampler = 'dpmpp_2m' with schedule = 'karras'?"),  # A1111 before 1.9
    ("Euler a", "did you mean 'euler_ancestral'?"),
    ("dpmpp_2m", None),
])
def test_a_sampler_label_that_names_the_schedule_too_is_answered_with_both_fields(label, hint):
    from core.request import GenerationRequest

    if hint is None:
        assert GenerationRequest(model="m", sampler=label).sampler == label
        return
    with pytest.raises(RequestError) as caught:
        GenerationRequest(model="m", sampler=label)
    assert str(caught.value).endswith(f"({hint})")
