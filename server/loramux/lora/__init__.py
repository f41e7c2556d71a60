"""Adapters: the registry on disk, the host cache, and the device slots."""
