"""The service: the request lifecycle (lifecycle), the HTTP app and its Prometheus export (http_app), the
command (server)."""
