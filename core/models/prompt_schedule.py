"""A1111 prompt editing, alternation and composable prompts: which text conditions each sampler step.

Syntax (restated from A1111's documentation and the behaviour of its ``prompt_parser.py``; own code):

- ``[from:to:when]`` uses ``from`` up to step ``when`` and ``to`` after it; ``[to:when]`` adds ``to`` after
  ``when``; ``[from::when]`` removes ``from`` after ``when``. ``when`` written with a ``.`` is a fraction of
  the steps (``0.5`` -> ``int(0.5 * steps)``), without one a step number; either is cut to ``steps``.
  Nesting works: ``a[b:[c:d:2]:1]e`` is ``abe``, ``ace``, ``ade``.
- ``[a|b|c]`` alternates per step (``a`` at 1, ``b`` at 2, ...); empty options are empty text.
- Round and square brackets that are not one of these stay in the text for the weighting parser
  (``core.models.prompt``). A prompt the grammar cannot read (a ``|`` outside ``[...]``, a trailing
  backslash) is used as it is at every step, as A1111 does.
- Hires fix: the second pass schedules with its own step count; a step number counts on from the first
  pass (``[a:b:25]`` with 20 + 10 steps switches after the hires pass's step 5) and a fraction runs from 1.0
  (start of the hires pass) to 2.0 (its end), A1111's default ("old scheduling" off).
- ``AND`` (uppercase, a whole word) splits the positive prompt into subprompts, each with an optional
  trailing ``:weight`` (A1111's composable diffusion: ``uncond + cfg * sum w_i (cond_i - uncond)``); each
  subprompt is scheduled on its own. The negative prompt is never split.

A schedule is a list of ``(end_at_step, text)``: ``text`` conditions the calls up to ``end_at_step``. The
denoiser counts its calls from 0 and takes the first entry with ``call <= end_at_step`` (A1111's
``reconstruct_cond_batch``, kept with its off-by-one: ``[a|b]`` gives a, a, b, a, b, ...). Samplers that
call the model twice per step schedule over twice the steps, as A1111's "second order" samplers do.

Pure text, stdlib only: the request checks use it on any thread.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Hashable, Sequence
from typing import Any

# A1111's plain text: anything but the special characters, or a backslash escaping any one character.
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
# ":" already consumed; then optional whitespace, a (signed) number, optional whitespace and "]".
_WHEN = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")
_AND = re.compile(r"\bAND\b")
_SUBPROMPT_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")

# Samplers whose steps call the model twice (A1111 marks them "second_order" and doubles their steps for
# prompt schedules).
SECOND_ORDER_SAMPLERS = frozenset({"heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde"})

# Tree: str (text), list (sequence), ("edit", before | None, after, when) or ("alt", [options]).
Node = Any


class _Parser:
    """Recursive descent over A1111's schedule grammar; ``None`` where a bracket group does not parse, so
    the caller reads its bracket as text (at the top level) or gives up on the enclosing group."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.memo: dict[tuple[str, int], tuple[Node, int] | None] = {}

    def char(self, i: int) -> str:
        return self.text[i] if i < len(self.text) else ""

    def sequence(self, i: int, top: bool = False) -> tuple[list[Node], int]:
        items: list[Node] = []
        while i < len(self.text):
            if m := _PLAIN.match(self.text, i):
                items.append(m.group())
                i = m.end()
                continue
            ch = self.text[i]
            group = self.square(i) if ch == "[" else self.round(i) if ch == "(" else None
            if group is not None:
                items.append(group[0])
                i = group[1]
            elif top and ch in "[]():":
                items.append(ch)  # a stray bracket or colon is text at the top level
                i += 1
            else:
                break
        return items, i

    def round(self, i: int) -> tuple[Node, int] | None:
        key = ("(", i)
        if key not in self.memo:
            self.memo[key] = self._round(i)
        return self.memo[key]

    def _round(self, i: int) -> tuple[Node, int] | None:
        first, j = self.sequence(i + 1)
        if self.char(j) == ")":
            return ["(", first, ")"], j + 1
        if self.char(j) == ":":
            second, k = self.sequence(j + 1)
            if self.char(k) == ")":
                return ["(", first, ":", second, ")"], k + 1
        return None

    def square(self, i: int) -> tuple[Node, int] | None:
        key = ("[", i)
        if key not in self.memo:
            self.memo[key] = self._square(i)
        return self.memo[key]

    def _square(self, i: int) -> tuple[Node, int] | None:
        first, j = self.sequence(i + 1)
        after = self.char(j)
        if after == ":":  # [to:when] or [from:to:when]
            if m := _WHEN.match(self.text, j + 1):
                return ("edit", None, first, m.group(1)), m.end()
            second, k = self.sequence(j + 1)
            if self.char(k) == ":" and (m := _WHEN.match(self.text, k + 1)):
                return ("edit", first, second, m.group(1)), m.end()
        elif after == "|":
            options = [first]
            while self.char(j) == "|":
                option, j = self.sequence(j + 1)
                options.append(option)
            if self.char(j) == "]":
                return ("alt", options), j + 1
        elif after == "]":
            return ["[", first, "]"], j + 1
        return None


def parse(prompt: str) -> Node | None:
    """The schedule tree of a prompt, or ``None`` where A1111's grammar cannot read it (used as text)."""
    parser = _Parser(prompt)
    tree, end = parser.sequence(0, top=True)
    return tree if end == len(prompt) else None


def _when_step(when: str, steps: int, int_offset: int, float_offset: float) -> int:
    value = float(when)
    value = (value - float_offset) * steps if "." in when else value - int_offset
    if not math.isfinite(value):
        value = math.copysign(steps, value)
    return int(max(min(value, steps), -1.0))


