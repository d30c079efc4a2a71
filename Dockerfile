# Two stages: build with the official Rust image, run on a slim Debian of the
# same release (the binaries link only against glibc), as a non-root user.
#
# The build stage is layered so that Docker's cache does the work cargo would
# otherwise redo on every build: the dependencies (tokio, rustls, jemalloc's C
# build, ... several minutes) are compiled in a layer that depends only on the
# manifests and Cargo.lock, so editing a source file rebuilds only vmm's own
# crates, and a file the build does not read (README, tests, deploy/) is not
# even in the build context (see .dockerignore), so it rebuilds nothing.
FROM rust:1.95-bookworm AS build
WORKDIR /src

# 1. The manifests of every workspace member: cargo loads the whole workspace
#    (and --locked checks Cargo.lock against it) even to build two packages.
COPY Cargo.toml Cargo.lock ./
COPY vmm-core/Cargo.toml vmm-core/
COPY vmm-server/Cargo.toml vmm-server/
COPY vmm-client/Cargo.toml vmm-client/
COPY vmm-bench/Cargo.toml vmm-bench/
COPY tests/Cargo.toml tests/

# 2. The dependencies, built against empty stand-ins for vmm's own sources:
#    one per target the manifests declare or cargo infers from a file name
#    (vmm-bench declares its binary; the others are src/lib.rs or
#    src/main.rs). Test, bench and example targets are inferred from files,
#    which are absent here, so they need no stand-ins.
RUN mkdir -p vmm-core/src vmm-server/src vmm-client/src vmm-bench/src tests/src \
 && touch vmm-core/src/lib.rs vmm-bench/src/lib.rs tests/src/lib.rs \
 && for main in vmm-server/src/main.rs vmm-client/src/main.rs vmm-bench/src/main.rs; do \
        echo 'fn main() {}' > "$main"; \
    done \
 && cargo build --release --locked -p vmm-server -p vmm-client

# 3. The real sources of what is built, and the migrations vmm-core embeds.
COPY migrations migrations
COPY vmm-core/build.rs vmm-core/
COPY vmm-core/src vmm-core/src
COPY vmm-server/src vmm-server/src
COPY vmm-client/src vmm-client/src

# COPY keeps the files' modification times, which may be older than the
# stand-ins' build: touch the crate roots so that cargo rebuilds vmm's crates
# (only them; the dependencies' fingerprints are unchanged).
RUN touch vmm-core/src/lib.rs vmm-server/src/main.rs vmm-client/src/main.rs \
 && cargo build --release --locked -p vmm-server -p vmm-client

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin vmm
COPY --from=build /src/target/release/vmm-server /src/target/release/vmm-client /usr/local/bin/
USER vmm
ENV VMM_LISTEN=0.0.0.0:8888
EXPOSE 8888
ENTRYPOINT ["vmm-server"]
