"""The durable log and its schema (gateway.store is the one import path for all of it)."""
