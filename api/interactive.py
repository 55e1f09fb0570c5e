"""``caldera chat``: an interactive terminal chat with images.

Type a message and press Enter. Commands: ``/image PATH_OR_URL`` attaches an image to your
next message (the chat template places its ``<image>``; writing ``<image>`` yourself, as in
mistral.rs, works too), ``/reset`` starts over, ``/exit`` (or Ctrl-D) quits.
"""

from __future__ import annotations

import sys
from typing import Any

from caldera.engine.sampling_params import SamplingParams


def run_chat(engine_options: dict[str, Any], params: SamplingParams) -> int:
    from caldera.engine.llm import LLM

    llm = LLM(**engine_options)
    history: list[dict] = []
    pending_images: list[str] = []
    print(__doc__.split("\n\n", 1)[1].strip(), file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            break
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history, pending_images = [], []
            continue
        if line.startswith("/image "):
            pending_images.append(line.split(" ", 1)[1].strip())
            print(f"[image attached: {len(pending_images)} pending]", file=sys.stderr)
            continue
        content: list[dict] = [{"type": "image_url", "image_url": {"url": src}}
                               for src in pending_images]
        content.append({"type": "text", "text": line})
        history.append({"role": "user", "content": content})
        reply = []
        try:
            for delta in llm.stream_chat(history, params):
                reply.append(delta)
                print(delta, end="", flush=True)
        except ValueError as exc:  # bad image, template refusal, prompt too long
            history.pop()
            print(f"[error: {exc}]", file=sys.stderr)
            continue
        print()
        pending_images = []
        history.append({"role": "assistant", "content": [{"type": "text",
                                                           "text": "".join(reply)}]})
    llm.shutdown()
    return 0