def _walk(node: Node, visit: Callable[[tuple], None]) -> None:
    if isinstance(node, list):
        for child in node:
            _walk(child, visit)
    elif isinstance(node, tuple):
        visit(node)
        for child in node[1:3] if node[0] == "edit" else node[1]:
            if child is not None:
                _walk(child, visit)


def _text_at(node: Node, step: int, when: Callable[[str], int]) -> str:
    if isinstance(node, str):
        return node
    if isinstance(node, list):
        return "".join(_text_at(child, step, when) for child in node)
    if node[0] == "edit":
        _, before, after, at = node
        chosen = (before or []) if step <= when(at) else after
        return _text_at(chosen, step, when)
    options = node[1]
    return _text_at(options[(step - 1) % len(options)], step, when)


def prompt_schedule(prompt: str, steps: int, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """``[(end_at_step, text), ...]`` of one prompt over ``steps`` (the first pass) or, given ``hires_steps``,
    over the hires pass that follows ``steps`` first-pass steps."""
    int_offset, float_offset = (0, 0.0) if hires_steps is None else (steps, 1.0)
    total = steps if hires_steps is None else hires_steps
    tree = parse(prompt)
    if tree is None:
        return [(total, prompt)]

    def when(at: str) -> int:
        return _when_step(at, total, int_offset, float_offset)

    ends = {total}

    def collect(node: tuple) -> None:
        if node[0] == "edit":
            if (step := when(node[3])) >= 1:
                ends.add(step)
        else:
            ends.update(range(1, total + 1))

    _walk(tree, collect)
    return [(end, _text_at(tree, end, when)) for end in sorted(ends)]


def active_index(ends: Sequence[int], call: int) -> int:
    """Index of the schedule entry for the denoiser's ``call`` (0-based), A1111's rule: the first entry
    with ``call <= end_at_step``, else the first entry."""
    for index, end in enumerate(ends):
        if call <= end:
            return index
    return 0


def split_and(prompt: str) -> list[tuple[str, float]]:
    """A1111's composable prompt: ``(subprompt, weight)`` for each ``AND``-separated part; a trailing
    ``:number`` is the part's weight (1 without one)."""
    parts = []
    for part in _AND.split(prompt):
        m = _SUBPROMPT_WEIGHT.search(part)
        text, weight = (m.group(1), m.group(2)) if m else (part, None)
        parts.append((text, float(weight) if weight is not None else 1.0))
    return parts


def schedule_steps(sampler: str, steps: int) -> int:
    """The step count prompt schedules run over: A1111 doubles it for samplers that call the model twice
    per step (the denoiser counts calls)."""
    return steps * 2 if sampler in SECOND_ORDER_SAMPLERS else steps


def is_plain(prompt: str) -> bool:
    """Whether the prompt has no editing or alternation (one schedule entry at any step count)."""
    tree = parse(prompt)
    if tree is None:
        return True
    found: list[tuple] = []
    _walk(tree, found.append)
    return not found


_LOOKS_LIKE_EDITING = re.compile(r"(?<!\\)\[[^\[\]]*(?::\s*[\d.]+\s*|\|[^\[\]]*)\]?")


def unreadable_groups(prompt: str) -> list[str]:
    """``[...]`` groups that look like editing or alternation but are used as text (A1111 does the same): an
    unclosed one, one the grammar does not take (``[a:b:c:3]``), or any in a prompt it cannot read at all."""
    candidates = set(_LOOKS_LIKE_EDITING.findall(prompt))
    if parse(prompt) is None:
        return sorted(candidates)
    return sorted(group for group in candidates if is_plain(group))


class ConditioningSchedule:
    """Per denoiser call: the positive parts ``[(conditioning, weight), ...]`` and the negative one.

    ``positive`` is ``[(ends, items, weight)]`` per ``AND`` part and ``negative`` ``(ends, items)``, where
    ``ends`` are a schedule's end steps and ``items`` what was encoded for each entry. ``finish(parts,
    negative)`` turns one call's selection into what the network takes (equal lengths, image-size extras);
    it runs once per distinct selection, so a switch costs one padding, not one encoding.
    """

    def __init__(
        self,
        positive: Sequence[tuple[Sequence[int], Sequence[Any], float]],
        negative: tuple[Sequence[int], Sequence[Any]],
        finish: Callable[[list[Any], Any], tuple[list[Any], Any]],
    ) -> None:
        self.positive = [(tuple(ends), list(items), float(weight)) for ends, items, weight in positive]
        self.negative = (tuple(negative[0]), list(negative[1]))
        self.weights = tuple(weight for _, _, weight in self.positive)
        self.finish = finish
        self._done: dict[tuple[int, ...], tuple[list[Any], Any]] = {}

    def key(self, call: int) -> tuple[int, ...]:
        """Which entry of every part (and, last, of the negative) conditions denoiser call ``call``."""
        return (*(active_index(ends, call) for ends, _, _ in self.positive), active_index(self.negative[0], call))

    def at(self, call: int) -> tuple[Hashable, list[tuple[Any, float]], Any]:
        """``(key, [(cond, weight), ...], uncond)`` for denoiser call ``call`` (0-based)."""
        key = self.key(call)
        if key not in self._done:
            conds = [items[i] for (_, items, _), i in zip(self.positive, key)]
            self._done[key] = self.finish(conds, self.negative[1][key[-1]])
        conds, uncond = self._done[key]
        return key, list(zip(conds, self.weights)), uncond
