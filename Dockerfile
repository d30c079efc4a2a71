# Two stages: build with the official Rust image, run on a slim Debian of the
# same release (the binaries link only against glibc), as a non-root user.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p vmm-server -p vmm-client

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin vmm
COPY --from=build /src/target/release/vmm-server /src/target/release/vmm-client /usr/local/bin/
USER vmm
ENV VMM_LISTEN=0.0.0.0:8888
EXPOSE 8888
ENTRYPOINT ["vmm-server"]
