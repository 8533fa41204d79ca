"""fusedtrain under torch.distributed (gloo on CPU, loopback only): DDP, ZeRO, FSDP2, DCP."""
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fusedtrain
from dist_util import spawn
from helpers import normal_only

pytestmark = [
    normal_only,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available"),
]
STEPS = 50
BATCH = 64


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 16, generator=g), (torch.rand(BATCH, 8, generator=g) > 0.7).float()


def _train(model, params_for_opt, x, y, steps=STEPS, opt_factory=None, inject=None):
    crit = fusedtrain.FusedBCEWithLogits(pos_weight=torch.full((8,), 2.0))
    opt = (opt_factory or (lambda ps: fusedtrain.FusedAdamW(ps, lr=1e-2)))(params_for_opt)
    scaler = fusedtrain.GradScaler("cpu", init_scale=2.0 ** 10)
    scales = []
    for step in range(steps):
        loss = crit(model(x), y)
        scaler.scale(loss).backward()
        if inject is not None:
            inject(step, model)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        opt.zero_grad(set_to_none=True)
    return opt, scales


def _single_process_params(opt_factory=None):
    torch.set_num_threads(1)
    model = _model()
    x, y = _data()
    _train(model, model.parameters(), x, y, opt_factory=opt_factory)
    return [p.detach().clone() for p in model.parameters()]


def _ddp_worker(rank, world, out, use_zero):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _model()
    ddp = DDP(model)
    x, y = _data()
    half = BATCH // world
    factory = None
    if use_zero:
        factory = lambda ps: ZeroRedundancyOptimizer(ps, optimizer_class=fusedtrain.FusedAdamW, lr=1e-2)
    _train(ddp, ddp.parameters(), x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half],
           opt_factory=factory)
    torch.save([p.detach() for p in model.parameters()], os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.parametrize("use_zero", [False, True], ids=["ddp", "zero"])
def test_ddp_matches_single_process(tmp_path, use_zero):
    spawn(_ddp_worker, world=2, args=(str(tmp_path), use_zero))
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for a, b in zip(r0, r1):
        assert torch.equal(a, b), "ranks diverged"
    single = _single_process_params()
    for a, s in zip(r0, single):
        torch.testing.assert_close(a, s, rtol=1e-4, atol=1e-5)


def _fsdp_worker(rank, world, out):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = _model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    x, y = _data()
    half = BATCH // world
    skipped = {}

    def inject(step, m):
        # an inf in a gradient shard of rank 0 only: every rank must skip this step together
        if step == 7:
            skipped["before"] = [p.detach().to_local().clone() for p in m.parameters()]
            if rank == 0:
                next(iter(m.parameters())).grad.to_local().view(-1)[0] = float("inf")
        if step == 8:  # params after the skipped step 7 are those before it, on every rank
            for a, b in zip(skipped["before"], m.parameters()):
                assert torch.equal(a, b.detach().to_local()), f"rank {rank}: a param moved on the inf step"

    opt, scales = _train(model, model.parameters(), x[rank * half:(rank + 1) * half],
                         y[rank * half:(rank + 1) * half], steps=12, inject=inject)
    assert scales[7] == scales[6] * 0.5, f"rank {rank}: scale not backed off at the inf step: {scales}"
    sd = get_optimizer_state_dict(model, opt)
    dcp.save(sd, checkpoint_id=out)
    opt2 = fusedtrain.FusedAdamW(model.parameters(), lr=1e-2)
    sd2 = get_optimizer_state_dict(model, opt2)
    dcp.load(sd2, checkpoint_id=out)
    set_optimizer_state_dict(model, opt2, sd2)
    for p in model.parameters():
        s1, s2 = opt.state[p], opt2.state[p]
        for k in ("step", "exp_avg", "exp_avg_sq"):
            a = s1[k].to_local() if isinstance(s1[k], DTensor) else s1[k]
            b = s2[k].to_local() if isinstance(s2[k], DTensor) else s2[k]
            assert torch.equal(a.cpu(), b.cpu()), f"rank {rank}: {k} did not round-trip through DCP"
    torch.save({"scales": scales}, os.path.join(out, f"fsdp_rank{rank}.pt"))


def test_fsdp2_shards_skip_together_and_checkpoint(tmp_path):
    spawn(_fsdp_worker, world=2, args=(str(tmp_path),), timeout_s=180)
    s0 = torch.load(tmp_path / "fsdp_rank0.pt")["scales"]
    s1 = torch.load(tmp_path / "fsdp_rank1.pt")["scales"]
    assert s0 == s1, "ranks disagree on the loss scale"


# ---- the many-label head under DDP and FSDP2 ---------------------------------------------------

class _Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.Tanh())
        self.head = fusedtrain.FusedLinearBCEWithLogits(32, 300, chunk_size=64)

    def forward(self, x, y):
        return self.head(self.body(x), y)


