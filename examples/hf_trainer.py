"""Distill a Hugging Face student with a `Trainer` subclass (`compute_loss`) from a text cache
built by `kdcache.precompute` (teacher logits of every token-masked view, tokenizer inside).

    python examples/hf_trainer.py --teacher BERT_DIR --data train.jsonl --student BERT_DIR
"""

import argparse
from pathlib import Path

import kdcache
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, Trainer, TrainingArguments


class DistillTrainer(Trainer):
    """Trainer whose loss is a kdcache loss against the cached teacher logits of each view."""

    def __init__(self, *args, kd_loss: torch.nn.Module, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kd_loss = kd_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs["input"])  # input_ids + attention_mask: the view the teacher saw
        loss = self.kd_loss(out.logits, inputs["teacher_logits"], inputs["label"])
        return (loss, out) if return_outputs else loss


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True, help="HF model dir of the teacher")
    ap.add_argument("--data", required=True, help="jsonl/csv file with text,label")
    ap.add_argument("--student", required=True, help="HF config dir of the student (same vocab)")
    ap.add_argument("--out", default="runs/hf_trainer")
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--num-augs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    cache = kdcache.precompute(  # a no-op when the same cache already exists
        teacher=f"hf:{args.teacher}", dataset="text", data_root=args.data, augment="token-mask",
        num_augs=args.num_augs, out=str(Path(args.out) / "caches"), device="cpu",
    )  # fmt: skip
    data = kdcache.CachedDataset(cache, views="one", seed=args.seed)
    torch.manual_seed(args.seed)
    config = AutoConfig.from_pretrained(args.student, num_labels=data.cache.num_classes)
    student = AutoModelForSequenceClassification.from_config(config)
    targs = TrainingArguments(
        output_dir=str(Path(args.out) / "trainer"), num_train_epochs=args.epochs,
        per_device_train_batch_size=16, learning_rate=5e-4, seed=args.seed, report_to=[],
        remove_unused_columns=False,  # items are kdcache dicts, not model kwargs
        save_strategy="no", logging_steps=5, use_cpu=True, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = DistillTrainer(
        model=student, args=targs, train_dataset=data, data_collator=data.collate,
        kd_loss=kdcache.get_loss("kd", T=2.0, alpha=0.9),
    )  # fmt: skip
    result = trainer.train()
    print(f"cache {cache}\ntrain_loss {result.training_loss:.4f}")
    return {"cache": cache, "train_loss": result.training_loss}


if __name__ == "__main__":
    main()
