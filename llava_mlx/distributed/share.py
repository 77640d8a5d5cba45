"""Rank 0 shares with the other ranks: any picklable object (framed and checked, so that a
torn transfer from a lost rank is an error, not zeros), and the image features it alone
encodes."""

import pickle
import zlib
from typing import Callable

import mlx.core as mx
import numpy as np

from ..errors import LlavaError
from .group import group_of


class RankLost(RuntimeError):
    """The ring lost a rank. Its backend may fail the pending transfers without raising,
    leaving zeros where the lost rank's data would be, so `share_object` checks each frame."""


FRAME_MARK = 0x5A17C0DE  # the header's third word is size ^ FRAME_MARK: zeros or a torn header fail it


def share_object(group, obj=None):
    """Rank 0's picklable `obj` on every rank (as mlx-lm's server shares requests).

    A header (size, crc32, size ^ FRAME_MARK) comes first, so that a follower can tell a
    frame torn by a dead rank 0 from a real one: it raises `RankLost` instead of unpickling
    zeros or allocating a garbage size."""
    if group.rank() == 0:
        payload = pickle.dumps(obj)
        header = mx.array([len(payload), zlib.crc32(payload), len(payload) ^ FRAME_MARK], dtype=mx.uint32)
        mx.eval(mx.distributed.all_sum(header, group=group))
        mx.eval(mx.distributed.all_sum(mx.array(np.frombuffer(payload, dtype=np.uint8)), group=group))
        return obj
    size, crc, mark = np.array(mx.distributed.all_sum(mx.zeros(3, dtype=mx.uint32), group=group)).tolist()
    if size == 0 or mark != size ^ FRAME_MARK:
        raise RankLost("[ring] connection to rank 0 was lost: no message came")
    payload = np.array(mx.distributed.all_sum(mx.zeros(size, dtype=mx.uint8), group=group)).tobytes()
    if zlib.crc32(payload) != crc:
        raise RankLost("[ring] connection to rank 0 was lost: a message came torn")
    return pickle.loads(payload)


def check_ranks(group):
    """Raise `RankLost` unless every rank of `group` took part in this all-reduce."""
    present = mx.distributed.all_sum(mx.array(1, dtype=mx.int32), group=group).item()
    if present != group.size():
        raise RankLost(f"[ring] connection to a peer was lost: {present} of {group.size()} ranks answered")


def shared_features(model, encode: Callable):
    """(keys, features) from `encode()`: run here in one process; sharded, run on rank 0
    (the only rank that reads the images and holds the tower) and its features shared with
    the other ranks. An error `encode` raises on rank 0 is raised on every rank."""
    group = group_of(model)
    if group is None:
        return encode()
    if group.rank() == 0:
        try:
            keys, features = encode()
        except LlavaError as e:
            share_object(group, ("error", str(e)))
            raise
        share_object(group, ("ok", keys, [(f.shape, str(f.dtype).split(".")[-1]) for f in features]))
    else:
        status, *rest = share_object(group)
        if status == "error":
            raise LlavaError(rest[0])
        keys, shapes = rest
        features = [mx.zeros(shape, dtype=getattr(mx, dtype)) for shape, dtype in shapes]
    if not features:
        return keys, features
    flat = mx.distributed.all_sum(mx.concatenate([f.reshape(-1) for f in features]), group=group)
    sizes = np.cumsum([0] + [f.size for f in features])  # rank 0's features plus zeros: exact
    shared = [flat[sizes[i] : sizes[i + 1]].reshape(f.shape) for i, f in enumerate(features)]
    mx.eval(shared)
    return keys, shared
