"""Every reach into aioquic's private state, in one place, probed at import.

aioquic (chatlib.webtransport) buffers whatever is written to a stream, without bound, until
the peer acknowledges it; it says nothing about how much waits, nor when the peer
acknowledges it. The stuck-client rule and the write high-water mark need both, as
chatlib.fastpath reads them from asyncio's and the kernel's buffers for TCP. The client
also needs the server's certificate, to compare its hash with the one the server
announced (a browser's ``serverCertificateHashes``). Each function here reads one private
attribute; :data:`MISSING` names the ones the installed aioquic lacks (then WebTransport
refuses to start: without them a client that stops reading could grow memory without bound).
"""

from __future__ import annotations

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.stream import QuicStreamSender


def _probe() -> list[str]:
    missing = []
    sender = QuicStreamSender(0, True)
    for name in ("_buffer_start", "_buffer_stop"):
        if not isinstance(getattr(sender, name, None), int):
            missing.append(f"QuicStreamSender.{name}")
    connection = QuicConnection(configuration=QuicConfiguration(is_client=True))
    for name in ("_streams", "_datagrams_pending"):
        if not hasattr(connection, name):
            missing.append(f"QuicConnection.{name}")
    return missing


MISSING: list[str] = _probe()
"""The private attributes this aioquic lacks ([] for the pinned versions)."""


def stream_backlog(quic: QuicConnection, stream_id: int) -> tuple[int, int]:
    """``(waiting, acked)`` for a stream we write: bytes written and not yet acknowledged
    by the peer (queued or in flight), and the offset up to which it acknowledged all."""
    stream = quic._streams.get(stream_id)
    if stream is None:
        return 0, 0
    sender = stream.sender
    return sender._buffer_stop - sender._buffer_start, sender._buffer_start


def datagrams_pending(quic: QuicConnection) -> int:
    """Datagrams queued and not sent yet (congestion control holds them; no bound)."""
    return len(quic._datagrams_pending)


def peer_certificate_der(quic: QuicConnection) -> bytes | None:
    """The peer's certificate (DER) once the handshake is done, else None."""
    certificate = getattr(getattr(quic, "tls", None), "_peer_certificate", None)
    if certificate is None:
        return None
    from cryptography.hazmat.primitives.serialization import Encoding

    return certificate.public_bytes(Encoding.DER)
