# bearer-proxy container image.
#   docker build -t bearer-proxy .
#   docker run --env-file bearer-proxy.env -p 127.0.0.1:8080:8080 bearer-proxy
# Builder and runtime share Debian 12 (bookworm), so the binary's glibc matches.
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

# The dependency list alone: its layer changes only when Cargo.toml or Cargo.lock do.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# Every dependency is built in this cached layer; a source change skips it.
RUN cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --bin bearer-proxy

# Distroless: glibc, CA certificates, a nonroot user (65532), no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /src/target/release/bearer-proxy /usr/local/bin/bearer-proxy
# Inside a container other containers and the orchestrator's probes cannot
# reach 127.0.0.1: listen on every interface. Mount a config file at
# /etc/bearer-proxy/bearer-proxy.toml to have it read.
ENV BEARER_PROXY_LISTEN=0.0.0.0:8080 \
    BEARER_PROXY_ADMIN_LISTEN=0.0.0.0:9090
EXPOSE 8080 9090
USER 65532:65532
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/bearer-proxy", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/bearer-proxy"]
CMD ["run"]
