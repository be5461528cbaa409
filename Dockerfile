# loom-router: multi-stage build. Config and certificates are mounted, never baked in:
#   docker run -v /etc/loom-router:/etc/loom-router:ro -p 8080:8080 loom-router
FROM rust:1.95-slim-bookworm AS build
# etcd-client (the etcd backend) runs protoc at build time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The workspace's other member (the emulated Loom) must be present for Cargo to read the
# workspace, but the production binary leaves it out: no default features, so no `demo`.
COPY crates ./crates
RUN cargo build --release --locked --no-default-features --features etcd --bin loom-router

FROM debian:bookworm-slim
# curl for the HEALTHCHECK only.
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home loom-router
COPY --from=build /src/target/release/loom-router /usr/local/bin/loom-router
USER loom-router
# listen.http, listen.https (when configured) and listen.admin (config/loom-router.toml).
EXPOSE 8080 8443 9901
HEALTHCHECK --interval=10s --timeout=2s --retries=3 \
    CMD curl -fsS http://127.0.0.1:9901/healthz || exit 1
ENTRYPOINT ["/usr/local/bin/loom-router"]
CMD ["run", "--config", "/etc/loom-router/loom-router.toml"]
