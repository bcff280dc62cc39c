"""`trufor-trt serve`: the HTTP app under uvicorn, stopped gracefully by SIGTERM / SIGINT."""

import ipaddress

from trufor_trt.signals import signals_handled_by


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def serve_app(app, host: str, port: int) -> bool:
    """Serve until SIGTERM / SIGINT: uvicorn then stops accepting, answers every open request
    (the queue included) and runs the app's shutdown. False if it never started (port taken,
    warm-up failed: uvicorn has logged why)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, lifespan="on", log_level="warning",
                                           access_log=False, server_header=False))
    app.state.service.stop_server = lambda: setattr(server, "should_exit", True)  # a broken runner
    # uvicorn raises the stopping signal again once it is done; with these handlers in place that
    # lands here, and the process exits 0, as a requested stop should.
    try:
        with signals_handled_by(lambda *_: None):
            server.run()
    except SystemExit:  # uvicorn exits like this when it cannot bind
        return False
    return server.started
