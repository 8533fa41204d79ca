"""fusedtrain inside transformers.Trainer, on CPU, each run against the same run with torch's
pieces: FusedAdamW handed in through `optimizers=` (with a scheduler) or
`optimizer_cls_and_kwargs=` (Trainer builds its weight-decay groups), fp32 and bf16 autocast;
FusedBCEWithLogits as a multi-label `compute_loss_func`; a checkpoint resumed through Trainer.

The model is a config-built 2-layer BERT with hidden size 32 (nothing downloaded); the data
set says which of 6 marker tokens occur in a random sequence.

fp16=True on CPU: Trainer hands it to Accelerate, which runs fp32 there; Accelerate's fp16 path
is tested in test_accelerate.py.
"""
import pytest

transformers = pytest.importorskip("transformers", minversion="4.46")  # compute_loss_func

import torch  # noqa: E402

from fusedtrain import FusedAdamW, FusedBCEWithLogits  # noqa: E402
from same_run import assert_same_run, bitwise, params_of  # noqa: E402

pytestmark = pytest.mark.integration

VOCAB, SEQ, LABELS, STEPS, BATCH = 64, 12, 6, 16, 8
LR, WEIGHT_DECAY, WARMUP = 1e-3, 0.1, 3


@pytest.fixture(autouse=True)
def quiet():
    """Trainer's info logs off (its warnings stay) for the test, restored after."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


def token_data(n=64):
    """Examples {input_ids, attention_mask, labels}: label j is 1 where token j occurs (in ~17% of them)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    labels = torch.stack([(ids == j).any(dim=1) for j in range(LABELS)], dim=1).float()
    mask = torch.ones(SEQ, dtype=torch.long)
    return [{"input_ids": ids[i], "attention_mask": mask, "labels": labels[i]} for i in range(n)]


def tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=LABELS,
                                  problem_type="multi_label_classification")
    return transformers.BertForSequenceClassification(cfg)


class RecordingTrainer(transformers.Trainer):
    """Trainer that keeps each training step's loss at full precision (the logged ones are rounded)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.losses = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.losses.append((out[0] if return_outputs else out).item())
        return out


def train(out_dir, optimizer=None, optimizer_cls_and_kwargs=None, loss_func=None, bf16=False, save_steps=None,
          resume_from=None):
    """Train tiny_bert for STEPS steps with transformers.Trainer; (losses, params).
    optimizer: a class, built here on all params with a linear warmup schedule and handed in as
    `optimizers=`; or optimizer_cls_and_kwargs, for Trainer to build it."""
    model = tiny_bert()
    optimizers = (None, None)
    if optimizer is not None:
        opt = optimizer(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        optimizers = (opt, transformers.get_linear_schedule_with_warmup(opt, WARMUP, STEPS))
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), use_cpu=True, bf16=bf16, per_device_train_batch_size=BATCH, max_steps=STEPS,
        learning_rate=LR, weight_decay=WEIGHT_DECAY, warmup_steps=WARMUP, max_grad_norm=1.0,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, logging_steps=STEPS,
        report_to=[], seed=0, disable_tqdm=True)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=token_data(), optimizers=optimizers,
                               optimizer_cls_and_kwargs=optimizer_cls_and_kwargs, compute_loss_func=loss_func)
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer.losses, params_of(model)


def multilabel_loss(criterion):
    """A Trainer compute_loss_func: criterion(logits, labels)."""
    def compute_loss(outputs, labels, num_items_in_batch=None):
        return criterion(outputs.logits, labels)
    return compute_loss


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_optimizers_argument(tmp_path, bf16):
    """Trainer(optimizers=(FusedAdamW(...), scheduler)) trains as with torch.optim.AdamW
    (Trainer's grad clipping at 1.0 in between); tolerance RUN_ATOL/RUN_RTOL (same_run.py)."""
    ours = train(tmp_path / "ours", optimizer=FusedAdamW, bf16=bf16)
    theirs = train(tmp_path / "torch", optimizer=torch.optim.AdamW, bf16=bf16)
    assert_same_run(ours, theirs, what="FusedAdamW in Trainer")


def test_optimizer_cls_and_kwargs(tmp_path):
    """Trainer(optimizer_cls_and_kwargs=(FusedAdamW, kwargs)): Trainer's own param groups (no decay
    for biases and LayerNorm) and schedule, as with torch.optim.AdamW; RUN_ATOL/RUN_RTOL."""
    kwargs = {"lr": LR, "betas": (0.9, 0.99)}
    ours = train(tmp_path / "ours", optimizer_cls_and_kwargs=(FusedAdamW, kwargs))
    theirs = train(tmp_path / "torch", optimizer_cls_and_kwargs=(torch.optim.AdamW, kwargs))
    assert_same_run(ours, theirs, what="FusedAdamW built by Trainer")


@pytest.mark.parametrize("pos_weight", [None, "per-label"])
def test_fused_bce_as_compute_loss_func(tmp_path, pos_weight):
    """compute_loss_func=FusedBCEWithLogits on the logits trains as BERT's own multi-label loss
    (problem_type="multi_label_classification", torch's BCEWithLogitsLoss) does, or, with a
    pos_weight, as torch.nn.BCEWithLogitsLoss(pos_weight) does; same optimizer (torch's AdamW)
    in both runs, so the loss is the only difference. RUN_ATOL/RUN_RTOL."""
    pw = None if pos_weight is None else torch.linspace(0.5, 4.0, LABELS)
    ours = train(tmp_path / "ours", optimizer=torch.optim.AdamW,
                 loss_func=multilabel_loss(FusedBCEWithLogits(pos_weight=pw)))
    theirs = train(tmp_path / "torch", optimizer=torch.optim.AdamW,
                   loss_func=None if pw is None else multilabel_loss(torch.nn.BCEWithLogitsLoss(pos_weight=pw)))
    assert_same_run(ours, theirs, what="FusedBCEWithLogits as compute_loss_func")


def test_resume_from_checkpoint(tmp_path):
    """A run with FusedAdamW saved by Trainer at step 8 (optimizer.pt, loaded back with
    torch.load(weights_only=True)) and resumed through train(resume_from_checkpoint=...) ends
    bit-identical to the uninterrupted run that saved it; the saved optimizer state is
    FusedAdamW's state_dict, keys and all."""
    whole = train(tmp_path, optimizer=FusedAdamW, save_steps=8)
    checkpoint = tmp_path / "checkpoint-8"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert len(saved["state"]) == len(list(tiny_bert().parameters()))
    for st in saved["state"].values():
        assert set(st) == {"step", "exp_avg", "exp_avg_sq"} and float(st["step"]) == 8.0
    resumed = train(tmp_path, optimizer=FusedAdamW, resume_from=str(checkpoint))
    bitwise((whole[0][8:], whole[1]), resumed, what="resumed Trainer run")
