"""Benchmark: what the runtime's tokenizer costs the model, on the target task's held-out texts.

The dense fp32 model (PyTorch) scores each held-out text (prompt + reference answer) on three encodings of it:
the model's own tokenizer (transformers), onnxruntime-genai reading the tokenizer files edgeslim ships (the split
spelled out, exporter/runtime_tokenizer.py), and onnxruntime-genai reading the files `save_pretrained` writes (the
split left implied, as edgeslim shipped them before). Loss in bits per byte of text, the first token of each
text charged at log2(vocabulary) in every encoding so that encodings of different lengths compare.

    python scripts/bench_tokenizer.py EXPORT_FOLDER [--task code] [--texts 80]

EXPORT_FOLDER is an export of the default model (its genai_config.json is reused; the model is not run).
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
from pathlib import Path

import onnxruntime_genai as og
import torch

from exporter.models import load_model
from exporter.runtime_tokenizer import write_tokenizer
from exporter.tasks import data_dir, get_task


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("export", type=Path)
    parser.add_argument("--task", default="code")
    parser.add_argument("--texts", type=int, default=80)
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(None)
    texts = [prompt + answer for prompt, answer in get_task(args.task).heldout(data_dir())][:args.texts]
    work = Path(tempfile.mkdtemp(prefix="bench-tokenizer-"))
    model_ids = lambda text: loaded.tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    encoders = {"model's tokenizer (transformers)": model_ids}
    for name, write in [("genai, split spelled out (shipped)", write_tokenizer),
                        ("genai, split implied (before)", lambda tokenizer, folder: tokenizer.save_pretrained(folder))]:
        folder = work / str(len(encoders))
        folder.mkdir()
        shutil.copy(args.export / "genai_config.json", folder)
        write(loaded.tokenizer, folder)
        runtime = og.Tokenizer(str(folder))
        encoders[name] = lambda text, runtime=runtime: [int(i) for i in runtime.encode(text)]
    total_bytes = sum(len(text.encode()) for text in texts)
    print(f"{len(texts)} held-out {args.task} texts, {total_bytes} bytes; dense fp32 {loaded.name}")
    for name, encode in encoders.items():
        bits, differing = 0.0, 0
        for text in texts:
            ids = encode(text)
            differing += ids != model_ids(text)
            with torch.no_grad():
                logits = loaded.model(torch.tensor([ids])).logits[0, :-1].float()
            nats = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
            bits += nats / math.log(2) + math.log2(logits.shape[-1])
        print(f"{name}: {bits / total_bytes:.3f} bits/byte, {differing} of {len(texts)} texts encoded differently")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
