# The outbox-relay image: the `outbox` CLI (install, doctor, status, relay, consume ...).
# docker-compose.yml builds it; every service runs `outbox <command> ...`.
FROM python:3.11-slim
WORKDIR /src
COPY . .
RUN pip install --no-cache-dir '.[relay,consumers,admin]' && rm -rf /src
WORKDIR /
USER nobody
CMD ["outbox", "--help"]
