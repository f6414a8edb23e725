"""OpenAI's API on stageserver's stages, without Flask: what ``/v1/chat/completions``
and ``/v1/responses`` accept (``requests.py``), and the two dialects that render a stage
as each streams it (``chat.py``, ``responses.py``). The views are ``web/v1.py``.
"""
