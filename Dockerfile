# dane-relay container image: the package in a virtualenv on a slim Python base, run as a
# non-root user, spool on a volume, liveness checked on /healthz. See deploy/README.md.
#
#   docker build -t dane-relay .
#   # a validating resolver on the relay's loopback: the relay joins the network namespace
#   # of a container running unbound (deploy/unbound/unbound.conf); ports are published on
#   # that container, since a container sharing another's network cannot publish its own.
#   docker run -d --name dane-relay-net -p 25:25 -p 9425:9425 <your unbound image>
#   docker run -d --name dane-relay --network container:dane-relay-net \
#       -v dane-relay-spool:/var/spool/dane-relay --stop-timeout 30 dane-relay

# --- build: install the package and its dependencies into /opt/venv ---
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN /opt/venv/bin/pip install /src

# --- run: the virtualenv and the container configuration, nothing else ---
FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# A fixed uid/gid (10025) so volumes and Kubernetes' runAsUser/fsGroup can name it.
RUN groupadd --system --gid 10025 dane-relay \
 && useradd --system --uid 10025 --gid dane-relay --no-create-home \
        --home-dir /var/spool/dane-relay --shell /usr/sbin/nologin dane-relay \
 && install -d -o dane-relay -g dane-relay -m 0700 /var/spool/dane-relay
COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/relay.toml /etc/dane-relay/relay.toml
RUN dane-relay config check /etc/dane-relay/relay.toml
USER 10025:10025
# One spool per container, on a durable volume: a message answered 250 lives only here.
VOLUME ["/var/spool/dane-relay"]
# SMTP, and metrics with /healthz and /readyz. Docker (20.10 and later) lets a non-root
# process bind ports below 1024 inside the container.
EXPOSE 25 9425
# Liveness only: /readyz answers 503 while the resolver is down, which a restart does not fix.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9425/healthz', timeout=4).status != 200)"]
# SIGTERM (docker stop): the listeners close, sessions and deliveries get [server]
# shutdown_grace (20 s), then the relay exits 0; stop with --stop-timeout/-t 30 or more.
STOPSIGNAL SIGTERM
ENTRYPOINT ["dane-relay"]
CMD ["run", "-c", "/etc/dane-relay/relay.toml"]
