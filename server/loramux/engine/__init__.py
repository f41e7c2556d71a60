"""Requests, scheduling and the step loop (the scheduler holds no torch and no gRPC)."""
