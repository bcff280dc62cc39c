"""`trufor-trt serve`: the HTTP app under uvicorn, stopped gracefully by SIGTERM / SIGINT."""

import ipaddress

from trufor_trt.service.connections import ACCEPT_BURST, ConnectionLimits, guarded_protocol
from trufor_trt.signals import signals_handled_by

DEFAULT_SHUTDOWN_TIMEOUT = 30.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def serve_app(app, host: str, port: int, limits: ConnectionLimits = ConnectionLimits(),
              shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> bool:
    """Serve until SIGTERM / SIGINT: uvicorn then stops accepting, answers the open requests (the
    queue included) for at most `shutdown_timeout` seconds, cancels what is left, and runs the
    app's shutdown (the image in hand finishes). False if it never started (port taken, warm-up
    failed: uvicorn has logged why)."""
    import uvicorn

    service = app.state.service
    protocol = guarded_protocol(limits, lambda reason: service.metrics.rejected.labels(reason).inc())
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, lifespan="on", log_level="warning",
                                           access_log=False, server_header=False, http=protocol,
                                           backlog=ACCEPT_BURST, timeout_graceful_shutdown=shutdown_timeout))
    service.stop_server = lambda: setattr(server, "should_exit", True)  # a broken runner
    # uvicorn raises the stopping signal again once it is done; with these handlers in place that
    # lands here, and the process exits 0, as a requested stop should.
    try:
        with signals_handled_by(lambda *_: None):
            server.run()
    except SystemExit:  # uvicorn exits like this when it cannot bind
        return False
    return server.started
