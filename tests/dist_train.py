"""Toy models and tasks for the engine/grid tests, and the 2-process training script.

As a script (``torchrun --nproc_per_node 2 tests/dist_train.py OUT_DIR``) it trains a tiny BERT with
LoRA on a toy task with ``structlora.repro.engine.train`` (gloo on CPU) and every rank saves its trainable
parameters and metrics to ``OUT_DIR/rank<k>.pt``; ``tests/test_engine.py::test_two_processes`` checks
that both ranks end identical.

As a module it provides stand-ins with the documented interfaces of ``structlora.repro.assets.models``,
``structlora.repro.assets.tasks`` (``ToyTask``, ``ToyLoaded``), handles that are real
``structlora.repro.methods.MethodHandle`` objects (so the engine builds their optimizer as every method's), tiny
models (BERT / Llama / ViT with peft LoRA) and learnable toy data sets in the encoded formats.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Array3D, Dataset, DatasetDict, Features, Value
from torch import nn

from structlora.repro.methods.base import MethodHandle

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the tests' toy models, also under torchrun
from toy import tiny_bert  # noqa: E402

VOCAB = 32


# ------------------------------------------------------------------------------------------ stand-ins
@dataclass
class ToyTask:
    """Duck-typed ``structlora.repro.assets.tasks.TaskData``."""

    name: str
    kind: str
    train: Any
    validation: Any
    test: Any
    labels: list[str]
    metric: str = "accuracy"
    model_kind: str = "seq-cls"

    def compute_metrics(self, predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
        preds, refs = np.asarray(predictions), np.asarray(references)
        return {"accuracy": float(np.mean(preds == refs))}


@dataclass
class ToyLoaded:
    """Duck-typed ``structlora.repro.assets.models.LoadedModel``."""

    name: str
    kind: str
    model: nn.Module
    tokenizer: Any = None
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    num_layers: int = 2
    image_size: int | None = None


def n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------ models
def toy_bert(seed: int = 0, num_labels: int = 2, rank: int = 4, lora: bool = True, dropout: float = 0.1) -> nn.Module:
    """A 2-layer, 32-wide BERT classifier; with ``lora``, peft LoRA on query/value + trainable head."""
    model = tiny_bert(2, seed, num_labels=num_labels, vocab=VOCAB, positions=64, dropout=dropout,
                      attention_dropout=0.0, train=True)
    if not lora:
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                                            target_modules=["query", "value"], task_type="SEQ_CLS"))


def toy_llama(seed: int = 0, lora: bool = True) -> nn.Module:
    """A 2-layer, 32-wide Llama causal LM (vocabulary of 32 ids); optional LoRA on q/v."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg)
    if not lora:
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))


def toy_vit(seed: int = 0, num_labels: int = 2) -> nn.Module:
    """A 1-layer ViT on 1x28x28 images (patch 7) with LoRA on query/value + trainable head."""
    from peft import LoraConfig, get_peft_model
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=64, num_labels=num_labels)
    return get_peft_model(ViTForImageClassification(cfg),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                     modules_to_save=["classifier"]))


def toy_handle(model: nn.Module, name: str = "lora", **kwargs: Any) -> MethodHandle:
    return MethodHandle(name=name, model=model, trainable_params=n_trainable(model), **kwargs)


