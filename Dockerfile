# latprune: one image for the API, the workers and the CLI.
#   docker build -t latprune .                      # PyPI's torch (CUDA build on x86_64; runs on CPU too)
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t latprune:cpu .
FROM python:3.11-slim

ARG TORCH_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    LATPRUNE_HOME=/var/lib/latprune LATPRUNE_DATA_ROOT=/data

WORKDIR /src
COPY pyproject.toml README.md ./
COPY pruning ./pruning
COPY latency ./latency
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} ".[service]" \
    && useradd --system --create-home --home-dir /home/latprune latprune \
    && mkdir -p /var/lib/latprune /data \
    && chown latprune /var/lib/latprune

USER latprune
WORKDIR /home/latprune
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --retries=5 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
CMD ["uvicorn", "--factory", "service.app:create_app", "--host", "0.0.0.0", "--port", "8000"]
