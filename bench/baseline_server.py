"""The original design, kept as the benchmark's baseline: one shared model, and each request runs
its own `model.generate` in a thread of the pool (Starlette's `run_in_threadpool`, as FastAPI's).

Faithful to the original in what matters for speed: float32, no batching, threads competing for
the cores. Added only what the benchmark needs: `ignore_eos` and `generated_tokens`.

Run: API_KEY=k MODEL_NAME=DIR PORT=8001 python bench/baseline_server.py
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

_model: Any = None
_lock = threading.Lock()


def get_model() -> Any:
    global _model
    with _lock:
        if _model is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            name = os.environ.get("MODEL_NAME", "distilgpt2")
            _model = (AutoTokenizer.from_pretrained(name), AutoModelForCausalLM.from_pretrained(name))
    return _model


def run(prompt: str, max_new_tokens: int, ignore_eos: bool) -> tuple[str, int]:
    tokenizer, model = get_model()
    inputs = tokenizer(prompt, return_tensors="pt")
    extra = {"min_new_tokens": max_new_tokens} if ignore_eos else {}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **extra)
    new = out[0, inputs["input_ids"].shape[1] :]
    return prompt + tokenizer.decode(new, skip_special_tokens=True), len(new)


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "service": "LLM-Generator"})


async def generate(request: Request) -> JSONResponse:
    if request.headers.get("x-api-key") != os.environ["API_KEY"]:
        return JSONResponse({"detail": "Invalid API Key"}, status_code=401)
    body = await request.json()
    text, n = await run_in_threadpool(
        run, body["prompt"], int(body.get("max_new_tokens", 50)), bool(body.get("ignore_eos", False))
    )
    return JSONResponse({"generated_text": text, "generated_tokens": n})


app = Starlette(routes=[Route("/health", health), Route("/generate", generate, methods=["POST"])])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8001")), log_level="warning")
