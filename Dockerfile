# Build stage: a release binary.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src src
COPY migrations migrations
COPY config config
COPY benches benches
RUN cargo build --release --locked --bin exotel-sos

# Run stage: slim, CA certificates for Exotel and GupShup over TLS, a non-root user.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /var/lib/exotel-sos --create-home sos
WORKDIR /var/lib/exotel-sos
COPY --from=build /src/target/release/exotel-sos /usr/local/bin/exotel-sos
COPY config/stakeholders.toml /etc/exotel-sos/stakeholders.toml
USER sos
# In a container the server must listen beyond localhost; the database lives in the working directory
# unless SOS_DATABASE__URL points at PostgreSQL.
ENV SOS_SERVER__LISTEN=0.0.0.0:8080 \
    SOS_STAKEHOLDERS__FILE=/etc/exotel-sos/stakeholders.toml \
    SOS_DATABASE__URL=sqlite:///var/lib/exotel-sos/exotel-sos.db?mode=rwc \
    SOS_LOG__FORMAT=json
# The data directory: the SQLite database, and in it the generated webhook and admin tokens. A volume, so
# that a new container (an upgrade, a restart elsewhere) keeps every incident, the proof of who was
# reached, and the tokens Exotel's applet URLs carry; without it a recreated container starts empty and
# every URL configured in Exotel stops working. Mount it (`-v exotel-sos-data:/var/lib/exotel-sos`), or
# set SOS_SERVER__WEBHOOK_TOKEN / SOS_SERVER__ADMIN_TOKEN and use PostgreSQL.
VOLUME ["/var/lib/exotel-sos"]
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["exotel-sos"]
CMD ["serve"]
