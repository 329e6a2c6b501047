"""Database backends of the platform's own (``settings.DATABASES``)."""
