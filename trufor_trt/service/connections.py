"""`serve`'s connections under hostile clients: bounded in number and in time.

uvicorn closes a keep-alive connection only while it is silent, so a client that sends half a
request line, or trickles header bytes, holds its connection (and a file descriptor) for ever;
enough of them exhaust the process's descriptors, and then every accept fails and is logged. The
HTTP protocol here (uvicorn's h11 one, subclassed) adds:
- a header deadline: a connection that has not completed a request's headers within
  `header_timeout` seconds of opening, or of its previous answer, is closed;
- a connection limit below the descriptor limit: a new connection over it displaces the
  longest-open idle one (no request in progress), or is closed at once when none is idle;
- protocol errors answered in JSON like every other error, and counted.
Request bodies have their own deadline in the app (http_app.py), which reads them.
"""

import json
import resource
from dataclasses import dataclass
from typing import Callable

# Descriptors the process keeps for itself beside its connections: the model's files, the
# results log, outputs being written, the runtime's own; and the connections accepted in one go.
RESERVED_DESCRIPTORS = 128
# asyncio accepts up to the listen backlog's count of connections per readiness of the socket,
# and may do so a few times before the first of them reach the connection limit (and those over
# it are closed): the bursts must fit in the reserve too. Measured: 64 let 260 connections at
# once exhaust 256 descriptors; 16 did not.
ACCEPT_BURST = 16
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_HEADER_TIMEOUT = 10.0


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    header_timeout: float = DEFAULT_HEADER_TIMEOUT


def descriptor_limit() -> int:
    """The process's soft limit on open files (RLIMIT_NOFILE)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def default_max_connections() -> int:
    """DEFAULT_MAX_CONNECTIONS, or fewer where the descriptor limit leaves less room."""
    return max(1, min(DEFAULT_MAX_CONNECTIONS, descriptor_limit() - RESERVED_DESCRIPTORS))


def connection_limit_problem(max_connections: int) -> str:
    """Why `max_connections` would let connections exhaust the descriptors ('' if it would not)."""
    room = descriptor_limit() - RESERVED_DESCRIPTORS
    if max_connections <= room:
        return ""
    return (f"--max-connections {max_connections} leaves fewer than {RESERVED_DESCRIPTORS} of the process's "
            f"{descriptor_limit()} file descriptors (ulimit -n; LimitNOFILE= under systemd): use at most "
            f"{max(room, 1)}, or raise the limit")


def guarded_protocol(limits: ConnectionLimits, on_reject: Callable[[str], None]):
    """uvicorn's h11 protocol class with `limits`; `on_reject(reason)` counts what it turns away."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedProtocol(H11Protocol):
        def connection_made(self, transport) -> None:
            if len(self.connections) >= limits.max_connections and not _displace_idle(self.connections):
                on_reject("too_many_connections")
                self.transport = transport  # connection_lost closes it again
                transport.abort()
                return
            super().connection_made(transport)
            self.opened = self.loop.time()
            self._arm_header_deadline()

        def _arm_header_deadline(self) -> None:
            self._cancel_header_deadline()
            self.header_deadline = self.loop.call_later(limits.header_timeout, self._headers_too_slow)

        def _cancel_header_deadline(self) -> None:
            deadline = getattr(self, "header_deadline", None)
            if deadline is not None:
                deadline.cancel()
            self.header_deadline = None

        def _headers_too_slow(self) -> None:
            if not self.transport.is_closing() and idle(self):
                on_reject("header_timeout")
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if not idle(self):  # a request's headers are in: the app has it now
                self._cancel_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_deadline()

        def connection_lost(self, exc) -> None:
            self._cancel_header_deadline()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            on_reject("bad_request")
            _send_json_400(self, msg)

    return GuardedProtocol


def idle(protocol) -> bool:
    """No request in progress on the connection (none yet, or its answer is complete)."""
    return protocol.cycle is None or protocol.cycle.response_complete


def _displace_idle(connections) -> bool:
    """Close the longest-open idle connection, if there is one; whether one was."""
    waiting = [protocol for protocol in connections if idle(protocol) and hasattr(protocol, "opened")]
    if not waiting:
        return False
    oldest = min(waiting, key=lambda protocol: protocol.opened)
    oldest.transport.close()
    oldest.connections.discard(oldest)  # its slot is free now, before connection_lost runs
    return True


def _send_json_400(protocol, message: str) -> None:
    """uvicorn's answer to a request h11 cannot parse, as JSON."""
    import h11

    body = json.dumps({"error": f"malformed HTTP request: {message}"}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                  h11.EndOfMessage()):
        protocol.transport.write(protocol.conn.send(event))
    protocol.transport.close()
