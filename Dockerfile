# syntax=docker/dockerfile:1
# The eventhandler image: one image for the worker (default), `migrate`, `api`, `replay` and `dlq`.
#   docker build -t eventhandler .
#   docker run --rm eventhandler --help

# -- builder: the project's wheel plus the wheels of every dependency ------------------------------
FROM python:3.11.15-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
# Only what the wheel is built from (README.md is the package's long description).
COPY pyproject.toml README.md ./
COPY migrations ./migrations
COPY eventhandler ./eventhandler
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# -- runtime: installs from the builder's wheels only, runs as an unprivileged user ------------------
FROM python:3.11.15-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="eventhandler" \
      org.opencontainers.image.description="Kafka to PostgreSQL projection worker with a PostgreSQL dead letter queue" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    EVENTHANDLER_LOG_FORMAT=json \
    EVENTHANDLER_METRICS_PORT=9180

RUN groupadd --system --gid 10001 eventhandler \
    && useradd --system --uid 10001 --gid eventhandler \
        --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin eventhandler

# A bind mount, not COPY: the wheels never become a layer of the final image.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/eventhandler-*.whl

USER 10001:10001

# 9180: the worker's /metrics, /healthz and /readyz. 8080: `eventhandler api --host 0.0.0.0`.
EXPOSE 9180 8080

# slim has no curl; the standard library is enough. Services on another port (the API) override it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('EVENTHANDLER_METRICS_PORT', '9180'), timeout=4)"]

# The worker finishes its batch and commits on SIGTERM.
STOPSIGNAL SIGTERM
ENTRYPOINT ["eventhandler"]
CMD ["run"]
