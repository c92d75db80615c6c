# ehrx in a container: `docker build -t ehrx .`, then
#   docker run -p 8080:8080 -v ehrx-data:/var/lib/ehrx ehrx
# The entry point is `ehrx`, its default command `serve`; other commands run
# the same way (`docker run --rm -v ehrx-data:/var/lib/ehrx ehrx backup --out
# /var/lib/ehrx/backups/now.jsonl.gz`). Settings come from EHRX_* variables
# (README, Configuration) or a mounted ehrx.toml (`--config`).

# ---- build: the release binary ----
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libxmlsec1-dev libxml2-dev libssl-dev libclang-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin ehrx \
 && cp target/release/ehrx /usr/local/bin/ehrx

# ---- run: the binary, its shared libraries, its mapping rules ----
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libxmlsec1 libxmlsec1-openssl libxml2 libssl3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/ehrx --create-home ehrx
COPY --from=build /usr/local/bin/ehrx /usr/local/bin/ehrx
COPY --from=build /src/mappings /usr/share/ehrx/mappings
# The embedded database (and its write-ahead log) and scheduled backups live
# in the volume; the process runs as the unprivileged user `ehrx`.
ENV EHRX_LISTEN=0.0.0.0:8080 \
    EHRX_DATABASE_URL=sqlite:/var/lib/ehrx/ehrx.db \
    EHRX_BACKUP_DIR=/var/lib/ehrx/backups \
    EHRX_MAPPINGS_DIR=/usr/share/ehrx/mappings
USER ehrx
WORKDIR /var/lib/ehrx
VOLUME ["/var/lib/ehrx"]
EXPOSE 8080
# Orchestrators probe GET /health/live and GET /health/ready.
ENTRYPOINT ["ehrx"]
CMD ["serve"]
