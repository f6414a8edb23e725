"""Every dialect stageserver speaks, as one set: the seed's (``POST /chat``), Chat
Completions' and Responses' (``openai_api/``), and Anthropic's Messages
(``anthropic_api/``).

``StageServer.init_app`` gives this set to the stage manager it makes
(``StageManager(..., dialects=DIALECTS)``), so that every worker can take over, end or
read back a stage of any of them, whatever modules it happened to import. A new dialect
joins here (``docs/contributing.md``, "Adding a dialect").
"""

from __future__ import annotations

from .anthropic_api.messages import MessagesDialect
from .openai_api.chat import ChatCompletionsDialect
from .openai_api.responses import ResponsesDialect
from .stages.dialect import Dialects
from .stages.events import SeedDialect

DIALECTS = Dialects((SeedDialect, ChatCompletionsDialect, ResponsesDialect, MessagesDialect))
