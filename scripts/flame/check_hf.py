# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
After flame's converter: the Hugging Face folder loads with `AutoModelForCausalLM.from_pretrained`, holds exactly
the weights of the DCP checkpoint (none missing, none re-initialised), gives the same logits as a model built from
the DCP weights directly, and generates.

    python scripts/flame/check_hf.py --path exp/mesa-1gpu --step 300 [--device cuda]
"""

import argparse
import os
import tempfile

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from transformers import AutoModelForCausalLM, AutoTokenizer

import fla_mesa.models  # noqa: F401  (registers model_type "mesa")


def dcp_weights(path: str, step: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'checkpoint.pt')
        dcp_to_torch_save(os.path.join(path, 'checkpoint', f'step-{step}'), out)
        return torch.load(out, map_location='cpu', weights_only=False)['model']


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--path', required=True, help="flame's --job.dump_folder, after convert_dcp_to_hf")
    parser.add_argument('--step', type=int, required=True)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args()

    weights = dcp_weights(args.path, args.step)
    hf = AutoModelForCausalLM.from_pretrained(args.path, dtype=torch.float32).to(args.device).eval()
    params = dict(hf.state_dict())
    missing = sorted(set(weights) - set(params))
    extra = sorted(set(params) - set(weights))
    if missing or extra:
        raise SystemExit(f"keys differ: in the DCP checkpoint only {missing}; in the HF model only {extra}")
    differ = [k for k in weights if not torch.equal(weights[k].float().cpu(), params[k].float().cpu())]
    if differ:
        raise SystemExit(f"{len(differ)} tensors differ between the DCP checkpoint and the HF model: {differ[:5]}")
    print(f"{len(weights)} tensors, all equal to the DCP checkpoint's")

    ref = AutoModelForCausalLM.from_config(hf.config).to(args.device).eval()
    ref.load_state_dict(weights)
    tok = AutoTokenizer.from_pretrained(args.path)
    ids = tok(['the model reads this sentence and continues it'] * 2, return_tensors='pt')['input_ids'].to(args.device)
    with torch.no_grad():
        a, b = hf(input_ids=ids).logits.float(), ref(input_ids=ids).logits.float()
        err = ((a - b).norm() / b.norm()).item()
        print(f"logits: relative difference HF vs DCP weights {err:.2e}")
        if not err <= 0.0:
            raise SystemExit('the HF model and the DCP weights give different logits')
        for dtype in (torch.float32, torch.bfloat16):
            out = hf.to(dtype).generate(ids, max_new_tokens=16, do_sample=False,
                                        pad_token_id=tok.eos_token_id)
            print(f"generate ({dtype}): {tok.decode(out[0, ids.shape[1]:])!r}")


if __name__ == '__main__':
    main()
