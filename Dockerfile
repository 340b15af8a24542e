# dane-relay container image: non-root, spool on a volume, health check on the SMTP port.
FROM python:3.11-slim
RUN useradd --system --home-dir /var/spool/dane-relay --shell /usr/sbin/nologin dane-relay \
 && mkdir -p /var/spool/dane-relay /etc/dane-relay \
 && chown dane-relay:dane-relay /var/spool/dane-relay
WORKDIR /opt/dane-relay
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN pip install --no-cache-dir .
COPY config/relay.toml /etc/dane-relay/relay.toml
RUN sed -i 's|^directory = .*|directory = "/var/spool/dane-relay"|; s|^listen = \["127.0.0.1:2525"\]|listen = ["0.0.0.0:2525"]|; s|^listen = "127.0.0.1:9425"|listen = "0.0.0.0:9425"|; s|^networks = .*|networks = ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]|' /etc/dane-relay/relay.toml \
 && dane-relay config check /etc/dane-relay/relay.toml
USER dane-relay
VOLUME ["/var/spool/dane-relay"]
EXPOSE 2525 9425
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import socket; s=socket.create_connection(('127.0.0.1', 2525), 3); assert s.recv(3) == b'220'"
ENTRYPOINT ["dane-relay"]
CMD ["run", "-c", "/etc/dane-relay/relay.toml"]
