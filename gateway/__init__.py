"""iotgw: an IoT event gateway (MQTT in, durable normalised events out)."""

__version__ = "0.1.0"
