"""/docs content negotiation (unit): browsers get the page under a strict CSP, every other client
gets the OpenAPI JSON exactly as before, and /openapi.json always gets the JSON."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.testclient import TestClient

import server

SETTINGS = server.Settings.from_env({"API_KEY": "k"})
CHROME = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
FIREFOX = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(server.create_app(SETTINGS))


@pytest.mark.parametrize("accept", [CHROME, FIREFOX, "text/html", "application/json;q=0.5, text/html"])
def test_a_browser_gets_the_page_under_a_strict_csp(client: TestClient, accept: str) -> None:
    response = client.get("/docs", headers={"accept": accept})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.content == server.DOCS_PAGE.read_bytes()
    csp = dict(d.strip().split(" ", 1) for d in response.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'none'"
    assert csp["connect-src"] == "'self'"
    assert (csp["base-uri"], csp["form-action"], csp["frame-ancestors"]) == ("'none'",) * 3
    for directive in ("script-src", "style-src"):  # only the page's own blocks, by hash
        assert all(source.startswith("'sha256-") for source in csp[directive].split()), csp[directive]
    assert "unsafe" not in response.headers["content-security-policy"]
    assert response.headers["vary"] == "Accept"


@pytest.mark.parametrize(
    "accept",
    [None, "*/*", "application/json", "text/html, application/json", "text/html;q=0.5, */*", "text/*", "text/plain"],
)
def test_every_other_client_gets_the_json_as_before(client: TestClient, accept: str | None) -> None:
    headers = {"accept": accept} if accept is not None else {}
    request = client.build_request("GET", "/docs", headers=headers)
    if accept is None:
        del request.headers["accept"]  # httpx adds */* by default; this is the client that sends none
    response = client.send(request)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == server.openapi(SETTINGS)
    assert response.headers["vary"] == "Accept"


@pytest.mark.parametrize("accept", [CHROME, "*/*", "application/json"])
def test_openapi_json_is_the_same_document_whatever_the_accept(client: TestClient, accept: str) -> None:
    response = client.get("/openapi.json", headers={"accept": accept})
    assert response.headers["content-type"] == "application/json"
    assert response.json() == client.get("/docs").json() == server.openapi(SETTINGS)


def test_the_document_lists_both_addresses_and_the_settings() -> None:
    spec = server.openapi(SETTINGS)
    routes = {route.path for route in server.create_app(SETTINGS).routes}  # type: ignore[attr-defined]
    assert (
        set(spec["paths"])
        == routes
        == {
            "/health",
            "/ready",
            "/generate",
            "/docs",
            "/openapi.json",
            "/metrics",
            "/v1/models",
            "/v1/completions",
            "/v1/chat/completions",
        }
    )
    assert "text/html" in spec["paths"]["/docs"]["get"]["responses"]["200"]["content"]
    assert spec["paths"]["/generate"]["post"]["x-settings"]["MAX_NEW_TOKENS_LIMIT"] == SETTINGS.limits.max_new_tokens


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        (CHROME, True),
        ("TEXT/HTML", True),
        ("text/html;q=0.9, application/json;q=0.8", True),
        ("text/html;q=0, */*", False),  # q=0 means "not acceptable"
        ("text/html;q=abc, */*", False),  # an unreadable weight counts for nothing
        ("application/*, text/html", False),
        ("", False),
    ],
)
def test_prefers_html(accept: str, html: bool) -> None:
    assert server.prefers_html(accept) is html


def test_the_csp_hashes_are_the_pages_own_blocks(tmp_path: Path) -> None:
    page = tmp_path / "page.html"
    blocks = ["<!-- a <script> named in a comment -->", "<style>p{}</style>", "<script>go()</script>", "<p>x</p>"]
    page.write_text("\n".join([*blocks, "<script>more()</script>"]))
    csp = server.DocsPage.load(page).headers["Content-Security-Policy"]
    # Each is `printf %s 'go()' | openssl dgst -sha256 -binary | base64`, and so on.
    go, more = "5KYv+PUboo5h+0+YAtGRPbwv5d/QxzHslP4YGnUaxRw=", "tQCBHdhZF+YZA1SfmY9EcKxkOEB4SQok5ogPYW6m+QI="
    assert f"script-src 'sha256-{go}' 'sha256-{more}';" in csp
    assert "style-src 'sha256-gG2yISYereRMiG2lMXrbiUgi0Ubw9p7QCeWcroOvy9Y=';" in csp
    page.write_text("<p>no script, no style</p>")
    csp = server.DocsPage.load(page).headers["Content-Security-Policy"]
    assert "script-src 'none'; style-src 'none';" in csp
