# The validating resolver that runs beside the relay in each Kubernetes pod
# (deploy/kubernetes/statefulset.yaml, container "unbound"): Debian's unbound and the root
# trust anchor from dns-root-data. Its configuration comes from the ConfigMap
# dane-relay-unbound.
#
#   docker build -t dane-relay-unbound -f deploy/docker/unbound.Dockerfile deploy/docker
FROM debian:bookworm-slim
# Debian stable's security updates are wanted here, so no version pins.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends unbound dns-root-data \
 && rm -rf /var/lib/apt/lists/*
# The pod runs it as uid 10025 (runAsUser); a plain `docker run` as the same user.
USER 10025:10025
ENTRYPOINT ["unbound"]
CMD ["-d", "-p", "-c", "/etc/unbound/dane-relay/unbound.conf"]
