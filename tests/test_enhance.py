"""Prompt enhancement against a small Ollama-compatible HTTP server on 127.0.0.1 started by the test."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from core.enhance import EnhanceError, EnhanceSettings, enhance_prompt, enhance_request
from core.metadata import format_infotext
from core.request import GenerationRequest
from tests.batch_harness import RecordingRunner, batch_runner


class FakeOllama(BaseHTTPRequestHandler):
    """``POST /api/generate``: answers per ``mode`` (class attribute) and records the bodies it got."""

    mode = "ok"
    bodies: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length))
        type(self).bodies.append((self.path, body))
        if self.mode == "slow":
            time.sleep(1.0)
        if self.mode == "missing":
            self._send(404, json.dumps({"error": f"model '{body['model']}' not found"}).encode())
        elif self.mode == "html":
            self._send(200, b"<html>not an API</html>")
        else:
            answer = f'"{body["prompt"]}, golden hour light, wide shot, 35 mm film"\n'
            self._send(200, json.dumps({"model": body["model"], "response": answer, "done": True}).encode())

    def _send(self, code: int, data: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except OSError:  # the client timed out and left
            pass

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeOllama)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def ollama(server):
    FakeOllama.mode, FakeOllama.bodies = "ok", []
    return EnhanceSettings(url=server, model="tiny-llm", timeout=5.0)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_enhancer_rewrites_the_prompt(ollama):
    assert enhance_prompt("a lighthouse", ollama) == "a lighthouse, golden hour light, wide shot, 35 mm film"
    path, body = FakeOllama.bodies[0]
    assert path == "/api/generate" and body["model"] == "tiny-llm" and body["stream"] is False
    assert body["prompt"] == "a lighthouse" and "Answer with the rewritten prompt only" in body["system"]


def test_the_request_records_both_prompts_and_keeps_lora_tags(ollama):
    request = GenerationRequest(model="m", prompt="a lighthouse <lora:ink:0.7>", seed=1)
    enhanced, problem = enhance_request(request, ollama)
    assert problem is None
    assert FakeOllama.bodies[0][1]["prompt"] == "a lighthouse"  # the enhancer never sees the tag
    assert enhanced.prompt == "a lighthouse, golden hour light, wide shot, 35 mm film <lora:ink:0.7>"
    assert enhanced.extra["original_prompt"] == request.prompt and enhanced.extra["prompt_enhancer"] == "tiny-llm"
    assert enhanced.lora_refs() == request.lora_refs()
    infotext = format_infotext(enhanced, 1)
    assert infotext.startswith(enhanced.prompt + "\n")
    assert 'Original prompt: "a lighthouse <lora:ink:0.7>"' in infotext
    assert GenerationRequest.from_dict(enhanced.to_dict()) == enhanced  # the darkroom record round-trips


@pytest.mark.parametrize(("mode", "url", "message"), [
    ("ok", "closed", r"prompt enhancer at http://127\.0\.0\.1:\d+ \(model 'tiny-llm'\) cannot be reached .*is Ollama running\?"),
    ("slow", None, r"did not answer within 0\.3 s"),
    ("html", None, r"did not answer with JSON \(is the URL an Ollama-compatible API\?\)"),
    ("missing", None, r"answered HTTP 404: model 'tiny-llm' not found"),
    ("ok", "ftp://127.0.0.1/", r"URL 'ftp://127\.0\.0\.1/' is not an http:// or https:// address"),
])
def test_failures_are_one_message_and_the_job_keeps_its_prompt(ollama, mode, url, message):
    FakeOllama.mode = mode
    url = f"http://127.0.0.1:{closed_port()}" if url == "closed" else url or ollama.url
    settings = EnhanceSettings(url=url, model="tiny-llm", timeout=0.3)
    with pytest.raises(EnhanceError, match=message):
        enhance_prompt("a lighthouse", settings)
    request = GenerationRequest(model="m", prompt="a lighthouse")
    same, problem = enhance_request(request, settings)
    assert same is request and problem.endswith("; the job runs with its prompt as written")
    assert "\n" not in problem


def test_batch_enhance_flag_and_job_key(tmp_path, monkeypatch, server):
    FakeOllama.mode, FakeOllama.bodies = "ok", []
    monkeypatch.setenv("DARKROOM_ENHANCE_URL", server)
    run = batch_runner(tmp_path, monkeypatch, RecordingRunner)
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('[[job]]\nmodel = "fake"\nprompt = "a cat"\nenhance = true\nsteps = 1\n\n'
                    '[[job]]\nmodel = "fake"\nprompt = "a dog"\nsteps = 1\n')
    code, out, err = run(str(jobs))
    assert code == 0, err
    prompts = [r.prompt for r in RecordingRunner.seen]
    assert prompts == ["a cat, golden hour light, wide shot, 35 mm film", "a dog"]
    assert RecordingRunner.seen[0].extra["original_prompt"] == "a cat"
    monkeypatch.setenv("DARKROOM_ENHANCE_URL", f"http://127.0.0.1:{closed_port()}")
    jobs.write_text('[[job]]\nmodel = "fake"\nprompt = "a bird"\nsteps = 1\nenhance = true\n')
    code, out, err = run(str(jobs))
    assert code == 0 and RecordingRunner.seen[-1].prompt == "a bird"
    assert f"darkroom: warning: {jobs}: job 1: prompt enhancer at" in err and "runs with its prompt as written" in err
    jobs.write_text('[[job]]\nmodel = "fake"\nprompt = "a fish"\nenhance = "yes"\n')
    code, out, err = run(str(jobs))
    assert code == 2 and "enhance = 'yes' is invalid: true or false" in err


def test_cli_flags_reach_the_settings(monkeypatch):
    from cli.main import _enhance_settings, build_parser

    monkeypatch.delenv("DARKROOM_ENHANCE_URL", raising=False)
    monkeypatch.setenv("DARKROOM_ENHANCE_MODEL", "env-model")
    args = build_parser().parse_args(["--batch", "jobs.toml", "--enhance", "--enhance-url", "http://127.0.0.1:9"])
    assert args.enhance and _enhance_settings(args) == EnhanceSettings("http://127.0.0.1:9", "env-model")
    assert _enhance_settings(build_parser().parse_args([])).url == "http://127.0.0.1:11434"


async def test_tui_enhances_in_a_worker_and_queues_the_result(tmp_path, monkeypatch, server):
    from textual.widgets import Select, TextArea

    from tests.tui_fakes import FakeRunner, make_app, wait_for

    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))
    FakeOllama.mode, FakeOllama.bodies = "slow", []  # answers after 1 s: the UI keeps running meanwhile
    app = make_app(tmp_path, FakeRunner(gate=threading.Event()))
    async with app.run_test(size=(140, 45)) as pilot:
        app.settings.update(enhance_prompts=True, enhance_url=server, enhance_model="tiny-llm")
        screen = app.get_generate_screen()
        await wait_for(pilot, lambda: screen.query_one("#model", Select).value == "fake-model.safetensors")
        screen.query_one("#prompt", TextArea).load_text("a lighthouse")
        started = time.monotonic()
        await pilot.press("ctrl+j")
        assert time.monotonic() - started < 0.9 and not app.store.list_jobs()  # not waiting on the LLM
        await wait_for(pilot, lambda: len(app.store.list_jobs()) == 1)
        job = app.store.list_jobs()[0]
        assert job.request.prompt == "a lighthouse, golden hour light, wide shot, 35 mm film"
        assert job.request.extra["original_prompt"] == "a lighthouse"
        app.settings["enhance_url"] = f"http://127.0.0.1:{closed_port()}"
        await pilot.press("ctrl+j")
        await wait_for(pilot, lambda: len(app.store.list_jobs()) == 2)
        assert sorted(j.request.prompt for j in app.store.list_jobs())[0] == "a lighthouse"
        warnings = [n.message for n in app._notifications if n.severity == "warning"]
        assert any("cannot be reached" in w and "runs with its prompt as written" in w for w in warnings)
