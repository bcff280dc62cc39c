"""`trufor-trt serve`: the HTTP app under uvicorn, stopped gracefully by SIGTERM / SIGINT."""

import ipaddress
import signal

from .signals import STOP_SIGNALS


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
    # uvicorn raises the stopping signal again once it is done; with these handlers in place that
    # lands here, and the process exits 0, as a requested stop should.
    previous = {number: signal.signal(number, lambda *_: None) for number in STOP_SIGNALS}
    try:
        server.run()
    except SystemExit:  # uvicorn exits like this when it cannot bind
        return False
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return server.started
