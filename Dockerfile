# auth-sidecar image: a static-enough release binary on a distroless, non-root base.
#
#   docker build -t auth-sidecar .
#
# Base images are pinned to exact versions. Pin them by digest as well in your registry
# mirror (`image@sha256:…`); digests could not be resolved where this file was written.

# --- Build -----------------------------------------------------------------------------
FROM rust:1.95.0-slim-bookworm AS builder
WORKDIR /src

# Dependencies first, in a layer of their own: it is rebuilt only when the manifest, the
# lock file, the build script, the proto or the patched HTTP/2 crate change, not when the
# sources do.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY vendor ./vendor
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > benches/load.rs \
    && cargo build --release --locked \
    && rm -rf src benches

COPY src ./src
COPY benches ./benches
COPY migrations ./migrations
# Touched so that cargo rebuilds the crate over the placeholder of the dependency layer.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && cp target/release/auth-sidecar /auth-sidecar

# --- Run -------------------------------------------------------------------------------
# glibc and libgcc, no shell, no package manager; runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /auth-sidecar /usr/local/bin/auth-sidecar
USER 65532:65532

# The token API listens on 127.0.0.1:50051 inside the pod's network namespace and is never
# exposed; only the ops listener (health, JWKS) is.
EXPOSE 8081
ENV AUTH_OPS_LISTEN=0.0.0.0:8081

HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/auth-sidecar", "health", "--addr", "127.0.0.1:8081", "--service", "liveness"]

ENTRYPOINT ["/usr/local/bin/auth-sidecar"]
CMD ["serve"]
