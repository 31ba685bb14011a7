# syntax=docker/dockerfile:1
# The tuneserve image: the `tuneserve` command (`python -m services ...`) and a KubeRay
# head/worker image (Ray on PATH, bash, non-root uid 1000, gid 100 as in Ray's own images).
#
#   docker build -t tuneserve:0.1.0-cpu .                                   # CPU torch (default)
#   docker build --build-arg TORCH_VARIANT=cu128 -t tuneserve:0.1.0-cu128 .  # CUDA 12.8 torch
#   docker run --rm tuneserve:0.1.0-cpu --help
#
# TORCH_VARIANT names a PyTorch wheel index (https://download.pytorch.org/whl/<variant>):
# `cpu`, or a CUDA variant that index lists for TORCH_VERSION (cu126, cu128, cu130, ...).
# CUDA wheels bundle the CUDA runtime, so the base stays the same; the node supplies only
# the NVIDIA driver. Layers go slowest-changing first: torch, Ray, the other dependencies
# (read from pyproject.toml), then the source. tests/unit/test_dockerfile.py keeps the
# pins here equal to pyproject.toml and the Makefile.

ARG PYTHON_VERSION=3.11
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim-bookworm

# ---- build: a virtual environment with every dependency and the project -----------------
FROM ${BASE_IMAGE} AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

# torch first, from the variant's index: a bare `torch` requirement would pull the
# multi-GB CUDA build from PyPI even for a CPU image. Separate RUNs on purpose: each is
# its own cached layer, so a Ray bump does not download torch again.
# hadolint ignore=DL3059
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        "torch==${TORCH_VERSION}"

# Ray, pinned exactly as in pyproject.toml: the image, the KubeRay manifests (rayVersion)
# and every client must run the same Ray.
# hadolint ignore=DL3059
RUN pip install "ray[train,serve]==2.60.0"

# The other runtime dependencies, read from pyproject.toml so that the two cannot drift.
# The constraint keeps the torch installed above (2.13.0+cpu satisfies torch==2.13.0).
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && echo "torch==${TORCH_VERSION}" > /tmp/constraints.txt \
    && pip install -r /tmp/requirements.txt -c /tmp/constraints.txt

# The project last, without dependencies (all present). services/protocol holds the
# generated gRPC code, checked in, so no code generation happens here.
COPY README.md ./
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
