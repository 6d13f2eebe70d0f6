# syntax=docker/dockerfile:1
# SHERS container image.
#   docker build -t shers .
#   docker run -p 8080:8080 -v shers-data:/var/lib/shers/data shers          # SQLite in the volume
#   docker run -p 8080:8080 -e DATABASE_URL=postgres://... -e REDIS_URL=redis://... shers
# No Docker engine was available where this file was written: it was checked by reading, not built.

# ---------------------------------------------------------------- build
FROM rust:1.95-slim-bookworm AS builder
# The slim image already has gcc + libc6-dev (for the bundled SQLite and ring). No other system
# libraries are needed: PostgreSQL goes through tokio-postgres (pure Rust), TLS through rustls/ring.
WORKDIR /build

# Dependency layer: build every dependency against stub sources, so that a change to the
# application code does not recompile the dependency tree. (If Cargo.toml ever declares explicit
# [[test]]/[[bench]]/[[example]] targets or a build.rs, copy/stub those here too.)
# crates/ holds the workspace's test support: cargo must read it to load the workspace, but a
# release build never compiles it.
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && echo '//! stub' > src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

# The real sources. migrations/ and web/ are embedded into the binary at compile time.
COPY src ./src
COPY migrations ./migrations
COPY web ./web
# touch: the copied files may be older than the stub build's outputs.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && install -m 0755 target/release/shers /usr/local/bin/shers

# ---------------------------------------------------------------- runtime
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 shers \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/shers --shell /usr/sbin/nologin shers \
    && mkdir -p /var/lib/shers/data \
    && chown -R shers:shers /var/lib/shers
COPY --from=builder /usr/local/bin/shers /usr/local/bin/shers

WORKDIR /var/lib/shers
# Absolute path inside the volume; it is also where the relative default (sqlite://data/shers.db)
# lands from this WORKDIR, so both spellings name the same file.
ENV DATABASE_URL=sqlite:///var/lib/shers/data/shers.db \
    SHERS_BIND=0.0.0.0:8080 \
    SHERS_LOG__FORMAT=json \
    RUST_LOG=info \
    MIMALLOC_PURGE_DELAY=0
VOLUME ["/var/lib/shers/data"]
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["shers"]
CMD ["serve"]
