"""deepseek-mini: DeepSeek-style language models built from scratch for learning.

Reference PyTorch code for attention (incl. Multi-head Latent Attention), DeepSeekMoE, LoRA
and quantization, plus fused Triton kernels used automatically on CUDA tensors.

Top-level names are imported lazily so that `import deepseek_mini` stays fast and a learner
who only needs the data helpers does not pay for the whole model.
"""

__version__ = "0.1.0"

# public name -> module that defines it (each module is one idea; see docs/design in README)
_EXPORTS = {
    "DeepseekConfig": "model",
    "DeepseekModel": "model",
    "load_pretrained": "hf",
    "save_pretrained": "hf",
    "pretrained": "pretrained",
    "load_mnist": "data",
    "device": "backend",
    "LoRALinear": "lora",
    "inject_lora": "lora",
    "save_lora": "lora",
    "load_lora": "lora",
    "QuantLinear": "quant",
    "quantize_model": "quant",
    "Trainer": "train",
    "TrainConfig": "train",
    "ByteBPETokenizer": "tokenizer",
    "train_bpe": "tokenizer",
    "stdlib_corpus": "corpus",
    "arithmetic_task": "tasks",
    "digit_string_task": "tasks",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'deepseek_mini' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
