# niftidrop in a container: the spool lives in the volume /data, settings come
# from NIFTIDROP_* environment variables, logs are JSON lines on stdout.
#
#   docker build -t niftidrop .
#   docker run -d --name niftidrop -v /srv/spool:/data niftidrop
#
# The base is pinned to a full version tag so a rebuild gets the same Python.

FROM python:3.11.13-slim-bookworm AS builder

# Builds behind a package mirror or a TLS-inspecting proxy pass pip's settings
# here (README, "Deployment"); they exist in this stage only.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_CERT

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# One virtual environment holds niftidrop and its dependencies; the final
# stage copies it whole, without pip's caches or the source tree.
RUN python3 -m venv /opt/niftidrop
WORKDIR /build
COPY pyproject.toml README.md ./
COPY src ./src
RUN /opt/niftidrop/bin/pip install --no-cache-dir . \
    && /opt/niftidrop/bin/pip uninstall --yes pip


FROM python:3.11.13-slim-bookworm

# A fixed, unprivileged uid/gid: give the host's spool folder to 10001:10001
# (or run with --user matching its owner).
RUN groupadd --system --gid 10001 niftidrop \
    && useradd --system --uid 10001 --gid niftidrop --home-dir /data \
       --no-create-home --shell /usr/sbin/nologin niftidrop

COPY --from=builder /opt/niftidrop /opt/niftidrop

ENV PATH=/opt/niftidrop/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NIFTIDROP_ROOT=/data \
    NIFTIDROP_INBOX=inbox \
    NIFTIDROP_OUTBOX=outbox \
    NIFTIDROP_ARCHIVE=archive \
    NIFTIDROP_FAILED=failed \
    NIFTIDROP_LIBRARY=library \
    NIFTIDROP_LOG_FORMAT=json

WORKDIR /data
VOLUME ["/data"]
USER 10001:10001

# niftidrop runs as PID 1 and handles SIGTERM itself: it finishes in-flight
# conversions (NIFTIDROP_SHUTDOWN_TIMEOUT, 30 s) and exits 0. Give `docker stop`
# a longer grace period than that: `docker stop -t 40`.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["niftidrop", "health"]

ENTRYPOINT ["niftidrop"]
CMD ["run"]
