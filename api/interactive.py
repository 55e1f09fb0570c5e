"""``caldera chat``: an interactive terminal chat with images."""

from __future__ import annotations

import sys
from typing import Any

from caldera.engine.sampling_params import SamplingParams

HELP = """Type a message and press Enter; the reply streams as it is generated, followed by
its time to first token and speed. Commands:
  /image PATH_OR_URL   attach an image to your next message (the chat template places it;
                       writing <image> in your text, as in mistral.rs, works too)
  /reset               start a new conversation
  /help                show this text
  /exit                quit (Ctrl-D too)"""


def run_chat(engine_options: dict[str, Any], params: SamplingParams) -> int:
    from caldera.engine.llm import LLM

    llm = LLM(**engine_options)
    history: list[dict] = []
    pending_images: list[str] = []
    print(HELP, file=sys.stderr)
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
        if line == "/help":
            print(HELP, file=sys.stderr)
            continue
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
        reply, final = _stream_reply(llm, history, params)
        if final is None:
            history.pop()
            continue
        pending_images = []
        history.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
    llm.shutdown()
    return 0


def _stream_reply(llm, history: list[dict], params: SamplingParams):
    """Prints the reply as it streams, then its figures; (text, final output) or (_, None)."""
    parts: list[str] = []
    final = None
    try:
        for out in llm.stream_chat_outputs(history, params):
            delta = out.outputs[0].text_delta
            if delta:
                parts.append(delta)
                print(delta, end="", flush=True)
            final = out
    except ValueError as exc:  # bad image, template refusal, prompt too long
        print(f"[error: {exc}]", file=sys.stderr)
        return "", None
    except KeyboardInterrupt:
        print("\n[stopped]", file=sys.stderr)
        return "".join(parts), None
    print()
    if final is not None:
        m = final.metrics
        tokens = len(final.outputs[0].token_ids)
        ttft = m.time_to_first_token or 0.0
        speed = m.tokens_per_second or 0.0
        print(f"[{tokens} tokens, time to first token {ttft:.2f} s, {speed:.1f} tokens/s]",
              file=sys.stderr)
    return "".join(parts), final
