# registry-packages-proxy: a multi-stage build. test/infra/image.test.ts assembles the runtime
# stage's file set from this file (its COPY, ENV, WORKDIR and ENTRYPOINT lines) and runs it as
# a non-root user with a read-only app folder, since no Docker engine is available for tests.

# Build stage: dev dependencies, the native sqlite3 build against Debian's libsqlite3 (3x faster
# than compiling the bundled SQLite, and the runtime stage then needs only libsqlite3-0), tsc.
FROM node:20-bookworm-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 make g++ libsqlite3-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm_config_sqlite=/usr npm_config_build_from_source=true npm ci --no-audit --no-fund \
    && test -f node_modules/sqlite3/build/Release/node_sqlite3.node
COPY . .
# infra/tsconfig.image.json compiles main.ts and what it imports, nothing else (no tests, demo,
# bench). Then dev dependencies go: the runtime stage copies production ones only.
RUN npx tsc -p infra/tsconfig.image.json \
    && npm prune --omit=dev --no-audit --no-fund \
    && chmod 0755 dist/main.js

# Runtime stage: production dependencies only; runs as nobody with a read-only root filesystem,
# writing nothing but the cache volume.
FROM node:20-bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends libsqlite3-0 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir /cache && chown 65534:65534 /cache \
    && ln -s /app/dist/main.js /usr/local/bin/registry-packages-proxy
WORKDIR /app
COPY --from=build /src/package.json ./package.json
COPY --from=build /src/node_modules ./node_modules
COPY --from=build /src/dist ./dist
ENV NODE_ENV=production RPP_CACHE_DIRECTORY=/cache
# Numeric, so the kubelet can verify runAsNonRoot without reading /etc/passwd.
USER 65534:65534
VOLUME /cache
# Plain HTTP on loopback: kube-rbac-proxy fronts it in a cluster (infra/deployment.yaml).
EXPOSE 5080
# `registry-packages-proxy cache ls` works too (kubectl exec): the symlink above.
ENTRYPOINT ["node", "/app/dist/main.js"]
