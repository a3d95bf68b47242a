# syntax=docker/dockerfile:1
# Build stage: the wheel and the locked dependencies, in a virtual environment.
FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/venv
COPY requirements.lock pyproject.toml README.md ./
COPY bridge ./bridge
# requirements.lock holds the runtime dependencies only (requirements-dev.lock adds the test tools).
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --require-hashes -r requirements.lock \
 && /opt/venv/bin/pip wheel --no-cache-dir --no-deps -w /wheels . \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps /wheels/*.whl

# Final stage: no compilers, no pip cache, a non-root user.
FROM python:3.11-slim
LABEL org.opencontainers.image.title="epsignal-bridge" \
      org.opencontainers.image.description="innovaphone EpSignal call signaling to RabbitMQ" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/epsignal-bridge"
RUN useradd --system --uid 10001 --no-create-home bridge
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001
EXPOSE 8080
ENTRYPOINT ["epsignal-bridge"]
CMD ["run"]
