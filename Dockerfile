FROM python:3.11-slim

# CPU-only PyTorch comes from PyTorch's own CPU index (the default PyPI wheel bundles CUDA, ~2 GB more).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    MODEL_NAME=distilgpt2 \
    TRANSFORMERS_CACHE=/tmp/transformers_cache \
    HF_HOME=/tmp/hf_home

WORKDIR /app

COPY requirements.txt .
# PyTorch's CPU index serves torch as "2.13.0+cpu", which sorts above PyPI's CUDA "2.13.0",
# so the pin in requirements.txt resolves to the CPU build.
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" -r requirements.txt

RUN groupadd --gid 10001 appuser \
    && useradd --uid 10001 --gid appuser --no-create-home --home-dir /tmp appuser \
    && mkdir -p /tmp/transformers_cache /tmp/hf_home \
    && chown appuser:appuser /tmp/transformers_cache /tmp/hf_home

# The code stays owned by root: the service user can read it but not change it.
COPY server.py engine.py model.py auth.py docs.html ./

# hadolint ignore=DL3066
USER appuser
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

CMD ["python", "server.py"]
