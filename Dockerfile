# syncd: `docker build -t syncd .`, then see docker-compose.yml and README.md.
# Two stages: the first builds wheels (syncd and its dependencies), the second installs them
# into a clean slim image with no build tools and no source tree.

FROM python:3.12-slim AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md ./
COPY syncd ./syncd
COPY migrations ./migrations
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SYNCD_CONFIG=/etc/syncd/syncd.toml \
    SYNCD_HEALTHCHECK_URL=http://127.0.0.1:9187/healthz
# A numeric, non-root user: orchestrators that enforce runAsNonRoot can verify a number.
RUN groupadd --system --gid 10001 syncd \
 && useradd --system --uid 10001 --gid syncd --home-dir /var/lib/syncd --create-home \
        --shell /usr/sbin/nologin syncd
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels syncd \
 && rm -rf /wheels
USER 10001:10001
WORKDIR /var/lib/syncd
EXPOSE 9187
# The slim image has no curl: Python's urllib does the probe. Set [daemon] listen to
# "0.0.0.0:9187" in the container's config (or change SYNCD_HEALTHCHECK_URL to match it).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['SYNCD_HEALTHCHECK_URL'], timeout=4)"]
ENTRYPOINT ["syncd"]
CMD ["run"]
