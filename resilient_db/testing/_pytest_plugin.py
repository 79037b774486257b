"""pytest fixtures for resilient_db and its users."""
