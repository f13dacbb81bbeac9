# CUDA image that serves a checkpoint mounted at /model:
#   docker build -t elas-serve .
#   docker run --gpus all -p 8000:8000 -v /path/to/checkpoint:/model elas-serve
# Extra flags go after the image name (e.g. --ffn-backend fused --max-num-seqs 256).
ARG BASE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
FROM ${BASE}

WORKDIR /opt/elas-serve
COPY pyproject.toml README.md ./
COPY elas_serve ./elas_serve
COPY kernels ./kernels
COPY models ./models
COPY clients ./clients
RUN pip install --no-cache-dir . && python -c "import elas_serve.server.app"

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s CMD \
    python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
ENTRYPOINT ["elas-serve", "serve", "--host", "0.0.0.0", "--port", "8000", "--model", "/model"]
