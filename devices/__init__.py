"""Device simulators: elevators and building sensors that speak the iotgw MQTT contract."""
