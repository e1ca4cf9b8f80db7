# Build:  docker build -t sidecar .
# Run:    docker run -p 8443:8443 sidecar proxy --upstream http://app:8080
# Deploy: deploy/kubernetes/ (a native sidecar beside the app), deploy/systemd/ (a VM)
#
# Multi-stage: a release build on Debian, then a distroless runtime (no shell, non-root).
FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so that editing src/ does not rebuild them. Cargo.toml declares the
# `hot_path` bench, and cargo refuses a manifest whose declared targets are missing: a stub
# stands in for it (benches are not built here).
COPY Cargo.toml Cargo.lock ./
RUN mkdir src benches && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > benches/hot_path.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin sidecar

# aws-lc (rustls' crypto) links against glibc; distroless/cc has glibc and libgcc, nothing else.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/sidecar /usr/local/bin/sidecar
# In a container the proxy must listen on all interfaces; the dev certificate (when no
# --cert is given) is kept in a writable place. Being environment variables, these win over
# the `listen` and `state-dir` keys of a --config file (a flag wins over both).
ENV SIDECAR_LISTEN=0.0.0.0:8443 \
    SIDECAR_STATE_DIR=/tmp/sidecar
# nonroot is uid/gid 65532 (the runAsUser of deploy/kubernetes/).
USER nonroot:nonroot
# 8443: HTTPS (--listen). 9901: the admin API, when --admin 0.0.0.0:9901 is given.
EXPOSE 8443 9901
# No HEALTHCHECK: distroless has no shell or curl to run one, and the binary has no probe
# subcommand. Kubernetes ignores HEALTHCHECK anyway and probes the admin API itself (httpGet
# /healthz and /readyz, see deploy/kubernetes/); under plain Docker, check it from outside:
# curl -fsS http://127.0.0.1:9901/readyz with --admin and the port published.
ENTRYPOINT ["/usr/local/bin/sidecar"]
CMD ["proxy", "--help"]
