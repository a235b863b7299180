"""The review web page (`garrison ui`): a small read-only HTTP server over the flow queries
(`garrison.flows`), and the static page it serves (`static/`)."""
