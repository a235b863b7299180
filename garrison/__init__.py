"""garrison: identity-aware L7 security sidecar."""

from garrison import native as _native

__version__ = "0.1.0"

# Before any compiled module can load: use the mypyc build only if it matches the sources.
COMPILED_IN_USE = _native.select()
