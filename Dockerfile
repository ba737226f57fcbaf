# The iotgw gateway (and the simulator: same image, `iotgw simulate`). Used by docker-compose.yml.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# The dependencies first, from pyproject.toml alone: a change of the code rebuilds only the layer below.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && pip install -r requirements.txt
COPY README.md LICENSE ./
COPY gateway ./gateway
COPY devices ./devices
COPY alerts ./alerts
COPY analytics ./analytics
RUN pip install --no-deps . && rm -rf /src

# Never root: the gateway needs nothing but its data directory.
RUN useradd --system --uid 10001 --create-home --home-dir /var/lib/iotgw iotgw
USER iotgw
WORKDIR /var/lib/iotgw

ENV IOTGW_HTTP_HOST=0.0.0.0 \
    IOTGW_HTTP_PORT=8000 \
    IOTGW_DATABASE_URL=sqlite:////var/lib/iotgw/iotgw.db
EXPOSE 8000
# Liveness (/health), on the port the gateway is configured with: a broker that is away makes
# the gateway not ready (/ready), not unhealthy.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('IOTGW_HTTP_PORT', '8000')}/health\", timeout=2)"
CMD ["iotgw", "run"]
