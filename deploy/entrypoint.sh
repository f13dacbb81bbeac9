#!/bin/sh
# The container's entrypoint (Dockerfile ENTRYPOINT), also run as is by tests/test_deploy.py.
#
#   docker run IMAGE                        the bundled demo checkpoint, or the one mounted at /model
#   docker run IMAGE --max-num-seqs 64      the same, with more `elas-serve serve` flags
#   docker run IMAGE --model /ckpt          arguments after the image name win over the env vars
#   docker run IMAGE elas-loadtest run ...  any other command (a first argument not starting with -)
#
# Environment (defaults set by the image):
#   ELAS_HOST                 address to bind (image: 0.0.0.0; unset: 127.0.0.1)
#   ELAS_PORT                 port (8000)
#   ELAS_MODEL                checkpoint directory; unset: /model if it holds a config.json, else the demo
#   ELAS_SERVED_MODEL_NAME    model name clients send (default: elas-demo, or the checkpoint path)
#   ELAS_SERVE_API_KEY        require "Authorization: Bearer KEY" (read by elas-serve itself)
set -eu

if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    exec "$@"
fi

model="${ELAS_MODEL:-}"
if [ -z "$model" ] && [ -f /model/config.json ]; then
    model=/model
fi

set -- --host "${ELAS_HOST:-127.0.0.1}" --port "${ELAS_PORT:-8000}" "$@"
if [ -n "${ELAS_SERVED_MODEL_NAME:-}" ]; then
    set -- --served-model-name "$ELAS_SERVED_MODEL_NAME" "$@"
fi
if [ -n "$model" ]; then
    echo "entrypoint: serving the checkpoint at $model" >&2
    set -- --model "$model" "$@"
else
    echo "entrypoint: no ELAS_MODEL and nothing mounted at /model: serving the bundled demo checkpoint" >&2
fi
exec elas-serve serve "$@"
