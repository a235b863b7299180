"""Security identities: labels → numbers, reserved and CIDR identities, the label filter.

The package imports nothing itself, so importing the pure `model` and `filter` does not load
the allocator and its key-value store (tests/unit/test_layers.py).
"""
