"""eventhandler: a Kafka consumer worker that keeps PostgreSQL projections up to date.

Every event that fails lands in a PostgreSQL dead letter queue, from where operators replay it.
"""

__version__ = "0.1.0"
