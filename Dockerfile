# syntax=docker/dockerfile:1
# epsignal-bridge: `docker build -t epsignal-bridge .`, then `docker run epsignal-bridge` runs
# `epsignal-bridge run` (configuration: EPSIGNAL_* variables, `docker run epsignal-bridge config`).
# Health and metrics over HTTP on EPSIGNAL_HTTP_PORT (8080): /healthz, /readyz, /metrics.
# tests/deploy/test_image.py builds and runs what this file builds, without Docker.
ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------- build
# The locked runtime dependencies (requirements.lock, not requirements-dev.lock) and the bridge's
# wheel, in the virtual environment /opt/venv; docker/install.sh is the whole recipe.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY requirements.lock pyproject.toml README.md ./
COPY bridge ./bridge
COPY docker/install.sh ./docker/install.sh
RUN sh docker/install.sh /opt/venv /tmp/wheels

# ---------------------------------------------------------------------------- runtime
# Only the virtual environment comes over: no compilers, no build tools, no pip caches.
FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="epsignal-bridge" \
      org.opencontainers.image.description="innovaphone EpSignal call signaling to RabbitMQ" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/epsignal-bridge" \
      org.opencontainers.image.documentation="https://example.invalid/epsignal-bridge/docs/DEPLOY.md"
# uid/gid 10001: the Helm chart's securityContext runs the pod as this user.
RUN groupadd --system --gid 10001 bridge \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin bridge
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
# HTTP: /healthz, /readyz, /metrics (EPSIGNAL_HTTP_PORT). Server mode also listens on
# EPSIGNAL_PBX_LISTEN (default 8090) for the PBX. No HEALTHCHECK: Kubernetes probes do that.
EXPOSE 8080
ENTRYPOINT ["epsignal-bridge"]
CMD ["run"]
