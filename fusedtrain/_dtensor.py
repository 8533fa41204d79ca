"""DTensor (FSDP2 / torch.distributed.tensor) support: kernels run on the local shards, and
what must agree across ranks (found_inf, the gradient norm) is all-reduced over the mesh."""

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = None


def is_dtensor(t) -> bool:
    """Whether t is a DTensor (False where torch has no distributed support).

    Args:
        t: any object.
    """
    return DTensor is not None and isinstance(t, DTensor)


def any_dtensor(ts) -> bool:
    """Whether any of the tensors is a DTensor (one pass over their types, not their objects).

    Args:
        ts: an iterable of tensors.
    """
    return DTensor is not None and any(issubclass(t, DTensor) for t in set(map(type, ts)))


def local(t):
    """The local shard of a DTensor (shares its storage, so in-place updates reach the
    DTensor); any other tensor as it is.

    Args:
        t: a tensor or DTensor.
    """
    return t._local_tensor if is_dtensor(t) else t


def reduce_across_shards_(dtensors, found_infs=(), sums=()):
    """Make found_inf and sum-of-squares tensors computed on local shards global: found_inf
    is max-reduced over every mesh dimension (every rank then skips together); a sum of
    squares is sum-reduced over the dimensions the tensors are sharded on (a replicated
    dimension already holds the whole sum).

    Args:
        dtensors: the DTensors the values were computed from (their meshes and placements).
        found_infs: found_inf tensors to max-reduce in place.
        sums: sum-of-squares tensors to sum-reduce in place.
    """
    import torch.distributed as dist

    layouts = {}
    for t in dtensors:
        layouts.setdefault(id(t.device_mesh), (t.device_mesh, set()))[1].add(tuple(t.placements))
    for mesh, placements in layouts.values():
        if sums and len(placements) > 1:
            raise NotImplementedError("gradient norm of DTensors with different placements on one mesh")
        for dim in range(mesh.ndim):
            group = mesh.get_group(dim)
            for f in found_infs:
                dist.all_reduce(f, op=dist.ReduceOp.MAX, group=group)
            if sums:
                place = next(iter(placements))[dim]
                if place.is_shard():
                    for s in sums:
                        dist.all_reduce(s, op=dist.ReduceOp.SUM, group=group)
                elif not place.is_replicate():
                    raise NotImplementedError(f"gradient norm of DTensors with placement {place} on mesh dim {dim}")


__all__ = ["is_dtensor", "local", "reduce_across_shards_"]
