"""Run a 2:4-pruned model from the compressed 2:4 format: prune, optionally quantize the kept values
to int8 / int4, swap every 2:4 linear for a ``SparseLinear`` with ``sparsify``, check it against the
masked dense model, and generate with both.

On a CUDA GPU the model runs in bfloat16 on the Triton kernels (``--decode mma``: sparse tensor
cores); on CPU in float32 on the reference path (decompress, then a dense matmul), where the format
saves weight memory but is not faster. See README "The compressed 2:4 format" for the measured speed.

    python examples/sparse_inference.py                     # SparseGPT 2:4, 16-bit values
    python examples/sparse_inference.py --bits 4            # 2:4 + int4, one scale per --group-size (64) columns
    python examples/sparse_inference.py --decode mma        # GPU: sparse tensor cores for decode
    python examples/sparse_inference.py --model recovered   # a 2:4 checkpoint (lora_recovery.py's) as it is
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from optimum_prune import PruningConfig, load_default_model, load_model, prune, sparsify, verify_sparsity


def greedy(model: torch.nn.Module, prompt: dict[str, torch.Tensor], new_tokens: int, pad_token_id: int) -> tuple[torch.Tensor, float]:
    """Greedy continuation of ``prompt`` and the tokens per second it took."""
    ids = prompt["input_ids"]
    if ids.is_cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return output[0, ids.shape[1] :], new_tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--model", type=Path, help="local checkpoint directory (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--method", default="sparsegpt", help="an unstructured method; it prunes to 2:4 (unless the model is 2:4)")
    parser.add_argument("--bits", type=int, choices=[8, 4], help="quantize the kept values (default: keep 16-bit values)")
    parser.add_argument("--group-size", type=int, default=64,
                        help="input columns per scale with --bits; must divide every input width (SmolLM2: 576 and 1536)")  # fmt: skip
    parser.add_argument("--decode", default="triton", choices=["triton", "mma"], help="GPU decode path")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--prompt", default="Write one sentence about the history of Paris.")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model) if args.model else load_default_model()  # float32: prune at full precision
    if verify_sparsity(model, "2:4")["conforming"]:
        print("the model is 2:4 already: used as it is")
    else:
        prune(model, PruningConfig(method=args.method, sparsity="2:4", num_calibration_samples=args.samples,
                                   calibration_seq_len=args.seq_len), tokenizer=tokenizer)  # fmt: skip
    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    dense = model.to(device, dtype)
    sparse = copy.deepcopy(dense)
    print(sparsify(sparse, bits=args.bits, group_size=args.group_size if args.bits else None, decode=args.decode))

    messages = [{"role": "user", "content": args.prompt}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True).to(device)
    with torch.no_grad():
        dense_logits, sparse_logits = dense(**prompt).logits.float(), sparse(**prompt).logits.float()
    difference = float((sparse_logits - dense_logits).abs().max() / dense_logits.abs().max())
    same_top1 = float((sparse_logits.argmax(-1) == dense_logits.argmax(-1)).float().mean())
    rounding = f" (int{args.bits} rounding included)" if args.bits else ""
    print(f"prompt logits vs the masked dense model{rounding}: largest difference {difference:.1e} of the largest logit, "
          f"same top-1 token at {same_top1:.0%} of positions")  # fmt: skip

    for name, runner in (("dense 2:4", dense), ("sparsified", sparse)):
        tokens, speed = greedy(runner, prompt, args.new_tokens, tokenizer.pad_token_id)
        print(f"{name} ({speed:.1f} tokens/s on {device}): {tokenizer.decode(tokens, skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
