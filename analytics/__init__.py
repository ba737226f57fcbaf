"""The analytics plugin: the analytics consumer (trips, door cycles, availability, MTBF/MTTR,
entrapments, sensor windows), its routes under /api/analytics and its gauges."""
