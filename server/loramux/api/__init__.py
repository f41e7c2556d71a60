"""gRPC servicers, pb <-> domain conversion, and error -> status mapping (no torch)."""
