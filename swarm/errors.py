"""The one exception hierarchy of vllm-swarm.

Every error the package raises on purpose derives from `SwarmError`. Each message says what went wrong
and, where the user can act, what to do (`hint`). The classes are chosen so that a caller can decide
between *fallback* and *failure* by type alone: the vLLM loader falls back to disk on any `FetchError`
or `ManifestMismatchError`, and fails on `ConfigError`.
"""

from __future__ import annotations


class SwarmError(Exception):
    """Base of every error raised by vllm-swarm."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)


class ConfigError(SwarmError):
    """A bad option or environment variable: fix the configuration and start again."""


# --- manifest -------------------------------------------------------------------------------------


class ManifestError(SwarmError):
    """The tensors cannot be described as a manifest (for example, a non-contiguous tensor)."""


class ManifestMismatchError(ManifestError):
    """A peer's manifest differs from the one this rank expects; `difference` says where."""

    def __init__(self, message: str, *, difference: str, hint: str | None = None) -> None:
        self.difference = difference
        super().__init__(f"{message}: {difference}", hint=hint)


# --- control protocol -----------------------------------------------------------------------------


class ProtocolError(SwarmError):
    """A control message that is malformed, too large, or out of range."""


class VersionMismatchError(ProtocolError):
    """The peer speaks another protocol version."""

    def __init__(self, theirs: object, ours: int) -> None:
        super().__init__(
            f"peer speaks vllm-swarm protocol version {theirs!r}, this node speaks {ours}",
            hint="run the same vllm-swarm release on every instance of a swarm",
        )
        self.theirs = theirs
        self.ours = ours


class AuthError(ProtocolError):
    """A message without a valid HMAC while a cluster token is set (or with one while none is set)."""


# --- data plane -----------------------------------------------------------------------------------


class TransportError(SwarmError):
    """A channel to a peer failed (connection lost, peer gone, timeout)."""


class IntegrityError(TransportError):
    """A received piece does not match its checksum; it is discarded and fetched again."""


# --- discovery and fetching -----------------------------------------------------------------------


class DiscoveryError(SwarmError):
    """mDNS or the static peer list could not be used."""


class FetchError(SwarmError):
    """Fetching from the swarm did not complete; the caller may fall back to disk."""


class NoSeedError(FetchError):
    """No peer of this swarm key was found within the discovery time."""


class StallError(FetchError):
    """The fetch made no progress past its deadline, or no live peer holds some missing pieces."""

    def __init__(
        self,
        message: str,
        *,
        missing: list[int],
        tried: dict[str, list[int]] | None = None,
        hint: str | None = None,
    ) -> None:
        self.missing = missing
        self.tried = tried or {}
        super().__init__(message, hint=hint)
