"""Flow records (Hubble's field names), their builders, redaction, rendering, store, access log.

Everything here is pure except `writer` and `reader` (file I/O). The proxy engine and the
datapath event reader build records with `garrison.flows.build`; the server stores them in a
`FlowStore` and writes them with an `AccessLogWriter`. `query` filters flows, `render` and
`export` print them, `summary` sums them up for a review.

The package imports nothing itself: importing a pure module of it (`record`, `build`,
`query`) must not load the I/O ones (tests/unit/test_layers.py).
"""
