"""The wire protocol between dispatcher, agents and collector: length-framed
msgpack messages with explicit size limits, a mutual pre-shared-key handshake,
and a MAC on every message after it (GMAC, or HMAC-SHA256 where libcrypto lacks
AES-GCM: no injection, replay or reordering)."""

from .channel import (MAX_CONTROL_BYTES, MAX_DATA_BYTES, PROTOCOL_VERSION, AuthError, Channel, PeerClosed,
                      PeerUnreachableError, ProtocolError, accept, connect, load_key, new_key, parse_address)

__all__ = ["MAX_CONTROL_BYTES", "MAX_DATA_BYTES", "PROTOCOL_VERSION", "AuthError", "Channel", "PeerClosed",
           "PeerUnreachableError", "ProtocolError",
           "accept", "connect", "load_key", "new_key", "parse_address"]
