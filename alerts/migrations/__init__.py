"""The alerts plugin's Alembic branch (`versions/`, label `alerts`).

Databases made before the plugin had a branch of its own have its tables from the platform's
revisions: `ADOPTED_AT` says which revision of this branch they are at, by the platform's."""

ADOPTED_AT = {"0001": "alerts_0001", "0002": "alerts_0001", "0003": "alerts_0002", "0004": "alerts_0003"}
ADOPTED_IF_TABLE = "alerts"
