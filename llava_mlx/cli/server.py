"""An OpenAI-compatible LLaVA server: `python server.py --model PATH_OR_REPO`.

The command line: it loads the model in the engine thread (server/engine.py), then serves
HTTP (server/http.py) until interrupted. Requests are checked and prepared by
server/request.py; KV reuse across requests lives in server/cache.py. The engine batches
(server/batching.py), or with --kv-bits serves one request at a time through stream_generate
(server/serial.py). Under mlx.launch with several ranks, rank 0 serves HTTP and the others
follow (server/lockstep.py).
"""

import argparse
import logging
import os
import signal
import sys
import threading
from functools import partial
from pathlib import Path

from ..checkpoint.load import load
from ..distributed.group import label, launched
from ..errors import LlavaError
from ..server.batching import BatchScheduler
from ..server.engine import Engine, EngineOptions
from ..server.http import App, Handler, Server
from ..server.lockstep import LockstepCoordinator
from ..server.request import Limits
from ..server.serial import SerialScheduler

log = logging.getLogger("llava_mlx.server")


def build_parser() -> argparse.ArgumentParser:
    d, o = Limits(), EngineOptions()
    p = argparse.ArgumentParser(
        description="An OpenAI-compatible LLaVA server (MLX), with a chat page at /.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="local checkpoint directory or Hugging Face repo id")
    p.add_argument("--vision-tower", default=None, help="CLIP tower path or repo id (original LLaVA-1.5 layout)")
    p.add_argument("--model-base", default=None, help="base model of a LoRA or projector-only checkpoint")
    p.add_argument(
        "--pipeline", action="store_true", help="under mlx.launch: pipeline- instead of tensor-parallel decoder"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (0: any free port, printed at start)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 (none: no key)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="default and largest max_tokens of a request")
    p.add_argument("--max-batch", type=int, default=o.max_batch, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=o.max_queue, help="requests waiting for a batch slot before 429")
    p.add_argument(
        "--prefill-step-size",
        type=int,
        default=o.prefill_step_size,
        help="positions prefilled per chunk at most (while answers run, chunks are sized to --admission-budget)",
    )
    p.add_argument(
        "--admission-budget",
        type=float,
        default=o.admission_budget,
        help="seconds: while answers are running, a newcomer's picture and prompt are worked on in units of "
        "about this long (or 8 decode steps' time, if longer), with a decode step between two",
    )
    p.add_argument(
        "--kv-bits",
        type=int,
        choices=(4, 8),
        default=None,
        help="quantize the KV cache (requests are then served one at a time)",
    )
    p.add_argument(
        "--prompt-cache-bytes", type=int, default=o.prompt_cache_bytes, help="LRU prompt (KV) cache size; 0 disables it"
    )
    p.add_argument("--max-images", type=int, default=d.max_images, help="images per request")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="width x height of one image")
    p.add_argument(
        "--max-videos", type=int, default=d.max_videos, help="videos per request (video_url parts; video models)"
    )
    p.add_argument("--num-frames", type=int, default=d.num_frames, help="frames sampled uniformly from each video")
    p.add_argument(
        "--max-body-mb",
        type=float,
        default=d.max_body_bytes / (1 << 20),
        help="request body (and image URL download) size",
    )
    p.add_argument(
        "--image-url-timeout", type=float, default=d.image_url_timeout, help="seconds to download one image URL"
    )
    p.add_argument(
        "--allow-private-image-urls",
        action="store_true",
        help="also fetch image URLs on loopback, private, link-local and other non-public addresses "
        "(off: a client cannot make this machine request its own or its network's services)",
    )
    p.add_argument(
        "--allowed-origins", nargs="*", default=[], help="web origins allowed to call the API (CORS), or '*'"
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="server log verbosity (stderr)",
    )
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_videos < 0:
        parser.error("--max-videos must not be negative")
    for name in (
        "max_tokens",
        "max_batch",
        "max_queue",
        "prefill_step_size",
        "max_images",
        "max_image_pixels",
        "num_frames",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_body_mb <= 0 or args.image_url_timeout <= 0 or args.prompt_cache_bytes < 0:
        parser.error("--max-body-mb and --image-url-timeout must be positive, --prompt-cache-bytes not negative")
    if not args.admission_budget > 0:
        parser.error("--admission-budget must be positive (seconds)")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    options = EngineOptions(
        args.max_batch,
        args.max_queue,
        args.prefill_step_size,
        args.prompt_cache_bytes,
        kv_bits=args.kv_bits,
        admission_budget=args.admission_budget,
    )
    # mlx-lm's BatchGenerator cannot batch quantized KV caches: one request at a time, as mlx-lm's server does.
    scheduler = SerialScheduler if args.kv_bits else BatchScheduler
    coordinator = None
    if launched():  # several ranks: rank 0 serves HTTP, the others follow its engine
        if args.kv_bits:
            print("error: --kv-bits cannot be served over several ranks (mlx.launch); leave it out", file=sys.stderr)
            return 2
        coordinator = LockstepCoordinator()
    load_model = partial(
        load, args.model, vision_tower=args.vision_tower, model_base=args.model_base, pipeline=args.pipeline
    )
    engine = Engine(load_model, options, scheduler, coordinator)
    limits = Limits(
        args.max_tokens,
        args.max_images,
        args.max_image_pixels,
        int(args.max_body_mb * (1 << 20)),
        args.image_url_timeout,
        args.allow_private_image_urls,
        args.max_videos,
        args.num_frames,
    )
    try:
        engine.start()
    except LlavaError as e:
        engine.stop()
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not engine.coordinator.main:
        return follow(engine)
    me = label(engine.model)
    model_id = Path(args.model).resolve().name if Path(args.model).is_dir() else args.model
    app = App(engine, limits, model_id, args.api_key, args.allowed_origins)
    try:
        httpd = Server((args.host, args.port), partial(Handler, app=app))
    except OSError as e:
        engine.stop()
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    host, port = httpd.server_address[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        log.warning("listening on %s without --api-key: anyone who can reach it can use it", args.host)
    print(
        f"llava-mlx: serving {app.model_id} on http://{host}:{port} (chat page /, API /v1)", file=sys.stderr, flush=True
    )

    def terminated(signum, frame):  # the engine stops at its next step; the listener within 0.5 s
        engine.stopping.set()
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, terminated)
    if engine.coordinator.exits_on_failure:
        threading.Thread(target=stop_when_the_engine_fails, args=(engine, httpd), daemon=True).start()
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        print("llava-mlx: stopped", file=sys.stderr)
    finally:
        httpd.server_close()
        engine.stop()  # what is still waiting gets a 503
        if not app.drain(DRAIN_TIMEOUT):
            log.warning("some requests were still answering after %g s", DRAIN_TIMEOUT)
    if engine.failure:  # the waiting requests got a 503 saying so
        print(f"error: {me}{engine.failure}; restart the {'whole launch' if me else 'server'}", file=sys.stderr)
        return 1
    return 0


def stop_when_the_engine_fails(engine, httpd):
    """Under mlx.launch, a server whose engine ended on an error (a lost rank) exits non-zero,
    so that mlx.launch ends the whole launch, which cannot go on without that rank."""
    engine.thread.join()
    if engine.failure:
        httpd.shutdown()


DRAIN_TIMEOUT = 5.0  # s the requests in flight get, when the server stops, to send their last words
FOLLOWER_GRACE = 20.0  # s a follower waits, once signalled, for rank 0 to tell it to stop


def follow(engine: Engine) -> int:
    """A rank other than 0: no port, its engine runs what rank 0 shares until rank 0 stops."""
    me = label(engine.model)

    def signalled(signum, frame):
        # Rank 0 got the same signal (mlx.launch, Ctrl-C) and tells this rank to stop, so
        # that no rank leaves a collective half done. If it cannot (it died), leave anyway.
        def leave():
            print(f"error: {me}rank 0 did not stop this rank within {FOLLOWER_GRACE:g} s", file=sys.stderr, flush=True)
            os._exit(1)

        timer = threading.Timer(FOLLOWER_GRACE, leave)
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, signalled)
    signal.signal(signal.SIGINT, signalled)
    print(f"llava-mlx: {me}following rank 0", file=sys.stderr, flush=True)
    engine.thread.join()
    engine.stop()
    if engine.failure or not engine.coordinator.halted:
        print(
            f"error: {me}{engine.failure or 'the engine stopped before rank 0 told it to'}; restart the whole launch",
            file=sys.stderr,
        )
        return 1
    return 0
