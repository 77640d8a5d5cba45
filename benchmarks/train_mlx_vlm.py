"""mlx-vlm's own training command (`python -m mlx_vlm.train`), with the two fixes its LLaVA path
needs to run, nothing else changed:

- its processor forwards tokenizer kwargs that transformers 5's image processor refuses
  (worker_mlx_vlm._mlx_vlm_compat, as the offline benchmark does);
- its LLaVA model hands the batch's (batch, length) padding mask to the attention as its mask,
  which fails to broadcast for a batch of several (and, for one, replaces the causal mask): the
  mask is dropped so that the decoder builds its causal one (the padding is on the right, so no
  trained position attends to it).

    python -m benchmarks.train_mlx_vlm MLX_VLM_TRAIN_ARGS...
"""

from __future__ import annotations

import sys

from .worker_mlx_vlm import _mlx_vlm_compat


def main(argv):
    import mlx_vlm.train as train

    load = train._load_model

    def loaded(task, path):
        model, processor = load(task, path)
        _mlx_vlm_compat(processor)
        return model, processor

    train._load_model = loaded
    from mlx_vlm.models.llava import llava

    call = llava.Model.__call__
    llava.Model.__call__ = lambda self, input_ids, pixel_values, mask, cache=None, **kw: call(
        self, input_ids, pixel_values, None, cache, **kw
    )
    sys.argv = ["mlx_vlm.train", *argv]
    return train.main()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
