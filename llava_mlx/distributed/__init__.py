"""One LLaVA over several Macs: the decoder sharded across the ranks of `mlx.launch`.

    mlx.launch --hostfile hosts.json --backend ring -- python generate.py --model M --image a.jpg

`load()` calls `world()`; with more than one rank it shards the decoder with mlx-lm's own
sharding: tensor parallel (`Model.shard`: attention heads and MLP columns split, one
all-reduce after each block half) or, with `pipeline=True`, pipeline parallel (mlx-lm's
`PipelineMixin` split: each rank runs a run of consecutive layers, the last rank the first
layers). The decoders that can shard are the entries of `DECODERS`.

Rank 0 alone holds the vision tower and projector: it loads and encodes the images and
shares the merged image features (`shared_features`), so the images need only be on the
machine the command is typed on, and the other ranks spend no memory on the tower.

Each rank reads only what it keeps: a pipeline stage never touches the other stages'
tensors (they stay lazy), and a tensor-parallel rank reads its slice of each split weight
straight from the safetensors file (`read_slice`), not the whole tensor.

Three files: group.py (joining the launch, who is rank 0), shard.py (what can shard, and
sharding the loaded model), share.py (rank 0's objects and image features to every rank).
"""
