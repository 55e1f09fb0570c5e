"""Child processes that end with their parent: the engine process and the image workers are
told to stop when the server stops cleanly, but a parent killed with SIGKILL (or by the OOM
killer) tells them nothing, and a child blocked outside its command loop (loading a model,
say) would otherwise live on."""

from __future__ import annotations

import os
import threading
import time


def exit_when_orphaned(interval: float = 1.0) -> None:
    """Starts a daemon thread that ends this process once its parent is gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
