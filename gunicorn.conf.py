"""gunicorn's settings for stageserver in a checkout, which gunicorn reads from the current
folder by itself: ``gunicorn wsgi:app``. They are the package's own
(``stageserver/gunicorn_conf.py``: the gevent worker, the ``STAGESERVER_*`` process
settings, the shutdown hooks), which an installed stageserver names with
``-c python:stageserver.gunicorn_conf``.
"""

from stageserver.gunicorn_conf import *  # noqa: F403
