# Multi-stage build: compile with the Rust toolchain, ship a slim Debian runtime that runs
# as an unprivileged user.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends pkg-config && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY benches benches
COPY templates templates
COPY config config
RUN cargo build --release --locked --bin paloma && strip target/release/paloma

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/paloma --shell /usr/sbin/nologin paloma
COPY --from=build /src/target/release/paloma /usr/local/bin/paloma
COPY templates /etc/paloma/templates
COPY config/paloma.toml /etc/paloma/paloma.toml
WORKDIR /etc/paloma
USER paloma
ENV PALOMA_TEMPLATES__DIR=/etc/paloma/templates
# 8080: tracking links; 9090: /metrics, /healthz, /readyz
EXPOSE 8080 9090
ENTRYPOINT ["paloma"]
CMD ["run", "--config", "/etc/paloma/paloma.toml"]
