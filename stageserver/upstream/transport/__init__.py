"""The HTTP transports beneath the openai client: httpx's one-method seam
(``httpx2.BaseTransport.handle_request``) and two implementations.

- ``httptools.py``: HTTP/1.1 parsed by llhttp, for ``http://`` upstreams (the default);
- ``sharded.py``: httpx2's own transport in small shards, for ``https://`` and for
  ``STAGESERVER_UPSTREAM_TRANSPORT=httpx``;
- ``connections.py``: the keep-alive connections of the first, and the reaper both use.
"""
