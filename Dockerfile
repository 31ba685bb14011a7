# syntax=docker/dockerfile:1
# The tuneserve image: the `tuneserve` command (`python -m services ...`) and a KubeRay
# head/worker image (Ray on PATH, bash, non-root uid 1000, gid 100 as in Ray's own images).
#
#   docker build -t tuneserve:0.1.0-cpu .                                   # CPU torch (default)
#   docker build --build-arg TORCH_VARIANT=cu128 -t tuneserve:0.1.0-cu128 .  # CUDA 12.8 torch
#   docker build --build-arg BASE_IMAGE=python:3.11-slim-bookworm@sha256:<digest> ...
#   docker run --rm tuneserve:0.1.0-cpu --help
#
# Every dependency comes from requirements.lock (`make lock`): exact versions, each with
# its sha256, so that two builds, and every node, run the same code; pip refuses anything
# the lock does not name. The lock is for CPU torch on linux/amd64 and Python 3.11; a CUDA
# image uses `make lock TORCH_VARIANT=cu128` (requirements-cu128.lock) and
# --build-arg TORCH_VARIANT=cu128, whose torch comes from that PyTorch wheel index.
# BASE_IMAGE may be pinned by digest (python:3.11-slim-bookworm@sha256:...); both stages
# use it. tests/unit/test_dockerfile.py keeps the lock equal to pyproject.toml's pins.

ARG PYTHON_VERSION=3.11
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim-bookworm

# ---- build: a virtual environment with every dependency and the project -----------------
FROM ${BASE_IMAGE} AS builder
ARG TORCH_VARIANT=cpu
# Where torch's local versions (2.13.0+cpu) come from; empty: from the pip configuration.
ARG TORCH_INDEX=https://download.pytorch.org/whl/${TORCH_VARIANT}
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

# The dependencies before the source, so that a code change does not reinstall them.
WORKDIR /src
COPY requirements*.lock ./
RUN lock=requirements.lock \
    && if [ "${TORCH_VARIANT}" != cpu ]; then lock="requirements-${TORCH_VARIANT}.lock"; fi \
    && pip install --require-hashes ${TORCH_INDEX:+--extra-index-url "${TORCH_INDEX}"} \
        -r "${lock}"

# The project last, without dependencies (all present). services/protocol holds the
# generated gRPC code, checked in, so no code generation happens here.
COPY pyproject.toml README.md ./
COPY services ./services
RUN pip install --no-deps . \
    && python -c "import services.cli, services.protocol, ray; assert ray.__version__ == '2.60.0', ray.__version__"

# ---- runtime: the interpreter, the virtual environment and a non-root user -------------
FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="tuneserve" \
      org.opencontainers.image.description="Fine-tune Hugging Face models with Ray Train; serve them over gRPC with Ray Serve" \
      org.opencontainers.image.licenses="Apache-2.0"

# wget: the exec probes KubeRay injects for containers that define none call it.
# The profile.d line is single-quoted on purpose: $PATH expands at login, not here.
# hadolint ignore=DL3008,SC2016
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 1000 --gid 100 --create-home --shell /bin/bash ray \
    && echo 'export PATH=/opt/venv/bin:$PATH' > /etc/profile.d/tuneserve-venv.sh

COPY --from=builder /opt/venv /opt/venv

# The profile.d line above keeps /opt/venv first on PATH when KubeRay runs `ray start`
# through a login shell (its ENABLE_LOGIN_SHELL option resets PATH).
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    HOME=/home/ray \
    TUNESERVE_HOME=/home/ray/.tuneserve

USER 1000:100
WORKDIR /home/ray
# 9000: the gRPC API (Ray Serve's gRPC proxy); 8080: Ray's metrics export port.
EXPOSE 9000 8080
ENTRYPOINT ["python", "-m", "services"]
CMD ["--help"]
