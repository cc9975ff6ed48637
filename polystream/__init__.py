"""
polystream: keep a PostgreSQL database in step with Polymarket's market channel.

Importing this package, or any module in it, opens, reads and starts nothing;
everything is built in :func:`polystream.app.run`.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