def _tagger_data():
    g = torch.Generator().manual_seed(2)
    return torch.randn(BATCH, 16, generator=g), (torch.rand(BATCH, 300, generator=g) > 0.95).float()


def _train_tagger(model, x, y, steps=10):
    opt = fusedtrain.FusedAdamW(model.parameters(), lr=1e-2)
    scaler = fusedtrain.GradScaler("cpu", init_scale=2.0 ** 10)
    for _ in range(steps):
        loss = model(x, y)  # fp32: Adam's sign-like first steps would amplify bf16's rounding
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)


def _head_worker(rank, world, out, kind):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _Tagger()
    x, y = _tagger_data()
    half = BATCH // world
    if kind == "ddp":
        wrapped = DDP(model)
    else:
        fully_shard(model.head)
        fully_shard(model)
        assert isinstance(model.head.weight, DTensor)
        with pytest.raises(TypeError, match="weight is a DTensor"):  # the sharded weight, called directly
            fusedtrain.functional.linear_binary_cross_entropy_with_logits(
                torch.randn(2, 32), model.head.weight, None, torch.zeros(2, 300))
        wrapped = model
    _train_tagger(wrapped, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
    params = [p.full_tensor() if isinstance(p, DTensor) else p for p in model.parameters()]
    torch.save([p.detach() for p in params], os.path.join(out, f"head_rank{rank}.pt"))


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_head_under_ddp_and_fsdp2_matches_single_process(tmp_path, kind):
    spawn(_head_worker, world=2, args=(str(tmp_path), kind), timeout_s=180)
    r0 = torch.load(tmp_path / "head_rank0.pt")
    r1 = torch.load(tmp_path / "head_rank1.pt")
    for a, b in zip(r0, r1):
        assert torch.equal(a, b), "ranks diverged"
    torch.set_num_threads(1)
    model = _Tagger()
    _train_tagger(model, *_tagger_data())
    for a, s in zip(r0, model.parameters()):
        torch.testing.assert_close(a, s.detach(), rtol=2e-3, atol=2e-4)


# ---- lean optimizer states under FSDP2 and DCP -------------------------------------------------

def _lean_model():
    torch.manual_seed(0)
    # 8192-element weights: lean states (>= 4096 elements), 4096 per rank under FSDP2
    return nn.Sequential(nn.Linear(16, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 8))


def _lean_worker(rank, world, out, fmt):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = _lean_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    x, y = _data()
    half = BATCH // world
    factory = lambda ps: fusedtrain.FusedAdamW(ps, lr=1e-2, state_format=fmt, amsgrad=True)  # noqa: E731
    opt, _ = _train(model, model.parameters(), x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half],
                    steps=12, opt_factory=factory)
    lean = torch.uint8 if fmt == "8bit" else torch.bfloat16
    w = model[2].weight
    assert opt.state[w]["exp_avg"].to_local().dtype == lean, "the 8192-element weight has no lean states"
    sd = get_optimizer_state_dict(model, opt)
    dcp.save(sd, checkpoint_id=out)
    opt2 = fusedtrain.FusedAdamW(model.parameters(), lr=1e-2, state_format=fmt, amsgrad=True)
    sd2 = get_optimizer_state_dict(model, opt2)
    dcp.load(sd2, checkpoint_id=out)
    set_optimizer_state_dict(model, opt2, sd2)
    for p in model.parameters():
        s1, s2 = opt.state[p], opt2.state[p]
        assert set(s1) == set(s2), f"rank {rank}: state keys {set(s1)} != {set(s2)}"
        for k in s1:
            a = s1[k].to_local() if isinstance(s1[k], DTensor) else s1[k]
            b = s2[k].to_local() if isinstance(s2[k], DTensor) else s2[k]
            assert a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu()), f"rank {rank}: {k} did not round-trip"
    # both optimizers step on: the same bits
    for o in (opt, opt2):
        for p in model.parameters():
            p.grad = torch.ones_like(p) * 1e-3
    before = [p.detach().to_local().clone() for p in model.parameters()]
    opt.step()
    after1 = [p.detach().to_local().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, b in zip(model.parameters(), before):
            p.to_local().copy_(b)
    opt2.step()
    for a, p in zip(after1, model.parameters()):
        assert torch.equal(a, p.detach().to_local()), f"rank {rank}: resumed step differs"
    torch.save([p.detach().full_tensor() for p in model.parameters()], os.path.join(out, f"lean_rank{rank}.pt"))


@pytest.mark.parametrize("fmt", ["bf16", "8bit"])
def test_fsdp2_lean_states_train_and_checkpoint(tmp_path, fmt):
    """FSDP2 with lean states (a group mixing small fp32-state params and lean ones): each rank's
    8-bit blocks stay in its shard; DCP saves and loads codes, absmax and bf16 moments bit for
    bit, and the next step from the loaded states gives the same bits; the ranks agree."""
    spawn(_lean_worker, world=2, args=(str(tmp_path), fmt), timeout_s=240)
    r0, r1 = torch.load(tmp_path / "lean_rank0.pt"), torch.load(tmp_path / "lean_rank1.pt")
    for a, b in zip(r0, r1):
        assert torch.equal(a, b), "ranks disagree on the full params"


# ---- 8-bit states resharded by DCP to another world size ---------------------------------------

def _rows_model(hsdp=False):
    torch.manual_seed(0)
    # the 8-bit weights are (32, 512) and (2, 2048): rows of two and eight blocks, so their shards
    # are whole blocks and their absmax a (rows, blocks per row) DTensor sharded as the weight
    # (the (2, 2048) one leaves the third of 3 ranks an empty shard; the model is never run: the
    # gradients are set); the other params keep fp32 states. hsdp: on a 2x2 mesh (replicated
    # over the first dim, sharded on the second: placements (Replicate(), Shard(0))).
    model = nn.Sequential(nn.Linear(4, 512), nn.Tanh(), nn.Linear(512, 32), nn.Tanh(), nn.Linear(32, 8),
                          nn.Linear(2048, 2))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    kw = {"mesh": init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))} if hsdp else {}
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, **kw)
    return fully_shard(model, **kw)


