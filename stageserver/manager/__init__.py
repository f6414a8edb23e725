"""The stage manager: the one owner of a stage's life in a process.

- ``stage_manager.py``: ``StageManager``, which starts a stage, finds, forgets and
  cancels one, and ends the process's stages and background work (``close``); and
  ``manager_of``, which finds an app's;
- ``handles.py``: a stage of this process as a request sees it (``LocalStage``,
  ``StartedStage``: ``StageHandle``s, stages/handle.py);
- ``takeover.py``: the takeover of a stage whose worker died or drained (``Takeovers``);
- ``making.py``: a stage made from its spec, with its relay and its listeners, whether
  a request starts it or it is taken over (``StageMaker``).

The store it holds, always, is a ``StageStore`` (``store/stage_store.py``).
"""

from .stage_manager import StageManager, manager_of

__all__ = ["StageManager", "manager_of"]
