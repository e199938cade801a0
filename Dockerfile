# accessflow: one image for every role. The command picks the role:
#   docker run --rm accessflow keys generate
#   docker run --rm -e ACCESSFLOW_... accessflow db upgrade
#   docker run --rm -e ACCESSFLOW_... accessflow workers --queues requests --threads 4
# docker-compose.yml runs the whole stack from it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# The dependencies first, in their own layer, so a change to the code alone rebuilds in seconds.
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the project itself, installed as a package: migrations and templates ship as package data.
COPY README.md ./
COPY domain ./domain
COPY messages ./messages
COPY infra ./infra
COPY workers ./workers
RUN pip install --no-cache-dir . \
    && cd / && rm -rf /src

# Run as an unprivileged user. /app is the working directory: the example files for
# `accessflow demo` and `catalog load examples/...`, and var/ for the demo and the file mail transport.
RUN groupadd --system --gid 10001 accessflow \
    && useradd --system --uid 10001 --gid accessflow --home-dir /app --no-create-home --shell /usr/sbin/nologin accessflow \
    && mkdir -p /app/var \
    && chown accessflow:accessflow /app/var
WORKDIR /app
COPY --chown=accessflow:accessflow examples ./examples
USER 10001:10001

# `accessflow workers` execs dramatiq, which stops its workers gracefully on SIGTERM.
ENTRYPOINT ["accessflow"]
CMD ["workers"]