def _rows_grads(model, seed):
    """The same full gradients at any world size, each rank given its shard."""
    from torch.distributed.tensor import distribute_tensor

    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = distribute_tensor((torch.randn(p.shape, generator=g) * 1e-2).to(p.dtype), p.device_mesh,
                                   p.placements)


def _full_states(opt, model):
    from torch.distributed.tensor import DTensor

    return [{k: (v.full_tensor() if isinstance(v, DTensor) else v).clone() for k, v in opt.state[p].items()}
            for p in model.parameters()]


def _reshard_worker(rank, world, out, phase):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.tensor import DTensor

    model = _rows_model(hsdp=phase == "load_hsdp")
    opt = fusedtrain.FusedAdamW(model.parameters(), lr=1e-2, state_format="8bit", amsgrad=True)
    ckpt = os.path.join(out, "ckpt")
    if phase == "load_hsdp":
        from torch.distributed.tensor import Replicate, Shard

        w = model[2].weight
        assert tuple(w.placements) == (Replicate(), Shard(0))
        # a state created on the 2-D mesh (before loading) has the row layout there too
        _rows_grads(model, 0)
        opt.step()
        am = opt.state[w]["exp_avg_absmax"]
        assert tuple(am.placements) == (Replicate(), Shard(0)) and am.shape == (32, 2), am
        assert opt.state[w]["absmax_layout"].tolist() == [0]
    if phase == "save":
        for step in range(3):
            _rows_grads(model, step)
            opt.step()
        w = model[2].weight
        am = opt.state[w]["exp_avg_absmax"]
        assert opt.state[w]["exp_avg"].dtype == torch.uint8 and isinstance(am, DTensor) and am.shape == (32, 2)
        # torch_state_dict decodes each shard with its own blocks: the whole tensor's decoding
        decoded = fusedtrain.optim.torch_state_dict(opt.state_dict())["state"][2]["exp_avg"].full_tensor()
        whole = fusedtrain.reference.q8_decode(opt.state[w]["exp_avg"].full_tensor(), am.full_tensor().reshape(-1),
                                               signed=True)
        assert torch.equal(decoded, whole)
        assert opt.state[model[5].weight]["exp_avg_absmax"].shape == (2, 8)
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=ckpt)
    else:
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(sd, checkpoint_id=ckpt)
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"])
    loaded = _full_states(opt, model)
    _rows_grads(model, 99)
    opt.step()
    result = {"states": loaded, "params": [p.detach().full_tensor() for p in model.parameters()],
              "after": _full_states(opt, model)}
    if rank == 0:
        torch.save(result, os.path.join(out, f"{phase}.pt"))


