"""Build a tiny random-weight Llama that `vllm serve` can load, offline, in a few seconds.

    .venv-vllm/bin/python deploy/vllm/build_tiny_model.py OUT_DIR [--force]

Run it with the vLLM venv's python (it has torch and transformers; see install.sh). Nothing is
downloaded: the tokenizer is a 4,096-token byte-level BPE trained with `tokenizers` on this
Python's own standard library sources, and the weights are drawn from a fixed seed. The model:
2 layers, hidden 128, 2 heads (head dim 64), float32, 2,048 positions, a ChatML chat template
(`<|im_start|>role\\n...<|im_end|>`), `<|im_end|>` as end of sequence. Its text is noise; its
token counts are real, which is what a gateway needs.

The same Python and library versions give byte-identical files (the script prints a digest of
the output). OUT_DIR is left alone when it already holds a model built by the same recipe, so
re-running is instant; --force rebuilds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

RECIPE = {
    "recipe": 1,
    "vocab_size": 4096,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 2048,
    "seed": 0,
    "corpus_bytes": 4_000_000,
}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
STAMP = "vgate-tiny-model.json"


def corpus(limit: int) -> Iterator[str]:
    """The stdlib's top-level *.py files in name order, up to about `limit` bytes."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        yield text
        total += len(text)
        if total >= limit:
            return


def build(out: Path, force: bool = False) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    t0 = time.perf_counter()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=RECIPE["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(RECIPE["corpus_bytes"]), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=RECIPE["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    t_tok = time.perf_counter() - t0

    eos_id = tok.token_to_id("<|im_end|>")
    pad_id = tok.token_to_id("<|endoftext|>")
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=RECIPE["hidden_size"],
        intermediate_size=RECIPE["intermediate_size"],
        num_hidden_layers=RECIPE["num_hidden_layers"],
        num_attention_heads=RECIPE["num_attention_heads"],
        num_key_value_heads=RECIPE["num_attention_heads"],
        max_position_embeddings=RECIPE["max_position_embeddings"],
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(RECIPE["seed"])
    model = LlamaForCausalLM(config).to(torch.float32).eval()

    # Written beside OUT_DIR, then renamed into place: two workers starting at once, or a
    # worker already loading OUT_DIR, never see half a model.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        generation = GenerationConfig(bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id)
        generation.save_pretrained(tmp)
        fast.save_pretrained(tmp)
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        (tmp / STAMP).write_text(json.dumps(RECIPE, sort_keys=True) + "\n")
        if is_current(out) and not force:
            print(f"up to date: {out} (built by another process meanwhile)")
            return
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"built {out}: {params:,} parameters, vocab {tok.get_vocab_size()}, "
        f"tokenizer {t_tok:.1f}s, total {time.perf_counter() - t0:.1f}s"
    )


def is_current(out: Path) -> bool:
    stamp = out / STAMP
    try:
        return bool(json.loads(stamp.read_text()) == RECIPE)
    except (OSError, ValueError):
        return False


def digest(out: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        h.update(path.relative_to(out).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT_DIR is current")
    args = parser.parse_args(argv)
    out: Path = args.out_dir.resolve()
    if is_current(out) and not args.force:
        print(f"up to date: {out}")
    else:
        build(out, force=args.force)
    print(f"digest {digest(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
