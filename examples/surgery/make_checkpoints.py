"""Tiny Llama-shaped checkpoints for the layer-surgery recipe (examples/surgery/).

    python examples/surgery/make_checkpoints.py          # writes examples/surgery/checkpoints/

``llama-base`` (4 layers, hidden size 16, about 14k parameters) and two fine-tunes of it,
``llama-chat`` and ``llama-code`` (the base plus small seeded noise), as Hugging Face
directories (config.json and model.safetensors) that ``transformers`` loads. The recipe
``frankenmerge.tv`` stacks layers of the two fine-tunes into a 6-layer model.
"""

from __future__ import annotations

import argparse
import os

import torch

from tvlang.testing.synth import finetune_like, llama_spec, make_state_dict, write_checkpoint

HIDDEN, LAYERS, VOCAB, INTERMEDIATE = 16, 4, 32, 24
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS, "num_attention_heads": 2,
    "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 32,
    "tie_word_embeddings": False, "torch_dtype": "float32",
}


def build() -> dict[str, dict[str, torch.Tensor]]:
    """The three state dicts, by directory name (deterministic)."""
    spec = {k: v for k, v in llama_spec(HIDDEN, LAYERS, VOCAB, INTERMEDIATE).items() if k != "model.position_ids"}
    base = make_state_dict(spec, seed=0)
    return {"llama-base": base, "llama-chat": finetune_like(base, seed=1, scale=0.05),
            "llama-code": finetune_like(base, seed=2, scale=0.05)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints"))
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    for name, state in build().items():
        write_checkpoint(os.path.join(args.out, name), state, config=CONFIG, force=True)
        if not args.quiet:
            print(f"wrote {os.path.join(args.out, name)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
