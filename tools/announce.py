"""`make run`'s greeting: wait until the server answers, then print its address, the key in use, a
curl line to paste and the docs page's address. It leaves quietly if the server stops first.

Usage: HOST=... PORT=... API_KEY=... python tools/announce.py SERVER_PID   (make run does this)
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
import urllib.request

WAIT_SECONDS = 300  # the server answers /health within seconds; this only bounds a stuck start


def address(host: str, port: str) -> str:
    """Where a client on this machine reaches the server (a wildcard host is not an address)."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def greeting(url: str, key: str) -> str:
    body = json.dumps({"prompt": "The capital of France is", "max_new_tokens": 8})
    curl = (
        f"curl -s {url}/generate -H {shlex.quote('x-api-key: ' + key)} "
        f"-H 'content-type: application/json' -d {shlex.quote(body)}"
    )
    return "\n".join(
        [
            f"==> the server answers at {url}",
            f"    API key: {key}",
            f"    in a browser: {url}/docs  (the API, and a form to try it)",
            "    from a shell (the first request also loads the model, a few seconds):",
            f"      {curl}",
        ]
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_for(url: str, server_pid: int) -> bool:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline and alive(server_pid):
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def main() -> None:
    url = address(os.environ.get("HOST", "127.0.0.1"), os.environ.get("PORT", "8000"))
    keys = [k.strip() for k in os.environ.get("API_KEY", "").split(",") if k.strip()]
    if keys and wait_for(url, int(sys.argv[1])):
        print(greeting(url, keys[0]), flush=True)


if __name__ == "__main__":
    main()
