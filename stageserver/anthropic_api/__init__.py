"""Anthropic's Messages API on stageserver's stages, without Flask: what ``POST
/v1/messages`` and ``/v1/messages/count_tokens`` accept and the conversation each becomes
(``requests.py``, by the table of ``fields.py``), the dialect that renders a stage as the
Messages API streams it (``messages.py``), its errors' shape (``errors.py``), its
models' listing (``models.py``) and the ``anthropic-beta`` names it knows
(``betas.py``). The views are ``web/messages.py``.
"""
