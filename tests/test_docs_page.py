"""The docs page in a real browser: headless Chromium (Debian's `chromium`) driven over its
DevTools protocol, against the real server process. The page must list what the document says,
generate and chat from its form, show errors with their detail (or OpenAI's message, under /v1/),
and run under its CSP without a violation, a console error, or a request to anywhere but this server."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx
import pytest
import uvicorn
import websocket
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import server as service
from tests.conftest import KEY, Server, free_port, run_server

pytestmark = pytest.mark.e2e

# Records CSP violations the way the page itself would see them (DevTools' scripts are exempt from CSP).
RECORD_VIOLATIONS = """
window.cspViolations = [];
document.addEventListener("securitypolicyviolation",
                          (e) => cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`));
"""


class Browser:
    """Headless Chromium with one page, driven over the DevTools protocol: commands by id, the events
    in between kept in `events`."""

    def __init__(self, profile: Path):
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if exe is None:
            pytest.fail("chromium is not installed: apt-get install chromium (make test installs it when root)")
        args = [exe, "--headless=new", "--remote-debugging-port=0", f"--user-data-dir={profile}", "--no-first-run",
                "--disable-gpu", "--disable-dev-shm-usage", "--disable-extensions", "--disable-sync",
                "--disable-background-networking", "--disable-component-update", "--window-size=1000,1000"]  # fmt: skip
        if os.geteuid() == 0:
            args.append("--no-sandbox")  # Chromium's sandbox refuses to run as root (CI runs as root)
        self.process = subprocess.Popen([*args, "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port = self._wait_for_port(profile / "DevToolsActivePort")
        target = next(t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page")
        self.socket = websocket.create_connection(target["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.events: list[dict[str, Any]] = []
        self.next_id = 0
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call("Page.addScriptToEvaluateOnNewDocument", source=RECORD_VIOLATIONS)

    def _wait_for_port(self, port_file: Path, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port_file.exists() and port_file.read_text().strip():
                return int(port_file.read_text().split()[0])
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.process.returncode}")
            time.sleep(0.05)
        raise RuntimeError("chromium did not open its DevTools port")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))
            self.events.append(message)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"still false after {timeout} s: {expression}; problems: {self.problems()}")

    def type_into(self, element_id: str, text: str) -> None:
        """Focus a field, empty it, and type as a keyboard would (insertText fires input events)."""
        self.evaluate(f"(e => {{ e.focus(); e.value = ''; }})(document.getElementById({element_id!r}))")
        if text:
            self.call("Input.insertText", text=text)

    def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            key = {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "text": "\r"}
            self.call("Input.dispatchKeyEvent", type=kind, **key)

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions and CSP violations since the page was opened. Chromium
        also logs each non-2xx fetch as a network error: the 401 and 422 the tests ask for, so
        entries from the network source are left out here (the text on the page is checked instead)."""
        found = [f"CSP: {v}" for v in self.evaluate("window.cspViolations || []")]
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(f"exception: {params['exceptionDetails']}")
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "warning", "assert"):
                found.append(f"console.{params['type']}: {params['args']}")
            elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
                entry = params["entry"]
                found += [f"log: {entry['text']}"] if entry["source"] != "network" else []
        return found

    def requested_urls(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def sent_bodies(self, url: str) -> list[Any]:
        """The JSON bodies the page posted to `url`, as the browser sent them."""
        requests = [e["params"]["request"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]
        return [json.loads(r["postData"]) for r in requests if r["url"] == url]

    def open(self, url: str) -> None:
        self.events.clear()
        self.call("Page.navigate", url=url)
        self.wait_for("document.getElementById('field-max_new_tokens') !== null", timeout=20)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The offline SmolLM2: it has a chat template and answers, so the chat form gets a real answer."""
    with run_server(tmp_path_factory.mktemp("docs"), MODEL_NAME=str(smollm2_dir)) as s:
        yield s


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    b = Browser(tmp_path_factory.mktemp("chromium"))
    try:
        yield b
    finally:
        b.close()


def text_of(browser: Browser, element_id: str) -> str:
    return str(browser.evaluate(f"document.getElementById({element_id!r}).innerText"))


def wait_until_done(browser: Browser) -> None:
    """Until the page shows an answer or an error; an error fails with the page's own words."""
    browser.wait_for(
        "document.getElementById('status').innerText.startsWith('Done') || !document.getElementById('error').hidden"
    )
    assert browser.evaluate("document.getElementById('error').hidden"), text_of(browser, "error")


def fill_and_send(browser: Browser, key: str, prompt: str, prefix: str = "field-", **fields: str) -> None:
    """Fill the form and press Enter; `prefix` picks the target's fields (chat's: "chat-field-")."""
    browser.type_into("key", key)
    browser.type_into("prompt", prompt)
    for name, value in fields.items():
        browser.type_into(prefix + name, value)
    browser.type_into("key", key)  # back to the key field, where Enter submits the form
    browser.press_enter()


def test_page_shows_every_route_field_status_and_setting(server: Server, browser: Browser) -> None:
    browser.open(server.url + "/docs")
    page = text_of(browser, "operations") + text_of(browser, "routes")
    spec = httpx.get(server.url + "/openapi.json").json()
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            assert f"{method.upper()} {path}" in page
            assert operation["summary"] in page
            for status, response in operation["responses"].items():
                assert f"{status}\t{response['description']}" in page
    generate = spec["paths"]["/generate"]["post"]
    assert generate["description"] in page
    for name, value in generate["x-settings"].items():
        assert f"{name}\t{value}" in page
    request = spec["components"]["schemas"]["GenerateRequest"]
    for name in request["properties"]:
        assert f"\n{name}\t" in page
    limit = request["properties"]["max_new_tokens"]
    assert f"max_new_tokens\tinteger\t{limit['default']}\t1 to {limit['maximum']}" in page
    assert "seed\tinteger\tnone\t0 to 9223372036854775807" in page  # exact, beyond JavaScript's 2^53
    assert browser.problems() == []


def choose_chat(browser: Browser, stream: bool) -> None:
    browser.evaluate("document.getElementById('target-chat').click()")
    if browser.evaluate("document.getElementById('chat-field-stream').checked") != stream:
        browser.evaluate("document.getElementById('chat-field-stream').click()")


def offered(schema: dict[str, Any]) -> list[str]:
    """The fields the form has an input for: not the required one (the prompt box), not objects."""
    kinds = {name: p.get("type", []) for name, p in schema["properties"].items()}
    return [name for name, kind in kinds.items() if name not in schema["required"] and "object" not in kind]


def test_every_form_control_has_a_label(server: Server, browser: Browser) -> None:
    browser.open(server.url + "/docs")
    schemas = httpx.get(server.url + "/openapi.json").json()["components"]["schemas"]
    ids = [f"field-{name}" for name in offered(schemas["GenerateRequest"])]
    ids += [f"chat-field-{name}" for name in offered(schemas["ChatCompletionRequest"])]
    assert "chat-field-max_tokens" in ids and "chat-field-messages" not in ids
    assert browser.evaluate(f"{json.dumps(ids)}.every(id => document.getElementById(id))")
    controls = "[...document.querySelectorAll('input, textarea')]"
    # the two targets, the key, the system message and the prompt, and one per field of each target
    assert browser.evaluate(f"{controls}.length") == 5 + len(ids)
    unlabelled = browser.evaluate(f"{controls}.filter(e => !e.labels.length).map(e => e.id)")
    assert unlabelled == []
    assert browser.evaluate(f"{controls}.every(e => e.tabIndex === 0)")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_the_form_generates_and_shows_the_answer(server: Server, browser: Browser, stream: bool) -> None:
    browser.open(server.url + "/docs")
    has_stream = browser.evaluate("document.getElementById('field-stream') !== null")
    if stream and not has_stream:
        pytest.skip("this server's GenerateRequest has no stream field yet")
    if has_stream and browser.evaluate("document.getElementById('field-stream').checked") != stream:
        browser.evaluate("document.getElementById('field-stream').click()")
    fill_and_send(browser, KEY, "Hello, world", max_new_tokens="6")
    wait_until_done(browser)
    expected = httpx.post(
        server.url + "/generate", json={"prompt": "Hello, world", "max_new_tokens": 6}, headers={"x-api-key": KEY}
    ).json()
    assert text_of(browser, "answer") == expected["generated_text"]
    assert text_of(browser, "status") == (
        f'Done: {expected["generated_tokens"]} tokens, finish_reason "{expected["finish_reason"]}".'
    )
    assert browser.evaluate("document.getElementById('error').hidden") is True
    assert browser.problems() == []
    assert all(url.startswith(server.url) or url.startswith("data:") for url in browser.requested_urls())


def test_the_page_lists_the_openai_routes_and_the_chat_fields(server: Server, browser: Browser) -> None:
    browser.open(server.url + "/docs")
    spec = httpx.get(server.url + "/openapi.json").json()
    routes, page = text_of(browser, "routes"), text_of(browser, "operations")
    for method, path in (("get", "/v1/models"), ("post", "/v1/completions"), ("post", "/v1/chat/completions")):
        summary = spec["paths"][path][method]["summary"]
        assert f"{method.upper()}\t{path}\tx-api-key or Authorization: Bearer\t{summary}" in routes
    assert "POST\t/generate\tx-api-key\t" in routes and "GET\t/health\tnone\t" in routes
    chat = page[page.index("POST /v1/chat/completions") :]
    request = spec["components"]["schemas"]["ChatCompletionRequest"]
    for name in request["properties"]:
        assert f"\n{name}\t" in chat
    assert request["description"] in chat
    limit = request["properties"]["max_tokens"]
    assert f"max_tokens\tinteger\t{limit['default']}\t1 to {limit['maximum']}\t" in chat
    assert "messages\tlist of object (role, content)\trequired\tat least 1 item" in chat
    assert "usage\tobject (prompt_tokens, completion_tokens, total_tokens, prompt_tokens_details)" in chat
    stream = spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]["text/event-stream"]
    assert f"data\tstring\t{stream['schema']['properties']['data']['description']}" in chat  # how a stream reads
    assert 'event\tone of "token", "done", "error"' in page  # and /generate's
    assert browser.evaluate("[...document.querySelectorAll('nav a')].every(a => document.querySelector(a.hash))")
    assert browser.problems() == []


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_the_chat_form_answers_with_the_usage(server: Server, browser: Browser, stream: bool) -> None:
    browser.open(server.url + "/docs")
    choose_chat(browser, stream)
    browser.type_into("system", "Answer in one sentence.")
    fill_and_send(browser, KEY, "What is the capital of France?", prefix="chat-field-", max_tokens="12")
    wait_until_done(browser)
    messages = [{"role": "system", "content": "Answer in one sentence."},
                {"role": "user", "content": "What is the capital of France?"}]  # fmt: skip
    streamed = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    url = server.url + "/v1/chat/completions"
    assert browser.sent_bodies(url) == [{"messages": messages, "max_tokens": 12, **streamed}]
    expected = httpx.post(url, json={"messages": messages, "max_tokens": 12}, headers={"x-api-key": KEY}).json()
    choice, usage = expected["choices"][0], expected["usage"]
    assert text_of(browser, "answer") == choice["message"]["content"]
    assert "Paris" in choice["message"]["content"]  # the prompt went in as the user's message
    assert text_of(browser, "status") == (
        f'Done: finish_reason "{choice["finish_reason"]}"; usage: prompt_tokens {usage["prompt_tokens"]}, '
        f"completion_tokens {usage['completion_tokens']}, total_tokens {usage['total_tokens']}."
    )
    assert browser.problems() == []
    assert all(url.startswith(server.url) or url.startswith("data:") for url in browser.requested_urls())


def test_chat_errors_show_openais_message(server: Server, browser: Browser) -> None:
    browser.open(server.url + "/docs")
    choose_chat(browser, stream=False)
    fill_and_send(browser, "not-the-key", "Hello", prefix="chat-field-")
    browser.wait_for("!document.getElementById('error').hidden")
    assert text_of(browser, "error") == "Error 401: invalid API key"
    fill_and_send(browser, "", "Hello", prefix="chat-field-")  # /v1/'s own words: Bearer is taken too
    browser.wait_for("document.getElementById('error').innerText.includes('missing')")
    assert text_of(browser, "error") == "Error 401: missing x-api-key or Authorization: Bearer header"
    fill_and_send(browser, KEY, "Hello", prefix="chat-field-", max_tokens="9999")
    browser.wait_for("document.getElementById('error').innerText.includes('400')")
    assert text_of(browser, "error") == "Error 400: max_tokens must be an integer from 1 to 200, got 9999"
    assert browser.problems() == []


def test_a_wrong_key_shows_the_401_detail(server: Server, browser: Browser) -> None:
    browser.open(server.url + "/docs")
    fill_and_send(browser, "not-the-key", "Hello")
    browser.wait_for("!document.getElementById('error').hidden")
    assert text_of(browser, "error") == "Error 401: invalid API key"
    assert browser.problems() == []


def test_a_value_out_of_range_shows_the_422_detail(server: Server, browser: Browser) -> None:
    browser.open(server.url + "/docs")
    fill_and_send(browser, KEY, "Hello", max_new_tokens="9999", stop='["\\n", "."]')
    browser.wait_for("!document.getElementById('error').hidden")
    assert text_of(browser, "error") == "Error 422: max_new_tokens must be an integer from 1 to 200, got 9999"


def test_a_missing_key_and_the_largest_seed(server: Server, browser: Browser) -> None:
    browser.open(server.url + "/docs")
    fill_and_send(browser, "", "Hello")
    browser.wait_for("!document.getElementById('error').hidden")
    assert text_of(browser, "error") == "Error 401: missing x-api-key header"
    # 2^63-1 is beyond JavaScript's exact integers: rounded, it would be 2^63 and refused with a 422.
    fill_and_send(browser, KEY, "Hello", max_new_tokens="2", seed=str(2**63 - 1), temperature="1")
    wait_until_done(browser)


def test_the_csp_blocks_injected_code_and_violations_are_seen(server: Server, browser: Browser) -> None:
    """The checks above find no violation; this one shows they would see one, and that the policy
    the server sends really stops an inline script the page did not ship."""
    browser.open(server.url + "/docs")
    browser.evaluate("(s => { s.textContent = 'window.injected = true'; document.head.append(s); })"
                     "(document.createElement('script'))")  # fmt: skip
    browser.wait_for("window.cspViolations.length > 0")
    assert browser.evaluate("window.injected === undefined")
    assert any(problem.startswith("CSP: script-src") for problem in browser.problems())


class StreamingStandIn:
    """Serves the real page, CSP and document, plus the `stream` field and a /generate that answers
    in server-sent events the way the streaming design says, and a /v1/chat/completions that streams
    OpenAI's chunks, both paced by the test: the page shows what arrived before the end."""

    def __init__(self) -> None:
        self.release = threading.Event()  # set by the test: send the rest of the stream
        self.requests: list[tuple[str | None, object]] = []
        page, spec = service.DocsPage.load(), service.openapi(service.Settings.from_env({"API_KEY": KEY}))
        spec["components"]["schemas"]["GenerateRequest"]["properties"]["stream"] = {"type": "boolean", "default": False}

        async def docs(request: Request) -> Response:
            return Response(page.html, media_type="text/html", headers=page.headers)

        async def openapi(request: Request) -> Response:
            return JSONResponse(spec)

        async def generate(request: Request) -> Response:
            body = await request.json()
            self.requests.append((request.headers.get("x-api-key"), body))
            if not body.get("stream"):
                return JSONResponse(self.answer(body["prompt"]))
            return StreamingResponse(self.events(body["prompt"]), media_type="text/event-stream")

        async def chat(request: Request) -> Response:
            body = await request.json()
            self.requests.append((request.headers.get("x-api-key"), body))
            return StreamingResponse(self.chunks(body["messages"][-1]["content"]), media_type="text/event-stream")

        routes = [Route("/docs", docs), Route("/openapi.json", openapi), Route("/generate", generate, methods=["POST"]),
                  Route("/v1/chat/completions", chat, methods=["POST"])]  # fmt: skip
        self.app = Starlette(routes=routes)

    async def events(self, prompt: str) -> AsyncIterator[str]:
        yield ": waiting\n\n"
        token = 'event: token\ndata: {"token_ids": [1], "text": " upon", "generated_tokens": 1}\n\n'
        yield token[:20]  # an event split across two chunks
        await anyio.sleep(0.05)
        yield token[20:] + 'event: token\ndata: {"token_ids": [2], "text": " a", "generated_tokens": 2}\n\n'
        await anyio.to_thread.run_sync(self.release.wait, 30)
        if prompt == "fail":
            yield 'event: error\ndata: {"detail": "the engine stopped"}\n\n'
            return
        yield 'event: token\ndata: {"token_ids": [3], "text": " time", "generated_tokens": 3}\n\n'
        yield f"event: done\ndata: {json.dumps(self.answer(prompt))}\n\n"

    async def chunks(self, content: str) -> AsyncIterator[str]:
        def chunk(delta: dict[str, str], reason: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            return f"data: {json.dumps({'object': 'chat.completion.chunk', 'choices': [choice]})}\n\n"

        yield ": waiting\n\n"
        first = chunk({"role": "assistant", "content": "The"})
        yield first[:30]  # a chunk split across two reads
        await anyio.sleep(0.05)
        yield first[30:] + chunk({"content": " capital"})
        await anyio.to_thread.run_sync(self.release.wait, 30)
        if content == "fail":
            error = {"message": "the engine stopped", "type": "server_error", "param": None, "code": None}
            yield f"data: {json.dumps({'error': error})}\n\n"
            return
        yield chunk({"content": " is Paris."}) + chunk({}, "stop")
        usage = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
        yield f"data: {json.dumps({'object': 'chat.completion.chunk', 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    @staticmethod
    def answer(prompt: str) -> dict[str, object]:
        return {"generated_text": prompt + " upon a time", "generated_tokens": 3, "finish_reason": "length"}


@pytest.fixture
def stand_in() -> Iterator[tuple[str, StreamingStandIn]]:
    app, port = StreamingStandIn(), free_port()
    runner = uvicorn.Server(uvicorn.Config(app.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    while not runner.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        app.release.set()
        runner.should_exit = True
        thread.join(timeout=10)


def test_a_streamed_answer_shows_as_it_arrives(stand_in: tuple[str, StreamingStandIn], browser: Browser) -> None:
    url, app = stand_in
    browser.open(url + "/docs")
    assert browser.evaluate("document.getElementById('field-stream').checked") is True  # on by default
    fill_and_send(browser, KEY, "Once")
    browser.wait_for("document.getElementById('answer').innerText === 'Once upon a'")  # before the end
    assert text_of(browser, "status") == "Generating… 2 tokens so far."
    app.release.set()
    wait_until_done(browser)
    assert text_of(browser, "answer") == "Once upon a time"
    assert text_of(browser, "status") == 'Done: 3 tokens, finish_reason "length".'
    assert app.requests == [(KEY, {"prompt": "Once", "stream": True})]
    assert browser.problems() == []


def test_an_error_event_shows_its_detail(stand_in: tuple[str, StreamingStandIn], browser: Browser) -> None:
    url, app = stand_in
    browser.open(url + "/docs")
    fill_and_send(browser, KEY, "fail")
    browser.wait_for("document.getElementById('answer').innerText === 'fail upon a'")
    app.release.set()
    browser.wait_for("!document.getElementById('error').hidden")
    assert text_of(browser, "error") == "Error: the engine stopped"
    assert text_of(browser, "answer") == "fail upon a"  # what arrived stays readable
    assert browser.problems() == []


def test_unticking_stream_asks_for_one_json_answer(stand_in: tuple[str, StreamingStandIn], browser: Browser) -> None:
    url, app = stand_in
    browser.open(url + "/docs")
    browser.evaluate("document.getElementById('field-stream').click()")
    fill_and_send(browser, KEY, "Once")
    wait_until_done(browser)
    assert text_of(browser, "answer") == "Once upon a time"
    assert app.requests == [(KEY, {"prompt": "Once"})]  # stream left at its default, false


def test_a_streamed_chat_shows_as_it_arrives(stand_in: tuple[str, StreamingStandIn], browser: Browser) -> None:
    url, app = stand_in
    browser.open(url + "/docs")
    browser.evaluate("document.getElementById('target-chat').click()")
    assert browser.evaluate("document.getElementById('chat-field-stream').checked") is True  # on by default
    fill_and_send(browser, KEY, "Capital of France?", prefix="chat-field-")
    browser.wait_for("document.getElementById('answer').innerText === 'The capital'")  # before the end
    assert text_of(browser, "status") == "Generating…"
    app.release.set()
    wait_until_done(browser)
    assert text_of(browser, "answer") == "The capital is Paris."
    assert text_of(browser, "status") == (
        'Done: finish_reason "stop"; usage: prompt_tokens 9, completion_tokens 4, total_tokens 13.'
    )
    sent = {"messages": [{"role": "user", "content": "Capital of France?"}], "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    assert app.requests == [(KEY, sent)]  # no system message: its box was left empty
    assert browser.problems() == []


def test_a_chat_error_chunk_shows_its_message(stand_in: tuple[str, StreamingStandIn], browser: Browser) -> None:
    url, app = stand_in
    browser.open(url + "/docs")
    browser.evaluate("document.getElementById('target-chat').click()")
    fill_and_send(browser, KEY, "fail", prefix="chat-field-")
    browser.wait_for("document.getElementById('answer').innerText === 'The capital'")
    app.release.set()
    browser.wait_for("!document.getElementById('error').hidden")
    assert text_of(browser, "error") == "Error: the engine stopped"
    assert text_of(browser, "answer") == "The capital"  # what arrived stays readable
    assert browser.problems() == []


@pytest.mark.skipif(not os.environ.get("DOCS_SCREENSHOT"), reason="set DOCS_SCREENSHOT=path to refresh the image")
def test_screenshot_for_the_readme(smollm2_dir: Path, tmp_path: Path) -> None:
    """`make screenshot`: the page's chat answering with the offline SmolLM2, saved for the README."""
    browser = Browser(tmp_path / "chromium")
    try:
        with run_server(tmp_path, MODEL_NAME=str(smollm2_dir)) as real:
            browser.open(real.url + "/docs")
            choose_chat(browser, stream=True)
            fill_and_send(browser, KEY, "What is the capital of France?", prefix="chat-field-", max_tokens="12")
            wait_until_done(browser)
            size = {"width": 1000, "height": 1400, "deviceScaleFactor": 1, "mobile": False}
            browser.call("Emulation.setDeviceMetricsOverride", **size)
            browser.evaluate("document.activeElement.blur(); document.getElementById('try-title').scrollIntoView()")
            browser.screenshot(Path(os.environ["DOCS_SCREENSHOT"]))
    finally:
        browser.close()
