"""One orchestrator per study: an exclusive lock beside agent_state.json.

Two orchestrators on the same agent_state.json would hand out the same run ids and
overwrite each other's state. The lock is nas_agent.lock's flock on `agent_state.json.lock`
(freed by the kernel when its holder dies; its content names the holder for a refused user).
Keep the study on a local disk: flock on a network file system may be local to one host.
"""
from __future__ import annotations

from pathlib import Path

from nas_agent.lock import ExclusiveLock, LockHeld

__all__ = ["LockHeld", "StudyLock"]


class StudyLock(ExclusiveLock):
    """Exclusive, non-blocking lock on a study's state file; use as `with StudyLock(path):`."""

    def __init__(self, state_path: Path):
        self.state_path = Path(state_path)
        super().__init__(self.state_path.with_name(self.state_path.name + ".lock"), resource=self.state_path,
                         holder="orchestrator")
