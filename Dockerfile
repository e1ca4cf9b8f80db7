# Build:  docker build -t sidecar .
# Run:    docker run -p 8443:8443 sidecar proxy --upstream http://app:8080
#
# Multi-stage: a release build on Debian, then a distroless runtime (no shell, non-root).
FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so that editing src/ does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin sidecar

# aws-lc (rustls' crypto) links against glibc; distroless/cc has glibc and libgcc, nothing else.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/sidecar /usr/local/bin/sidecar
# In a container the proxy must listen on all interfaces; the dev certificate (when no
# --cert is given) is kept in a writable place.
ENV SIDECAR_LISTEN=0.0.0.0:8443 \
    SIDECAR_STATE_DIR=/tmp/sidecar
USER nonroot:nonroot
EXPOSE 8443 9901
ENTRYPOINT ["/usr/local/bin/sidecar"]
CMD ["proxy", "--help"]
