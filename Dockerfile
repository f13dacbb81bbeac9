# elas-serve on a CUDA PyTorch image: serves the bundled demo checkpoint, or the one mounted at /model.
#   docker build -t elas-serve .
#   docker run --gpus all -p 8000:8000 elas-serve                                  # the demo
#   docker run --gpus all -p 8000:8000 -v /path/to/ckpt:/model:ro elas-serve       # a checkpoint
#   docker run --gpus all -p 8000:8000 elas-serve --ffn-backend fused --max-num-seqs 256
# Environment: ELAS_MODEL, ELAS_SERVED_MODEL_NAME, ELAS_HOST, ELAS_PORT, ELAS_SERVE_API_KEY
# (deploy/entrypoint.sh). The whole stack with Prometheus and Grafana: deploy/compose.yaml.
ARG BASE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    ELAS_HOST=0.0.0.0 \
    ELAS_PORT=8000

WORKDIR /opt/elas-serve
COPY pyproject.toml README.md ./
COPY elas_serve ./elas_serve
COPY kernels ./kernels
COPY models ./models
COPY clients ./clients
RUN pip install --no-cache-dir . && python -c "import elas_serve.server.app"
COPY deploy/entrypoint.sh deploy/healthcheck.py ./deploy/

# NOTE: a user of its own with a home: Triton and torch.compile write their caches under $HOME.
RUN groupadd --gid 10001 elas \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin elas \
    && mkdir /model && chown 10001:10001 /model
USER 10001:10001

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "/opt/elas-serve/deploy/healthcheck.py"]
ENTRYPOINT ["/opt/elas-serve/deploy/entrypoint.sh"]