def test_dcp_reshards_8bit_states_to_another_world_size(tmp_path):
    """8-bit states saved by 2 FSDP2 ranks load into 1 and into 3 ranks (11, 11 and 10 rows of
    two blocks of one 8-bit weight, 1, 1 and 0 rows of eight blocks of another) with the same
    bits: codes, absmax and fp32 states. The next step, from the same full gradients, gives the
    8-bit weights the same bits at every world size (their shards are whole blocks of 256), and
    the small fp32-state params too (an element of a shard of 16 or 11 is in the vectorized
    loop's tail where one of 32 puts it in the body: the tail takes the body's arithmetic).
    4 ranks on a 2x2 HSDP mesh (FSDP2 sharded 2-way, replicated 2-way) load them too, and their
    step is the 2 ranks' to the bit: the same shards."""
    spawn(_reshard_worker, world=2, args=(str(tmp_path), "save"), timeout_s=240)
    saved = torch.load(tmp_path / "save.pt")
    for world, phase in ((1, "load1"), (3, "load3"), (4, "load_hsdp")):
        spawn(_reshard_worker, world=world, args=(str(tmp_path), phase), timeout_s=240)
        got = torch.load(tmp_path / f"{phase}.pt")
        for what in ("states", "after"):
            for i, (a, b) in enumerate(zip(saved[what], got[what])):
                assert set(a) == set(b), f"world {world}: param {i} state keys {set(a)} != {set(b)}"
                for k in a:
                    assert torch.equal(a[k], b[k]), f"world {world}: param {i} {k} ({what} loading) differs"
        for i, (a, b) in enumerate(zip(saved["params"], got["params"])):
            assert torch.equal(a, b), f"world {world}: param {i} after the step differs"


def _padded_model(dtype=torch.float32):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 33), nn.Tanh(), nn.Linear(33, 8)).to(dtype)  # 8-bit weight (33, 128)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _padded_worker(rank, world, out, phase):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model = _padded_model()
    opt = fusedtrain.FusedAdamW(model.parameters(), lr=1e-2, state_format="8bit")
    ckpt = os.path.join(out, "ckpt")
    if phase == "save":
        _rows_grads(model, 0)
        opt.step()
        dcp.save(get_optimizer_state_dict(model, opt), checkpoint_id=ckpt)
        return
    sd = get_optimizer_state_dict(model, opt)
    try:
        dcp.load(sd, checkpoint_id=ckpt)
        set_optimizer_state_dict(model, opt, sd)
        msg = "loaded"
    except CheckpointException as e:  # a BaseException
        msg = repr(e)
    with open(os.path.join(out, f"padded_rank{rank}.txt"), "w") as f:
        f.write(msg)


def test_dcp_refuses_8bit_states_of_shards_that_are_not_whole_blocks(tmp_path):
    """A weight of 33 rows of 128 elements: its shards (17/16 rows at 2 ranks, 11/11/11 at 3) end
    inside blocks, so its absmax is per shard, 9 blocks per rank at 2 ranks and 6 at 3: as many in
    all (18), which a flat layout would have loaded as the other sharding's blocks. Loaded at
    another world size it is refused, naming the absmax key."""
    spawn(_padded_worker, world=2, args=(str(tmp_path), "save"), timeout_s=240)
    spawn(_padded_worker, world=3, args=(str(tmp_path), "load"), timeout_s=240)
    for rank in range(3):
        msg = (tmp_path / f"padded_rank{rank}.txt").read_text()
        assert "Size mismatch" in msg and "exp_avg_absmax" in msg, msg


