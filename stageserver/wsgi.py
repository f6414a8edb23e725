"""The standalone app, for a WSGI server: ``gunicorn ... stageserver.wsgi:app``."""

from . import create_app

app = create_app()
