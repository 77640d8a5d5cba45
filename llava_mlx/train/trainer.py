"""The training loop, with transformers' Trainer's step rules (what the original's losses depend on).

An epoch is the records in their order (data.order) cut into batches of
per_device_train_batch_size per rank; an optimizer step is taken every
gradient_accumulation_steps batches, counted over the whole run (a batch left over at an
epoch's end joins the next epoch's first step, as in the Trainer), or at an epoch's last batch
when an epoch has no more batches than that; each batch's gradient is that of its mean loss
over its unmasked tokens (all ranks' together: under mlx.launch the ranks share the batch and
its gradient, as one process with the whole batch), divided by gradient_accumulation_steps;
the global norm is clipped, AdamW updates, and the learning rate follows the schedule by
optimizer step. Training stops at max_steps (from num_train_epochs when not given).

Each step runs whole: Ctrl-C or SIGTERM during a step acts once it is done, and the last whole
step is saved as a checkpoint before the command stops.
"""

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..errors import warn
from ..signals import signals_held
from .data import Example, order
from .loss import Batch, loss_sum, make_batch, tower_features
from .optim import clip, optimizer, schedule
from .save import trained_weights_of


@dataclass
class State:
    """Where the run is: what a checkpoint holds besides the weights and the optimizer."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch: int = 0  # batches of this epoch already taken
    batches: int = 0  # batches taken in the whole run (transformers' total_batched_samples)
    log: List[dict] = field(default_factory=list)


@dataclass
class Plan:
    per_epoch: int  # batches per epoch
    steps: int  # optimizer steps in all
    epochs: int  # epochs to run (the last one may stop early)
    warmup: int


def plan(examples: int, args, world: int) -> Plan:
    """transformers 4.37's arithmetic: len(dataloader), max_steps, the epochs to run, warmup."""
    t = args.training
    per_epoch = math.ceil(examples / (t.per_device_train_batch_size * world))
    updates = max(per_epoch // t.gradient_accumulation_steps, 1)
    if t.max_steps > 0:
        steps = t.max_steps
        epochs = steps // updates + int(steps % updates > 0)
    else:
        steps = math.ceil(t.num_train_epochs * updates)
        epochs = math.ceil(t.num_train_epochs)
    return Plan(per_epoch, steps, epochs, t.warmup(steps))


class Trainer:
    def __init__(
        self,
        trainable,
        args,
        examples: List[Example],
        settings: dict,
        pad_id: int,
        group=None,
        eval_examples: Optional[List[Example]] = None,
    ):
        self.trainable, self.model, self.args = trainable, trainable.model, args
        self.examples, self.eval_examples = examples, eval_examples or []
        self.settings, self.pad_id = settings, pad_id
        self.group = group
        self.world = group.size() if group is not None else 1
        self.rank = group.rank() if group is not None else 0
        self.plan = plan(len(examples), args, self.world)
        self.factor = schedule(args.training.lr_scheduler_type, self.plan.warmup, self.plan.steps)
        self.optimizer, self.rates = optimizer(self.model, args, self.factor, trainable.code)
        self.state = State()
        self.pending = None  # gradients accumulated toward the next step
        self.pending_loss = 0.0
        self.value_and_grad = nn.value_and_grad(self.model, self._loss)
        if args.training.gradient_checkpointing:
            from mlx_lm.tuner.trainer import grad_checkpoint

            grad_checkpoint(self.model.language_model.layers[0])

    # -- batches ----------------------------------------------------------------------
    def batches_of(self, epoch: int) -> List[List[Example]]:
        """This rank's share of each of the epoch's batches: rank r takes r, r + world, ... of
        the batch's records (as DistributedSampler deals them); a share may be empty."""
        t = self.args.training
        ranks_batch = t.per_device_train_batch_size * self.world
        indices = order(
            self.examples, epoch, t.seed, t.shuffle, t.group_by_modality_length,
            t.per_device_train_batch_size, self.world * t.gradient_accumulation_steps,
        )  # fmt: skip
        chunks = [indices[i : i + ranks_batch] for i in range(0, len(indices), ranks_batch)]
        return [[self.examples[i] for i in chunk[self.rank :: self.world]] for chunk in chunks]

    def batch(self, examples: List[Example]) -> Batch:
        return make_batch(examples, self.settings, self.model.config, self.pad_id, self.args.training.model_max_length)

    def frozen_features(self, batch: Batch):
        """The frozen tower's features, outside the differentiated function (None: the tower trains)."""
        if self.trainable.parts & {"tower", "tower_lora"}:
            return None
        features = tower_features(self.model, batch)
        return mx.stop_gradient(features) if features is not None else None

    # -- the math ---------------------------------------------------------------------
    def _loss(self, model, batch: Batch, features):
        return loss_sum(model, batch, features, self.args.training.model_max_length)

    def all_sum(self, x):
        return mx.distributed.all_sum(x, group=self.group) if self.group is not None else x

    def micro_step(self, examples: List[Example]):
        """One batch's gradient (mean over all ranks' unmasked tokens, / GA) into the pending sum."""
        batch = self.batch(examples) if examples else None
        if batch is not None:
            (total, count), grads = self.value_and_grad(self.model, batch, self.frozen_features(batch))
        else:  # this rank's share of the last batch is empty
            total, count = mx.array(0.0), mx.array(0)
            grads = tree_map(mx.zeros_like, self.model.trainable_parameters())
        tokens = self.all_sum(count.astype(mx.float32))
        total = self.all_sum(total)
        if self.group is not None:  # the ranks' sum, in mlx's batched all-reduce
            grads = tree_map(lambda g: g * self.world, average_gradients(grads, self.group))
        scale = 1.0 / (mx.maximum(tokens, 1.0) * self.args.training.gradient_accumulation_steps)
        grads = tree_map(lambda g: g * scale.astype(g.dtype), grads)
        self.pending = grads if self.pending is None else tree_map(mx.add, self.pending, grads)
        mx.eval(self.pending, total, tokens)
        self.pending_loss += total.item() / max(tokens.item(), 1.0) / self.args.training.gradient_accumulation_steps
        return batch.positions if batch is not None else 0

    def update(self) -> dict:
        """Clip, update, and the step's record."""
        grads, norm = clip(self.pending, self.args.training.max_grad_norm)
        rate = self.rates[next(iter(self.rates))] * self.factor(self.state.step)
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        record = {
            "step": self.state.step + 1,
            "loss": self.pending_loss,
            "learning_rate": rate,
            "grad_norm": norm.item(),
        }
        self.pending, self.pending_loss = None, 0.0
        self.state.step += 1
        return record

    def evaluate(self) -> Optional[float]:
        """The mean loss over every unmasked token of the eval data."""
        if not self.eval_examples:
            return None
        size = self.args.training.per_device_eval_batch_size * self.world
        total = tokens = 0.0
        for i in range(0, len(self.eval_examples), size):
            share = self.eval_examples[i : i + size][self.rank :: self.world]
            if share:
                batch = self.batch(share)
                s, n = loss_sum(self.model, batch, self.frozen_features(batch), self.args.training.model_max_length)
            else:
                s, n = mx.array(0.0), mx.array(0)
            s, n = self.all_sum(s), self.all_sum(n.astype(mx.float32))
            mx.eval(s, n)
            total, tokens = total + s.item(), tokens + n.item()
        return total / max(tokens, 1.0)

    # -- the loop ---------------------------------------------------------------------
    def run(self, on_step, on_batch=None):
        """Train to the plan's end; `on_step(record)` after every optimizer step (logging,
        checkpoints), `on_batch(positions)` after every batch (progress)."""
        t, p, state = self.args.training, self.plan, self.state
        ga = t.gradient_accumulation_steps
        while state.epoch < p.epochs and state.step < p.steps:
            batches = self.batches_of(state.epoch)
            while state.batch < len(batches) and state.step < p.steps:
                with signals_held():
                    tic = time.perf_counter()
                    # each batch's randomness (dropout) from the seed and its place: a resumed run draws the same
                    mx.random.seed(t.seed * 1_000_003 + state.batches)
                    positions = self.micro_step(batches[state.batch])
                    state.batch += 1
                    state.batches += 1
                    last = state.batch == len(batches) and len(batches) <= ga
                    record = None
                    if state.batches % ga == 0 or last:
                        record = self.update()
                        record["epoch"] = state.epoch + state.batch / len(batches)
                    if on_batch:
                        on_batch(positions, time.perf_counter() - tic)
                    if record is not None:
                        on_step(record)
            if state.step >= p.steps:
                break
            state.epoch, state.batch = state.epoch + 1, 0

    # -- checkpoints ------------------------------------------------------------------
    def save_state(self, directory: Path):
        """The optimizer's state and where the run is (the weights are saved beside)."""
        flat = dict(tree_flatten(self.optimizer.state))
        mx.save_safetensors(
            str(directory / "optimizer.safetensors"), {k: v for k, v in flat.items() if isinstance(v, mx.array)}
        )
        (directory / "trainer_state.json").write_text(json.dumps(vars(self.state), indent=1))

    def restore(self, directory: Path):
        """Go on from a checkpoint: its trainable weights, optimizer state and place."""
        weights = trained_weights_of(self.trainable, directory)
        self.model.load_weights(list(weights.items()), strict=False)
        flat = mx.load(str(directory / "optimizer.safetensors"))
        self.optimizer.init(self.model.trainable_parameters())
        self.optimizer.state = tree_unflatten(list({**dict(tree_flatten(self.optimizer.state)), **flat}.items()))
        saved = json.loads((directory / "trainer_state.json").read_text())
        self.state = State(**saved)
        if self.state.batch >= len(self.batches_of(self.state.epoch)):
            self.state.epoch, self.state.batch = self.state.epoch + 1, 0
        warn(f"resuming from {directory}: step {self.state.step} of {self.plan.steps}")
