# syntax=docker/dockerfile:1
# The one shopvision image: KFP pipeline components, training (torchrun), serving, and the MLflow
# tracking server of manifests/base (mlflow, boto3 and the PostgreSQL driver are in it).
#
#   docker build -t shopvision:0.1.0-gpu .                           CUDA build of torch (default)
#   docker build --build-arg VARIANT=cpu -t shopvision:0.1.0-cpu .   CPU-only torch, a much smaller image
#
# The CUDA wheels bring their CUDA libraries as pip packages (nvidia-*); a GPU node needs only the
# driver and the container toolkit, which the NVIDIA GPU operator installs. So one slim Python base
# serves both variants. Everything is built in the first stage; the second copies the finished
# virtual environment only: no compilers, no pip cache, no source tree, and it runs as uid 10001.

ARG PYTHON_IMAGE=python:3.11-slim-trixie
ARG VARIANT=gpu

FROM ${PYTHON_IMAGE} AS build
ARG VARIANT
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
# torch first, in a layer of its own: the largest download, and it changes least often. The CPU
# wheels ("2.14.1+cpu") satisfy the project's torch==2.14.1 pin, so the next step keeps them.
RUN case "$VARIANT" in \
      gpu) pip install --no-cache-dir "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" ;; \
      cpu) pip install --no-cache-dir --index-url "$TORCH_CPU_INDEX" \
             "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" ;; \
      *) echo "VARIANT must be gpu or cpu, not '$VARIANT'" >&2; exit 1 ;; \
    esac
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shopvision ./shopvision
COPY components ./components
COPY pipelines ./pipelines
COPY serving ./serving
# psycopg2-binary: the MLflow server's PostgreSQL driver (manifests/base/mlflow.yaml).
RUN pip install --no-cache-dir . "psycopg2-binary==2.9.13" \
 && pip check \
 && python -c "import torch, shopvision.cli; print('torch', torch.__version__)"

FROM ${PYTHON_IMAGE} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="shopvision" \
      org.opencontainers.image.description="Product photo classification: pipeline steps, training, serving, MLflow server" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.shopvision.variant="${VARIANT}"
RUN groupadd --system --gid 10001 shopvision \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin shopvision
COPY --from=build /opt/venv /opt/venv
# Kubernetes mounts the root filesystem read-only and an emptyDir at /tmp: every cache goes there.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCH_HOME=/tmp/.cache/torch \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    SHOPVISION_IMAGE_VARIANT=${VARIANT}
WORKDIR /tmp
# Numeric, so the kubelet can check runAsNonRoot without reading /etc/passwd.
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["shopvision"]
CMD ["--help"]
