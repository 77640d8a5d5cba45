"""llava-mlx's benchmarks: one command (`python bench.py` or `python -m benchmarks`), two suites.

- checkpoints.py      synthetic llava-hf checkpoints and test pictures (nothing downloaded)
- offline.py          one request at a time, each implementation in its own process:
  worker.py             the subprocess entry point and what the workers share
  worker_llava_mlx.py   llava-mlx
  worker_mlx_vlm.py     mlx-vlm
  worker_transformers.py  transformers / PyTorch
  roofline.py           the MLX backend's matrix-vector bandwidth
- serving.py          this project's server against mlx-vlm's under concurrent OpenAI clients:
  servers.py            start / stop each server on a free loopback port
  load.py               the client load (streamed requests, concurrency levels, the second turn)
- report.py           docs/benchmarks.md and benchmarks.json from every suite's record:
  report_offline.py     the offline section and benchmark.png
  report_serving.py     the serving section and benchmark-serving.png
- cli.py              the command line
"""
