# The image both Kubernetes overlays name (deploy/k8s): `aragora` and the
# `aedb` operator CLI on a slim base, run as an unprivileged user with a
# read-only root filesystem (writable paths are volumes: /var/lib/aragora and
# /tmp).
#   docker build -t aragora:latest .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p aragora -p aedb-cli \
    && install -m 0755 target/release/aragora target/release/aedb /usr/local/bin/

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 aragora \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin aragora \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/aragora
COPY --from=build /usr/local/bin/aragora /usr/local/bin/aedb /usr/local/bin/
USER 10001:10001
ENV ARAGORA_DATA_DIR=/var/lib/aragora
VOLUME ["/var/lib/aragora"]
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/aragora"]
CMD ["serve"]