# ------------------------------------------------------------------------------------------ data
def toy_seq_data(n_train: int = 256, n_eval: int = 64, seed: int = 123) -> tuple[ToyTask, DatasetDict]:
    """Label = 1 iff most content tokens are in the upper half of the vocabulary (bag-of-words)."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> Dataset:
        ids, mask, labels = [], [], []
        for _ in range(n):
            length = int(rng.integers(4, 12))
            label = int(rng.integers(0, 2))
            p_hi = 0.8 if label else 0.2
            toks = np.where(rng.random(length) < p_hi, rng.integers(17, VOCAB, length), rng.integers(3, 17, length))
            ids.append([1] + toks.tolist())
            mask.append([1] * (length + 1))
            labels.append(label)
        return Dataset.from_dict({"input_ids": ids, "attention_mask": mask, "labels": labels})

    enc = DatasetDict({"train": split(n_train), "validation": split(n_eval), "test": split(n_eval)})
    task = ToyTask("toy-seq", "seq-cls", enc["train"], enc["validation"], enc["test"], ["lo", "hi"])
    return task, enc


def toy_mc_data(n_train: int = 64, n_eval: int = 16, seed: int = 7, n_choices: int = 3,
                single_token: bool = False) -> tuple[ToyTask, DatasetDict]:
    """Prompts of random tokens; options of 1-3 tokens; the gold option repeats the prompt's last token."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> Dataset:
        rows: dict[str, list] = {"input_ids": [], "labels": [], "choice_input_ids": [], "choice_starts": [], "label": []}
        for _ in range(n):
            prompt = [1] + rng.integers(3, VOCAB, int(rng.integers(2, 6))).tolist()
            gold = int(rng.integers(0, n_choices))
            conts = []
            for j in range(n_choices):
                length = 1 if single_token else int(rng.integers(1, 4))
                cont = rng.integers(3, VOCAB, length).tolist()
                if j == gold:
                    cont[0] = prompt[-1]
                conts.append(cont)
            start = len(prompt)
            rows["input_ids"].append(prompt + conts[gold])
            rows["labels"].append([-100] * start + conts[gold])
            rows["choice_input_ids"].append([prompt + c for c in conts])
            rows["choice_starts"].append([start] * n_choices)
            rows["label"].append(gold)
        return Dataset.from_dict(rows)

    enc = DatasetDict({"train": split(n_train), "validation": split(n_eval), "test": split(n_eval)})
    task = ToyTask("toy-mc", "multiple-choice", enc["train"], enc["validation"], enc["test"],
                   [str(j) for j in range(n_choices)], model_kind="causal-lm")
    return task, enc


