"""The consumer runtime (gateway.router is its one import path)."""
