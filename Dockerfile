# Multi-stage build: compile with cmake available (Pingora's zlib-ng), ship
# a slim runtime with CA certificates and a non-root user.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin portcullis

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /var/lib/portcullis --create-home portcullis
COPY --from=build /src/target/release/portcullis /usr/local/bin/portcullis
COPY config /etc/portcullis/config
COPY policies /etc/portcullis/policies
# No keys in the image: mount your identity provider's public keys at
# /etc/portcullis/keys (or set a jwks_url) and set PORTCULLIS_JWT_ISSUER.
RUN mkdir -p /etc/portcullis/keys
USER portcullis
WORKDIR /var/lib/portcullis
ENV PORTCULLIS_LISTEN=0.0.0.0:8080 \
    PORTCULLIS_ADMIN_LISTEN=0.0.0.0:8081 \
    PORTCULLIS_STATE_DIR=/var/lib/portcullis \
    PORTCULLIS_KEYS_DIR=/etc/portcullis/keys \
    PORTCULLIS_AUDIT_FILE=/var/lib/portcullis/audit.jsonl
EXPOSE 8080 8081
ENTRYPOINT ["portcullis"]
CMD ["serve", "--config", "/etc/portcullis/config/portcullis.yaml"]