def _fp32_reshard_worker(rank, world, out, phase):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    # bf16 params with fp32 master weights: the master copy reshards with the decoded moments
    model = _padded_model(torch.bfloat16)
    opt = fusedtrain.FusedAdamW(model.parameters(), lr=1e-2, state_format="8bit", amsgrad=True, master_weights=True)
    w = model[0].weight
    if phase == "save":
        for step in range(3):
            _rows_grads(model, step)
            opt.step()
        dcp.save(get_optimizer_state_dict(model, opt), checkpoint_id=os.path.join(out, "ckpt_8bit"))
        sd = fusedtrain.optim.reshardable_state_dict(get_optimizer_state_dict(model, opt))
        dcp.save(sd, checkpoint_id=os.path.join(out, "ckpt_fp32"))
        full = {k: v.full_tensor() for k, v in sd["state"]["0.weight"].items() if k not in ("step", "q8_decoded")}
        if rank == 0:  # (full_tensor is a collective: every rank calls it)
            torch.save(full, os.path.join(out, "fp32_saved.pt"))
        return
    # the documented way: the new optimizer's own reshardable form as DCP's template
    sd = fusedtrain.optim.reshardable_state_dict(get_optimizer_state_dict(model, opt))
    try:  # an ordinary 8-bit checkpoint into it: DCP would cast the codes to floats; the marker is missing
        dcp.load(sd, checkpoint_id=os.path.join(out, "ckpt_8bit"))
        refused = "loaded"
    except CheckpointException as e:  # a BaseException
        refused = repr(e)
    dcp.load(sd, checkpoint_id=os.path.join(out, "ckpt_fp32"))
    set_optimizer_state_dict(model, opt, sd)
    st = opt.state[w]
    assert st["exp_avg"].dtype == torch.uint8 and st["step"].item() == 3
    got = {k: v.to_local().clone() for k, v in st.items() if k not in ("step", "absmax_layout")}
    torch.save({"states": got, "refused": refused}, os.path.join(out, f"fp32_loaded_rank{rank}.pt"))
    _rows_grads(model, 99)
    opt.step()
    assert all(torch.isfinite(p.to_local()).all() for p in model.parameters())


def test_per_shard_8bit_states_reshard_through_their_fp32_form(tmp_path):
    """The way to another sharding for 8-bit states whose blocks are per shard (the (33, 128)
    weight above, bf16 with fp32 master weights): save reshardable_state_dict(...) (fp32
    moments), load into the new optimizer's own. Each of the 3 ranks then holds its shard (11
    rows) quantized with its own blocks: the codes and absmax of q8_encode of that shard of the
    saved values, bit for bit, its decoding within the map's resolution of them, and its rows
    of the master weights. An ordinary 8-bit checkpoint loaded into that form is refused."""
    spawn(_fp32_reshard_worker, world=2, args=(str(tmp_path), "save"), timeout_s=240)
    spawn(_fp32_reshard_worker, world=3, args=(str(tmp_path), "load"), timeout_s=240)
    saved = torch.load(tmp_path / "fp32_saved.pt")
    for rank in range(3):
        loaded = torch.load(tmp_path / f"fp32_loaded_rank{rank}.pt")
        assert "q8_decoded" in loaded["refused"] and "Missing key" in loaded["refused"], loaded["refused"]
        got = loaded["states"]
        rows = slice(11 * rank, 11 * (rank + 1))
        assert torch.equal(got["master_param"], saved["master_param"][rows]), f"rank {rank}: master_param"
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            shard = saved[key][rows]
            codes, absmax = fusedtrain.reference.q8_encode(shard, signed=key == "exp_avg")
            assert torch.equal(got[key], codes), f"rank {rank}: {key} codes"
            assert torch.equal(got[key + "_absmax"].reshape(-1), absmax), f"rank {rank}: {key} absmax"
            decoded = fusedtrain.reference.q8_decode(got[key], absmax, signed=key == "exp_avg")
            # 3 mantissa bits: the map's widest step, in the top binade, is 1/15 of the block's
            # absmax; half of it (and a little for the fp32 scaling) bounds the rounding
            bound = absmax.repeat_interleave(256)[:shard.numel()].view_as(shard) / 29
            assert ((decoded - shard).abs() <= bound).all(), f"rank {rank}: {key} decoded"
