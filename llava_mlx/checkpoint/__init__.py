"""Everything that reads and writes weights, bottom up: files (JSON, safetensors, .bin) → hub
(where a checkpoint is) → validate → layouts (configs and weight names of every layout) →
lora, adapters (checkpoints that need a base) → load → quantize, convert."""
