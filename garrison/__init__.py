"""garrison: identity-aware L7 security sidecar."""

__version__ = "0.1.0"
