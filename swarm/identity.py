"""A member's identity: an Ed25519 key pair made when the node starts, and the peer id derived from it.

Peer ids name members everywhere: the scheduler's peers, data channels, peer exchange, `swarm status`.
An id that is a digest of a public key cannot be claimed by anyone who lacks the private key, with a
cluster token or without one: the control session's handshake (swarm/protocol.py `Session`) and the TCP
data channel's credentials (swarm/transport/tcp.py) each carry a signature over fresh nonces of both ends,
so an id read from `swarm status`, an advert or a recorded frame is worth nothing to anyone else.

Limits: the key lives as long as the process (a restarted member is a new member); an id is 64 bits of
SHA-256, so making a key whose id equals a given one costs about 2^64 key generations. Nothing here
encrypts.
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

ID_CHARS = 16
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64


def peer_id_of(public: bytes) -> str:
    """The peer id that belongs to an Ed25519 public key (16 hex characters)."""
    return hashlib.sha256(b"vllm-swarm-id" + public).hexdigest()[:ID_CHARS]


class Identity:
    """A fresh key pair; `id` is the peer id it proves."""

    def __init__(self) -> None:
        self._key = Ed25519PrivateKey.generate()
        self.public = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.id = peer_id_of(self.public)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


def verify(public: bytes, signature: bytes, data: bytes) -> bool:
    """True when `signature` is `public`'s over `data`; False for any malformed key or signature."""
    if len(public) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True
