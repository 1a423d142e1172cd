"""Prompt enhancement with a local LLM: an Ollama-compatible endpoint rewrites a short prompt into a detailed one.

Optional and off by default. Front ends call ``enhance_request`` before queueing (the TUI in a worker thread,
never on the UI thread: a model can take seconds to answer); the queued request holds the enhanced prompt and
records the original in ``extra`` (``original_prompt``, ``prompt_enhancer``), so the image's metadata keeps
both. Any failure (endpoint down, timeout, an answer that is not Ollama's JSON, an empty answer) is one
``EnhanceError`` sentence, and ``enhance_request`` then returns the request unchanged with that message: the
job runs with the prompt as written.

API: ``POST <url>/api/generate`` with ``{"model", "prompt", "system", "stream": false}``; the answer's
``response`` string is the new prompt (Ollama's non-streaming generate call). Stdlib ``urllib`` only.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.errors import DarkroomError

if TYPE_CHECKING:
    from core.request import GenerationRequest

DEFAULT_URL = "http://127.0.0.1:11434"  # Ollama's default address
DEFAULT_MODEL = "llama3.2"
DEFAULT_TIMEOUT = 60.0  # seconds: a cold model loads before it answers
MAX_PROMPT_CHARS = 2000  # an answer longer than this is cut at the last comma before it

SYSTEM = (
    "You rewrite short image prompts for a text-to-image diffusion model. Keep the subject and every detail "
    "the user gave, and add concrete visual details: setting, lighting, composition, style, medium. Answer "
    "with the rewritten prompt only, one line of comma-separated phrases, no quotes, no explanations."
)


class EnhanceError(DarkroomError):
    """The prompt enhancer could not give a prompt; the message says why and where."""


@dataclass(frozen=True)
class EnhanceSettings:
    """Where the enhancer is: an Ollama-compatible base URL and a model name it serves."""

    url: str = DEFAULT_URL
    model: str = DEFAULT_MODEL
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def from_env(cls, url: str | None = None, model: str | None = None) -> EnhanceSettings:
        """Given values, else ``$DARKROOM_ENHANCE_URL`` / ``$DARKROOM_ENHANCE_MODEL``, else the defaults."""
        return cls(
            url=url or os.environ.get("DARKROOM_ENHANCE_URL") or DEFAULT_URL,
            model=model or os.environ.get("DARKROOM_ENHANCE_MODEL") or DEFAULT_MODEL,
        )

    @property
    def endpoint(self) -> str:
        return self.url.rstrip("/") + "/api/generate"


def enhance_prompt(prompt: str, settings: EnhanceSettings) -> str:
    """The detailed prompt the model writes for ``prompt``; ``EnhanceError`` when there is none."""
    if not settings.url.startswith(("http://", "https://")):
        raise EnhanceError(f"prompt enhancer URL {settings.url!r} is not an http:// or https:// address")
    body = json.dumps({"model": settings.model, "prompt": prompt, "system": SYSTEM, "stream": False}).encode()
    where = f"prompt enhancer at {settings.url} (model {settings.model!r})"
    http = urllib.request.Request(settings.endpoint, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(http, timeout=settings.timeout) as response:  # noqa: S310 - checked above
            raw = response.read(1 << 20)
    except urllib.error.HTTPError as exc:
        detail = _error_text(exc)
        raise EnhanceError(f"{where} answered HTTP {exc.code}{': ' + detail if detail else ''}") from None
    except TimeoutError:
        raise EnhanceError(f"{where} did not answer within {settings.timeout:g} s") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError):
            raise EnhanceError(f"{where} did not answer within {settings.timeout:g} s") from None
        raise EnhanceError(f"{where} cannot be reached ({reason}); is Ollama running?") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EnhanceError(f"{where} did not answer with JSON (is the URL an Ollama-compatible API?)") from None
    text = data.get("response") if isinstance(data, dict) else None
    if not isinstance(text, str):
        raise EnhanceError(f"{where} answered JSON without a 'response' text")
    text = _clean(text)
    if not text:
        raise EnhanceError(f"{where} answered an empty prompt")
    return text


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        data = json.loads(exc.read(4096).decode("utf-8", "replace"))
    except (ValueError, OSError):
        return ""
    error = data.get("error") if isinstance(data, dict) else None
    return str(error)[:200] if error else ""


def _clean(text: str) -> str:
    """One line, no wrapping quotes, no control characters, at most ``MAX_PROMPT_CHARS``."""
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    if len(text) > MAX_PROMPT_CHARS:
        cut = text.rfind(",", 0, MAX_PROMPT_CHARS)
        text = text[: cut if cut > 0 else MAX_PROMPT_CHARS].rstrip()
    return text


def enhance_request(request: GenerationRequest, settings: EnhanceSettings) -> tuple[GenerationRequest, str | None]:
    """``(request with the enhanced prompt, None)``, or ``(request, message)`` when enhancement failed.

    LoRA tags are not the enhancer's to rewrite: they are kept out of what it sees and appended again."""
    from core.lora.tags import TAG

    tags = [m.group(0) for m in TAG.finditer(request.prompt)]
    text = TAG.sub("", request.prompt).strip()
    if not text:
        return request, None
    try:
        enhanced = enhance_prompt(text, settings)
    except EnhanceError as exc:
        return request, f"{exc}; the job runs with its prompt as written"
    from core.errors import RequestError

    prompt = " ".join([enhanced, *tags])
    extra = {**request.extra, "original_prompt": request.prompt, "prompt_enhancer": settings.model}
    try:
        return request.replace(prompt=prompt, extra=extra), None
    except RequestError as exc:  # e.g. text the queue cannot hold
        return request, f"prompt enhancer gave an unusable prompt ({exc}); the job runs with its prompt as written"
