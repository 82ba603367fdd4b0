# The user-code image: the clickstream_pipeline code location, served over gRPC by a Dagster code
# server. On Kubernetes the Helm chart runs it as the user deployment (same module, same port),
# and the K8sRunLauncher starts one Job per run from it. Build from the repository root:
#   docker build -t <registry>/clickstream-pipeline:<git sha> .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_NO_CACHE=1 \
    UV_PROJECT_ENVIRONMENT=/opt/clickstream/venv \
    PATH=/opt/clickstream/venv/bin:$PATH \
    DAGSTER_HOME=/opt/dagster/dagster_home

WORKDIR /opt/clickstream

# Every runtime package at the version the tests ran with (uv.lock, without the dev and bench
# extras), not whatever resolves on the day of the build; uv at the version the lock holds.
COPY uv.lock pyproject.toml README.md ./
COPY clickstream_pipeline ./clickstream_pipeline
RUN pip install --no-cache-dir uv==0.13.10 \
    && uv sync --frozen --no-editable \
    && pip uninstall --yes uv \
    && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin clickstream \
    && mkdir -p "$DAGSTER_HOME" \
    && chown clickstream:clickstream "$DAGSTER_HOME"

USER 10001:10001
EXPOSE 4000

# test_deploy.py runs exactly this command (host and port aside) in the production topology test.
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", "-m", "clickstream_pipeline.definitions", "--location-name", "clickstream_pipeline"]
