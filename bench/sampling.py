"""Tokens/s of ``LMDistribution.sample`` against transformers ``generate``, and
``log_prob`` throughput (forward, forward+backward).

    python bench/sampling.py [--quick] [--device cuda] [--model tinylm|toy]

Both samplers draw ancestral samples from the raw LM (``do_sample=True,
top_k=0``, temperature 1), 20 new tokens, on the same model; calls alternate
between them and medians are reported.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import base_parser, interleaved, machine, table, write_section  # noqa: E402

import pyro_lm  # noqa: E402
from pyro_lm.lm import toy_lm  # noqa: E402


def load(name: str, device, dtype):
    if name == "toy":  # the peers' task: random GPT-2, 2 layers, 64 wide, vocab 64, BOS/EOS 0
        return toy_lm(vocab_size=64, n_layer=2, n_embd=64, n_head=2, init_std=0.02,
                      device=device, dtype=dtype), torch.zeros(1, 1, dtype=torch.long)
    lm = pyro_lm.CausalLM.from_pretrained(pyro_lm.bundled_model_path(name), device=device,
                                          dtype=dtype)
    ids, _ = lm.encode("review :")
    return lm, ids.cpu()


def main(args):
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.bf16 else None
    lm, prompt = load(args.model, device, dtype)
    t = args.max_new_tokens
    rows = []
    for batch in args.batch:
        ids = prompt.expand(batch, -1).to(device)
        mask = torch.ones_like(ids)
        dist = pyro_lm.LMDistribution(lm, ids, t)

        def ours(dist=dist):
            return dist.sample()

        def hf(ids=ids, mask=mask):
            with torch.no_grad():
                return lm.model.generate(ids, attention_mask=mask, do_sample=True, top_k=0,
                                         top_p=1.0, temperature=1.0, max_new_tokens=t,
                                         pad_token_id=lm.pad_token_id,
                                         eos_token_id=lm.eos_token_id)

        med = interleaved({"pyro_lm": ours, "generate": hf}, repeats=args.repeats,
                          device=device)
        tok = batch * t
        rows.append([f"sample, batch {batch}", f"{tok / med['pyro_lm']:,.0f}",
                     f"{tok / med['generate']:,.0f}", f"{med['generate'] / med['pyro_lm']:.2f}"])
        print(rows[-1], flush=True)
    # log_prob throughput on batch max(args.batch)
    batch = max(args.batch)
    ids = prompt.expand(batch, -1).to(device)
    dist = pyro_lm.LMDistribution(lm, ids, t)
    x = dist.sample()
    guide = lm.trainable_copy()
    gdist = dist.with_lm(guide)

    def fwd():
        with torch.no_grad():
            return dist.log_prob(x)

    def fwd_bwd():
        guide.zero_grad(set_to_none=True)
        gdist.log_prob(x).sum().backward()

    med = interleaved({"fwd": fwd, "fwd_bwd": fwd_bwd}, repeats=args.repeats, device=device)
    for name, label in (("fwd", "log_prob forward"), ("fwd_bwd", "log_prob forward+backward")):
        rows.append([f"{label}, batch {batch}", f"{batch * t / med[name]:,.0f}", "", ""])
        print(rows[-1], flush=True)
    body = (f"## Sampling and log_prob ({args.model} model, {t} new tokens, "
            f"{device.type}{', bf16' if args.bf16 else ''})\n\n"
            f"Machine: {machine()}.\n"
            f"Command: `python bench/sampling.py --model {args.model} --device {args.device}"
            f"{' --bf16' if args.bf16 else ''}`\n\n"
            + table(["case", "pyro_lm tok/s", "generate tok/s", "pyro_lm ÷ generate speed"],
                    rows))
    if not args.quick:
        write_section(f"sampling-{args.model}-{device.type}", body)
    print(body)
    return rows


def parse_args(argv=None):
    p = base_parser(__doc__.splitlines()[0], repeats=9)
    p.add_argument("--model", default="toy", help="'toy' (peers' random GPT-2) or a bundled name")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--max-new-tokens", type=int, default=20)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.batch = 2, [1, 16]
    return args


if __name__ == "__main__":
    main(parse_args())
