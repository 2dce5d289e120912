"""structlora: StructLoRA (IB-gated directions + depth coordination) on top of Hugging Face peft.

    from structlora import StructLoraConfig, get_structlora_model
    model = get_structlora_model(base_model, StructLoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    model.train()
    loss = model(**batch).loss + model.structlora_loss()
    model.save_pretrained("adapter/")           # the folded export: a standard peft LoRA adapter
    model.save_training_state("state/")         # resumable: StructLoraModel.from_pretrained(base, "state/", is_trainable=True)
"""
from .config import StructLoraConfig
from .model import StructLoraModel, get_structlora_model

__version__ = "0.1.0"

__all__ = ["StructLoraConfig", "StructLoraModel", "get_structlora_model", "__version__"]
