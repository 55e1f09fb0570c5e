"""The ``caldera`` command: ``serve`` (the OpenAI-compatible server), ``generate`` (one-shot,
offline) and ``chat`` (interactive). mistral.rs's forms work too:
``caldera --port 1234 --isq 4 vision-plain -m MODEL`` serves, ``caldera -i vision-plain -m
MODEL`` chats."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from caldera.api.config import ServerConfig
    from caldera.engine.config import EngineConfig

# The first is the default demo: SmolLM2-135M-Instruct's trained weights in a LLaVA-1.5 shape
# (its vision tower is random); the others are the tiny random-weight test shapes.
DEMO_SHAPES = ("llava-smollm2", "llava-next-mistral", "llava-1.5", "llava-next-vicuna")
SUBCOMMANDS = ("serve", "generate", "chat")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Engine options, each the same name as the LLM(...) keyword (dashes for underscores)."""
    g = parser.add_argument_group("engine")
    g.add_argument("--model", "-m", help="local folder or Hugging Face hub id")
    g.add_argument("--demo", nargs="?", const=DEMO_SHAPES[0], choices=DEMO_SHAPES,
                   help="build (once) and use a demo checkpoint: llava-smollm2 (default; a "
                        "trained language model, random vision tower) or a tiny random shape")
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
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="shard the model over this many workers (Ray)")
    g.add_argument("--distributed-executor-backend", choices=["uni", "ray"],
                   help="uni: one in-process worker; ray: Ray worker actors (TP > 1 implies it)")
    g.add_argument("--ray-address", help="an existing Ray cluster (default: RAY_ADDRESS, or "
                                        "start a local one)")


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    from caldera.engine.config import EngineConfig

    if args.demo:
        from caldera.engine.demo_checkpoints import demo_checkpoint

        if args.demo != DEMO_SHAPES[0]:  # the trained demo's builder logs its own warning
            logging.getLogger("caldera").warning(
                "DEMO MODE: a tiny checkpoint with RANDOM weights (shape %s); its outputs are "
                "meaningless text", args.demo)
        args.model = str(demo_checkpoint(args.demo))
        if args.kv_cache_memory is None:
            args.kv_cache_memory = "1GiB"  # plenty for the tiny model, quick to allocate
    if not args.model:
        raise SystemExit("error: give --model PATH_OR_HUB_ID (or --demo)")
    names = set(EngineConfig.option_names())
    return {k: v for k, v in vars(args).items() if k in names and v is not None
            and not (k == "allowed_local_media_paths" and not v)}


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


