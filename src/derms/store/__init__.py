"""Layer 5: persistence. SQLAlchemy 2 models, Alembic migrations, time-series read/write.

SQLite (embedded default, a file in the data directory) or PostgreSQL (psycopg 3).
Imports nothing from derms except :mod:`derms.errors` and :mod:`derms.config`.
"""
