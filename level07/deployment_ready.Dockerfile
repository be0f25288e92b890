# level07/deployment_ready.py in a container. Build from the repository root (the server
# imports lib/ and the earlier levels it builds on):
#
#   docker build -f level07/deployment_ready.Dockerfile -t deployment-ready .
#   docker run --rm -p 8030:8030 -v deployment-ready-data:/data \
#       -e SECRET_KEY="$(python3 -c 'import secrets; print(secrets.token_hex(32))')" \
#       deployment-ready
#
# The standard library is all it needs: no pip install, no build stage.
FROM python:3.12-slim

# Production settings; anything here can be overridden with `docker run -e NAME=value`.
# HOST=0.0.0.0: inside a container, loopback is unreachable from the published port.
# SHUTDOWN_GRACE_S=8 fits in `docker stop`'s default 10 s before it sends SIGKILL.
# SECRET_KEY is not here on purpose: an image is shared, a secret is not (docker run -e,
# --env-file, or an orchestrator's secret store).
ENV APP_ENV=production \
    HOST=0.0.0.0 \
    PORT=8030 \
    DATABASE_PATH=/data/deployment_ready.sqlite3 \
    LOG_FORMAT=json \
    LOG_LEVEL=info \
    SHUTDOWN_GRACE_S=8 \
    REQUEST_TIMEOUT_S=5 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A user of its own, no login, no home; numeric so that Kubernetes' runAsNonRoot can check it.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin app \
    && mkdir /data && chown 10001:10001 /data

WORKDIR /app
# Only what the server imports, root-owned and so read-only to the app user.
COPY lib/ lib/
COPY level01/counter.py level01/health_check.py level01/
COPY level02/notes.py level02/
COPY level07/deployment_ready.py level07/
COPY level07/deployment_ready_migrations/ level07/deployment_ready_migrations/

USER 10001:10001
VOLUME /data
EXPOSE 8030

# Liveness, not readiness: Docker (and Swarm) restart an unhealthy container, and restarting
# every replica during a database outage cures nothing. The slim image has no curl: the
# check is Python's own urllib, which exits non-zero on a refused connection or any non-2xx.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('PORT', '8030'), timeout=2)"]

# SIGTERM is Docker's default stop signal; said here because the graceful drain depends on it.
STOPSIGNAL SIGTERM
# Exec form: Python is PID 1 and receives SIGTERM itself (a shell in between would not pass
# it on). It starts no child processes, so it needs no init to reap them.
CMD ["python", "level07/deployment_ready.py"]
