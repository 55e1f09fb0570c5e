"""The ``caldera`` command: ``generate`` (one-shot, offline) and ``chat`` (interactive)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

DEMO_SHAPES = ("llava-next-mistral", "llava-1.5", "llava-next-vicuna")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Engine options, each the same name as the LLM(...) keyword (dashes for underscores)."""
    g = parser.add_argument_group("engine")
    g.add_argument("--model", "-m", help="local folder or Hugging Face hub id")
    g.add_argument("--demo", nargs="?", const=DEMO_SHAPES[0], choices=DEMO_SHAPES,
                   help="build (once) and use a tiny random-weight checkpoint of this shape")
    g.add_argument("--revision")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--max-model-len", type=int)
    g.add_argument("--max-num-seqs", type=int, default=128)
    g.add_argument("--max-num-batched-tokens", type=int, default=4096)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--kv-cache-memory", help="KV cache size on CPU, e.g. 4GiB")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching",
                   action="store_false")
    g.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--isq", help="in-situ quantization: 4, 8, int4, int8 (or Q4K-style names)")
    g.add_argument("--isq-group-size", type=int)
    g.add_argument("--chat-template",
                   help="Jinja file, JSON file with a chat_template key, or llava-1.5/vicuna/mistral")
    g.add_argument("--allowed-local-media-path", dest="allowed_local_media_paths",
                   action="append", default=[], help="folder local images may be read from")


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    from caldera.engine.config import EngineConfig

    if args.demo:
        from caldera.engine.demo_checkpoints import demo_checkpoint

        logging.getLogger("caldera").warning(
            "DEMO MODE: serving a tiny checkpoint with RANDOM weights (shape %s); its outputs "
            "are meaningless text", args.demo)
        args.model = str(demo_checkpoint(args.demo))
        if args.kv_cache_memory is None:
            args.kv_cache_memory = "1GiB"  # plenty for the tiny model, quick to allocate
    if not args.model:
        raise SystemExit("error: give --model PATH_OR_HUB_ID (or --demo)")
    names = set(EngineConfig.option_names())
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def _sampling(args: argparse.Namespace):
    from caldera.engine.sampling_params import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_tokens, repetition_penalty=args.repetition_penalty,
                          seed=args.sampling_seed)


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--sampling-seed", type=int)


def cmd_generate(args: argparse.Namespace) -> int:
    from caldera.engine.llm import LLM

    llm = LLM(**engine_options(args))
    images: list[Any] = list(args.image)
    if not images and args.demo:
        images = [_demo_image()]
    if args.raw:  # the prompt is sent as written: one <image> per image
        out = llm.generate({"prompt": args.prompt, "images": images}, _sampling(args),
                           use_tqdm=False)[0]
    else:  # through the chat template, which places the images unless the text has <image>
        content = [{"type": "image", "image": image} for image in images]
        content.append({"type": "text", "text": args.prompt})
        out = llm.chat([{"role": "user", "content": content}], _sampling(args),
                       use_tqdm=False)[0]
    completion = out.outputs[0]
    print(completion.text)
    m = out.metrics
    print(f"[{len(completion.token_ids)} tokens, finish={completion.finish_reason}, "
          f"ttft={m.time_to_first_token or 0:.3f}s, {m.tokens_per_second or 0:.1f} tok/s]",
          file=sys.stderr)
    return 0


def _demo_image():
    """A synthetic picture for the demo when no image is given."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:480, 0:640]
    rgb = np.stack([x * 255 // 640, y * 255 // 480, (x + y) * 255 // 1120], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def cmd_chat(args: argparse.Namespace) -> int:
    from caldera.api.interactive import run_chat

    return run_chat(engine_options(args), _sampling(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caldera", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="one generation, offline")
    add_engine_args(gen)
    add_sampling_args(gen)
    gen.add_argument("--prompt", "-p", default="What is shown in this image?")
    gen.add_argument("--raw", action="store_true",
                     help="send the prompt as written instead of through the chat template")
    gen.add_argument("--image", "-i", action="append", default=[],
                     help="image path, URL or data: URL (repeatable)")
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="interactive terminal chat")
    add_engine_args(chat)
    add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # a user's mistake: say it, no traceback
        print(f"caldera: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
