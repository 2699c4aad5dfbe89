"""The ASGI entry point for hypercorn: ``hypercorn wsgi:app``."""

from taskflow import create_app

app = create_app()
