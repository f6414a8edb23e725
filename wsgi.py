"""stageserver's app, for gunicorn in a checkout: ``gunicorn wsgi:app``.

gunicorn reads ``./gunicorn.conf.py`` by itself, so that command runs stageserver with its
settings and the gevent worker. Installed, the app is ``stageserver.wsgi:app`` (which this
is), with ``-c python:stageserver.gunicorn_conf``.
"""

from stageserver.wsgi import app

__all__ = ["app"]