def add_server_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: "
                                                       "127.0.0.1; 0.0.0.0 for every interface)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", nargs="+", action="extend", default=[],
                   help="name(s) clients may send as 'model' (default: the --model value); "
                        "'default' is always accepted")
    g.add_argument("--api-key", default=os.environ.get("CALDERA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $CALDERA_API_KEY)")
    g.add_argument("--allow-private-media-urls", action="store_true",
                   help="let image URLs reach loopback/private/link-local addresses")
    g.add_argument("--limit-images-per-prompt", type=int, default=8)
    g.add_argument("--max-queued-requests", type=int,
                   help="refuse (429) requests beyond this many waiting (default: no limit)")
    g.add_argument("--media-fetch-timeout", type=float, default=10.0,
                   help="seconds to fetch one image URL, in all")
    g.add_argument("--max-image-bytes", default="20MiB", help="largest image file, e.g. 20MiB")
    g.add_argument("--max-image-pixels", type=int, default=50_000_000,
                   help="largest image, width x height, checked before decoding")
    g.add_argument("--allowed-origins", nargs="+", action="extend", default=[],
                   help="origins allowed by CORS (browsers on other sites)")
    g.add_argument("--no-ui", dest="ui", action="store_false", help="do not serve the web page")
    g.add_argument("--image-workers", type=int,
                   help="processes that decode and preprocess images (default: one per four "
                   "cores, 1 to 4; 0: threads of the API process)")
    g.add_argument("--image-cache", default="512MiB",
                   help="room for images sent again, kept decoded and preprocessed (keyed by "
                   "their bytes), e.g. 2GiB; 0: decode every image")
    g.add_argument("--uvicorn-log-level", default="warning")


def cmd_serve(args: argparse.Namespace) -> int:
    from caldera.api.launcher import serve

    server, engine = serve_configs(args)
    return serve(server, engine, uvicorn_log_level=args.uvicorn_log_level)


def serve_configs(args: argparse.Namespace) -> tuple[ServerConfig, EngineConfig]:
    """The server's and the engine's configs from ``serve``'s options (also read by the Ray
    Serve application, caldera.deploy.serve)."""
    from caldera.api.config import ServerConfig
    from caldera.engine.config import EngineConfig, parse_bytes

    options = engine_options(args)
    names = tuple(args.served_model_name) or (
        f"demo-{args.demo}" if args.demo else args.model,)
    server = ServerConfig(
        host=args.host, port=args.port, served_model_names=names, api_key=args.api_key or None,
        allowed_local_media_paths=tuple(args.allowed_local_media_paths),
        allow_private_media_urls=args.allow_private_media_urls,
        limit_images_per_prompt=args.limit_images_per_prompt,
        max_queued_requests=args.max_queued_requests,
        media_fetch_timeout=args.media_fetch_timeout,
        max_image_bytes=parse_bytes(args.max_image_bytes),
        max_image_pixels=args.max_image_pixels,
        allowed_origins=tuple(args.allowed_origins), ui=args.ui,
        image_cache_bytes=parse_bytes(args.image_cache),
        **({} if args.image_workers is None else {"image_workers": args.image_workers}),
    )
    return server, EngineConfig(**_engine_config_options(options))


def _engine_config_options(options: dict[str, Any]) -> dict[str, Any]:
    options = dict(options)
    if options.get("isq") is not None:
        options["isq"] = str(options["isq"])
    if "allowed_local_media_paths" in options:
        options["allowed_local_media_paths"] = tuple(options["allowed_local_media_paths"])
    return options


def rewrite_seed_form(argv: list[str]) -> list[str]:
    """mistral.rs's ``[OPTIONS] vision-plain -m MODEL [-a ARCH]`` -> ``serve`` (or ``chat``
    with ``-i``/``--interactive-mode``) with the same options. Other argv is returned as is."""
    if "vision-plain" not in argv or any(a in SUBCOMMANDS for a in argv):
        return argv
    at = argv.index("vision-plain")
    before, after = argv[:at], argv[at + 1:]
    interactive = any(a in ("-i", "--interactive-mode") for a in before)
    before = [a for a in before if a not in ("-i", "--interactive-mode")]
    rest: list[str] = []
    skip = False
    for i, arg in enumerate(after):
        if skip:
            skip = False
            continue
        if arg in ("-a", "--arch"):  # read from config.json; accepted for compatibility
            skip = i + 1 < len(after)
            continue
        if arg.startswith("--arch="):
            continue
        rest.append(arg)
    logs = [a for a in before if a.startswith("--log-level")]
    if logs:
        before = [a for a in before if not a.startswith("--log-level")]
    command = "chat" if interactive else "serve"
    if interactive:  # chat has no server options
        before = _drop_server_options(before)
    return [*logs, command, *before, *rest]


def _drop_server_options(args: list[str]) -> list[str]:
    with_value = {"--port", "--host", "--served-model-name", "--api-key"}
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in with_value:
            skip = True
            continue
        if arg.split("=", 1)[0] in with_value:
            continue
        out.append(arg)
    return out


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
    serve = sub.add_parser("serve", help="the OpenAI-compatible HTTP server")
    add_engine_args(serve)
    add_server_args(serve)
    serve.set_defaults(func=cmd_serve)
    bench = sub.add_parser("bench", help="benchmarks against a running server")
    from caldera.benchmarks.bench_serve import add_parser as add_bench_serve

    add_bench_serve(bench.add_subparsers(dest="bench_command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(rewrite_seed_form(argv))
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # a user's mistake: say it, no traceback
        print(f"caldera: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
