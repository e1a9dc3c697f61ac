"""headspace-watcher: every turn of every Claude Code session into PostgreSQL, exactly once."""

__version__ = "0.1.0"
