"""Cultural insiders' review of candidate LoRAs (issue 27): blind pairwise campaigns built from the
evaluation's own images, invitations with secret tokens, and the store that keeps every rating.

`store`: the database (SQLAlchemy; SQLite by default, PostgreSQL by URL), its schema versioned with
Alembic. `campaigns`: opening a campaign for a culture's candidate, inviting and revoking reviewers.
"""
