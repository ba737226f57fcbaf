"""The analytics plugin's Alembic branch (`versions/`, label `analytics`).

Databases made before the plugin had a branch of its own have its tables from the platform's
revisions: `ADOPTED_AT` says which revision of this branch they are at, by the platform's."""

ADOPTED_AT = {"0001": "analytics_0001", "0002": "analytics_0001", "0003": "analytics_0001", "0004": "analytics_0001"}
ADOPTED_IF_TABLE = "analytics_devices"
