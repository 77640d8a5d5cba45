"""llava-mlx's benchmarks: one command (`python bench.py` or `python -m benchmarks`), six suites.

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
- constrained.py      a JSON schema's cost per token, and its compile time
- admission.py        a running answer's pauses while a newcomer's picture or clip is admitted
- train.py            fine-tuning against mlx-vlm's trainer (LoRA, QLoRA, full; OneVision LoRA):
  train_mlx_vlm.py      mlx-vlm's trainer, as its own command runs it
  train_onevision.py    the small OneVision model, in both codes' layouts
  train_steps.py        where a step of ours goes
- s2.py               one LLaVA-1.5-S2 picture's encode against a plain LLaVA-1.5 picture
- report.py           docs/benchmarks.md and benchmarks.json from every suite's record:
  report_offline.py     the offline section and benchmark.png
  report_serving.py     the serving section and benchmark-serving.png
- cli.py              the command line
"""