def toy_image_data(n_train: int = 64, n_eval: int = 32, seed: int = 3) -> tuple[ToyTask, DatasetDict]:
    """1x28x28 noise images; class 1 has a bright top half."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> Dataset:
        labels = rng.integers(0, 2, n)
        pix = rng.normal(0, 1, (n, 1, 28, 28)).astype(np.float32)
        pix[labels == 1, :, :14] += 1.5
        features = Features({"pixel_values": Array3D((1, 28, 28), "float32"), "labels": Value("int64")})
        return Dataset.from_dict({"pixel_values": pix, "labels": labels}, features=features).with_format("torch")

    enc = DatasetDict({"train": split(n_train), "validation": split(n_eval), "test": split(n_eval)})
    task = ToyTask("toy-img", "image-cls", enc["train"], enc["validation"], enc["test"], ["a", "b"],
                   model_kind="image-cls")
    return task, enc


# ------------------------------------------------------------------------------------------ grid loaders
# Stand-ins for structlora.repro.grid.LOADERS (module-level so that spawned grid workers can import them).
CALLS: dict[str, int] = {"load_task": 0, "load_model": 0, "build_method": 0}
TOY_METHODS = ["lora", "skipme", "sensitivity_lora"]


def toy_load_task(name: str, fraction: float = 1.0, seed: int = 0) -> ToyTask:
    CALLS["load_task"] += 1
    if name == "toy-seq":
        return toy_seq_data(n_train=64, n_eval=32)[0]
    if name == "toy-img":
        return toy_image_data(n_train=32, n_eval=16)[0]
    raise ValueError(f"unknown toy task {name!r}")


def toy_load_model(name: str, task: str | None = None, num_labels: int | None = None, seed: int = 0) -> ToyLoaded:
    CALLS["load_model"] += 1
    if name == "toy-bert":
        return ToyLoaded(name, "seq-cls", toy_bert(seed=seed, num_labels=num_labels or 2, lora=False))
    raise ValueError(f"unknown toy model {name!r}")


def toy_encode(task: ToyTask, tokenizer: Any, max_length: int) -> DatasetDict:
    return DatasetDict({"train": task.train, "validation": task.validation, "test": task.test})


def toy_build_method(name: str, loaded: ToyLoaded, rank: int = 8, seed: int = 0, total_steps: int | None = None,
                     **kwargs: Any) -> MethodHandle:
    from peft import LoraConfig, get_peft_model

    from structlora.repro.methods import MethodSkipped

    CALLS["build_method"] += 1
    if name == "skipme":
        raise MethodSkipped("skipme needs hardware this machine does not have")
    if name == "sensitivity_lora":
        batches = kwargs.pop("calibration_batches")
        assert len(batches) == 4 and all("input_ids" in b and "labels" in b for b in batches), batches
    if kwargs:
        raise ValueError(f"unexpected method kwargs {kwargs}")
    torch.manual_seed(seed)
    model = get_peft_model(loaded.model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["query", "value"],
                                                    task_type="SEQ_CLS"))
    return toy_handle(model, name=name)


def toy_list_methods() -> list[str]:
    return list(TOY_METHODS)


def toy_diagnostics(model: nn.Module) -> dict[str, float]:
    return {"lora_norm": float(sum(p.detach().norm() for n, p in model.named_parameters() if "lora_B" in n))}


HOOK_ENV = "STRUCTLORA_TEST_HOOK"
"""JSON of `hooked_build_method`'s test hooks, read in the training process (a submitit job inherits
the submitter's environment): ``log`` (a file: one line per run built for training), ``hang_at`` + ``marker``
(at that step, the first process to get there writes its pid to ``marker`` and sleeps until killed),
``sleep_at`` + ``sleep_s`` (a pause at that step, so that two processes overlap)."""


def hooked_build_method(name: str, loaded: ToyLoaded, rank: int = 8, seed: int = 0, total_steps: int | None = None,
                        **kwargs: Any) -> MethodHandle:
    """``toy_build_method`` with the test hooks of ``$STRUCTLORA_TEST_HOOK`` (none when it is unset)."""
    import json
    import time

    handle = toy_build_method(name, loaded, rank=rank, seed=seed, total_steps=total_steps, **kwargs)
    hooks = json.loads(os.environ.get(HOOK_ENV) or "{}")
    if hooks.get("log"):
        with open(hooks["log"], "a", encoding="utf-8") as f:
            f.write(f"{name} seed={seed} pid={os.getpid()}\n")

    def on_step(step: int, total: int) -> None:
        if step == hooks.get("hang_at") and not os.path.exists(hooks["marker"]):
            Path(hooks["marker"]).write_text(str(os.getpid()))
            time.sleep(600)
        if step == hooks.get("sleep_at"):
            time.sleep(float(hooks.get("sleep_s", 1.0)))

    handle.on_step = on_step
    return handle


TOY_LOADERS = {"load_task": toy_load_task, "load_model": toy_load_model, "encode": toy_encode,
               "build_method": toy_build_method, "list_methods": toy_list_methods,
               "update_diagnostics": toy_diagnostics}


# ------------------------------------------------------------------------------------------ script
def dist_setup(world: int) -> tuple[ToyTask, DatasetDict, MethodHandle, Any]:
    """Task, data, a dropout-free toy BERT and the config whose 4 micro-batches per step are spread
    over ``world`` processes (``grad_accum = 4 // world``): the same arithmetic for any ``world``."""
    from structlora.repro.engine import TrainConfig

    task, enc = toy_seq_data(n_train=128, n_eval=32)
    handle = toy_handle(toy_bert(seed=0, dropout=0.0))
    cfg = TrainConfig(lr=5e-3, batch_size=16, max_steps=12, eval_every=6, seed=0, grad_accum=4 // world)
    return task, enc, handle, cfg


def main(out_dir: str) -> None:
    """Train the toy BERT on the launched processes; each rank saves its parameters and metrics."""
    torch.set_num_threads(1)
    from structlora.repro.engine import train

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    task, enc, handle, cfg = dist_setup(world)
    with torch.no_grad():  # start the ranks apart: the engine must broadcast rank 0's trainable state
        for p in handle.model.parameters():
            if p.requires_grad:
                p.add_(0.01 * rank)
    result = train(handle, task, enc, cfg, progress=False)
    state = {n: p.detach().clone() for n, p in handle.model.named_parameters() if p.requires_grad}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    torch.save({"params": state, "val": result.val_metrics, "test": result.test_metrics,
                "history": result.history, "world_size": result.world_size}, Path(out_dir) / f"rank{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
