"""Alert rules, the alert engine and maintenance dispatch (consumers of the event log)."""
