#!/bin/sh
# Container entrypoint for mae-serve (both images).
#
# 1. An MAE_* variable set to the empty string means "use the default": it is unset, so that
#    docker-compose.yml can pass every setting as ${MAE_X:-} without inventing defaults.
# 2. When MAE_MODEL_DIR is not set and a model directory is mounted at /models (a model.json
#    there), that one is served; otherwise the model bundled inside the package is.
# 3. The server is started with `exec`, so it replaces this shell: SIGTERM from `docker stop`
#    or Kubernetes reaches uvicorn directly and it drains in-flight requests before exiting.
#
# Arguments that start with "-" (or none) are flags for mae-serve
#   docker run IMAGE --max-batch-size 64
# anything else is run as a command instead
#   docker run -it IMAGE sh
set -eu

for name in $(env | sed -n 's/^\(MAE_[A-Za-z0-9_]*\)=$/\1/p'); do
    unset "$name"
done

models_mount="${MAE_MODELS_MOUNT:-/models}"
if [ -z "${MAE_MODEL_DIR:-}" ] && [ -f "$models_mount/model.json" ]; then
    MAE_MODEL_DIR="$models_mount"
    export MAE_MODEL_DIR
fi
echo "mae-entrypoint: model directory: ${MAE_MODEL_DIR:-<bundled default>}" >&2

case "${1:-}" in
    "" | -*) exec mae-serve "$@" ;;
    *) exec "$@" ;;
esac
