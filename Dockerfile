# sluice's container image: built with cargo, run from a small Debian image as a non-root user.
#
#   docker build -t sluice .
#   docker run --rm -e SLUICE_DATABASE_URL=... -e SLUICE_SQS_QUEUE_URL=... -e SLUICE_MASK_KEY=... sluice
#
# The image runs `sluice run` with /etc/sluice/sluice.toml (config/container.toml): the environment
# supplies the queue, the database and the key (see that file). Port 9187 serves /metrics,
# /healthz and /readyz. Other commands: `docker run ... sluice migrate`, `... sluice check`.

FROM rust:1-bookworm AS build
WORKDIR /src
# The whole workspace (benches and xtask are members or targets the manifest names); only the
# daemon is built.
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY src src
COPY benches benches
COPY xtask xtask
COPY config config
RUN cargo build --release --locked --bin sluice \
    && install -m 0755 target/release/sluice /usr/local/bin/sluice

FROM debian:bookworm-slim
# CA certificates for AWS over HTTPS; nothing else is needed at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sluice
COPY --from=build /usr/local/bin/sluice /usr/local/bin/sluice
COPY config/container.toml /etc/sluice/sluice.toml
ENV SLUICE_CONFIG=/etc/sluice/sluice.toml
USER 10001:10001
EXPOSE 9187
# SIGTERM drains (finish, commit, acknowledge) within pipeline.shutdown_timeout_seconds (30 s):
# give the container longer than that before it is killed.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["run"]
