# Build stage: dev dependencies and the native sqlite3 build (against Debian's libsqlite3).
FROM node:20-bookworm-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3 make g++ libsqlite3-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY package.json package-lock.json ./
COPY scripts ./scripts
RUN npm_config_sqlite=/usr npm_config_build_from_source=true npm ci --no-audit --no-fund
COPY . .
RUN npx tsc -p tsconfig.build.json && npm prune --omit=dev

# Runtime stage: production dependencies only, non-root, read-only root filesystem friendly.
FROM node:20-bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends libsqlite3-0 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY --from=build /src/package.json ./
COPY --from=build /src/node_modules ./node_modules
COPY --from=build /src/dist ./dist
ENV RPP_CACHE_DIRECTORY=/cache NODE_ENV=production
USER 65534:65534
VOLUME /cache
ENTRYPOINT ["node", "/app/dist/main.js"]
