"""The pure core: the device protocol, normalisation into events, the event type and its
CloudEvent form, device types and units, the clock. No I/O and no database."""
