"""The OpenAI-compatible server: http (framing, routes) → request (parsing, prompts) → engine (one
thread owning MLX; serial.py one request at a time, lockstep.py under mlx.launch) → cache (prompt
KV reuse). The command line is cli/server.py."""
