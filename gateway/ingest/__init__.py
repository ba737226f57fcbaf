"""Ingestion: the MQTT client that acknowledges after commit (`client`), the pipeline from a
message to stored events (`pipeline`), admission (`admission`: rate limits, the device registry)
and the MQTT connection settings (`mqtt`)."""
