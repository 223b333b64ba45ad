"""Which model families keep a packed row's examples apart: the probe that ``train.packing`` runs on
each model (``modeling.parts.packed_row_leak``), on tiny random models of many transformers families,
in fp32 and bf16, with SDPA and eager attention, on the CPU.

    python benchmarks/packing_families.py --out benchmarks/results/packing_families_cpu.json
    python benchmarks/packing_families.py --device cuda --autocast --out packing_families_gpu.json  # on a GPU

``--autocast`` adds fp32 weights under bf16 autocast, as a run's student is probed.

For each: the largest logit difference of a packed example against itself alone (``packed``), the
same for the two examples run as one sequence (``mixed``), their ratio; the least move of an example
behind another in a packed row when the first is swapped for others of the same length (``swapped``)
and the largest such move in a batch of two separate rows (``control``); and whether the run's check
(``PackedLeak.leaks``: the ratio above ``LEAK_TOLERANCE``, or the swap's move above ``SWAP_TOLERANCE``
of ``mixed`` and ``SWAP_NOISE`` times ``control``) refuses it. A family that runs an example alone but
raises on the packed row (``packed_error``) is refused too. A family that a transformers version does
not build is listed with its error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen_distillation.modeling.parts import (  # noqa: E402
    LEAK_TOLERANCE, SWAP_NOISE, SWAP_TOLERANCE, PackedForwardError, packed_row_leak)

FAMILIES = ["Qwen2", "Qwen3", "Qwen2Moe", "Qwen3Moe", "Llama", "Mistral", "Mixtral", "Gemma2", "Phi", "GPTNeoX",
            "Olmo2", "Olmo3", "Falcon", "Cohere", "Starcoder2", "Granite", "StableLm", "Exaone4", "Ernie4_5",
            "SeedOss", "Apertus", "Lfm2", "OPT", "Bloom", "GptOss", "Jamba", "MiniMax", "FalconH1", "Qwen3_5Text",
            "Qwen3Next", "OlmoHybrid", "Bamba", "GraniteMoeHybrid", "NemotronH", "Zamba2", "FalconMamba", "Mamba2"]
CLASSES = {"Qwen3_5Text": "Qwen3_5"}  # the family whose config is Qwen3_5TextConfig is Qwen3_5ForCausalLM
_LINEAR = dict(head_dim=8, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
               linear_value_head_dim=8)  # the linear-attention hybrids at the size of the others
_MAMBA = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1, mamba_expand=2)
EXTRA = {"OlmoHybrid": dict(pad_token_id=0, eos_token_id=1, bos_token_id=1),
         "Bamba": dict(_MAMBA, attn_layer_indices=[1]),
         "GraniteMoeHybrid": dict(_MAMBA, layer_types=["mamba", "attention"], num_local_experts=4,
                                  num_experts_per_tok=2),
         "NemotronH": dict(mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=1, expand=2,
                           layers_block_type=["mamba", "attention"]),
         "Zamba2": dict(mamba_headdim=16, mamba_d_state=16, n_mamba_heads=4, num_mem_blocks=1,
                        layers_block_type=["mamba", "hybrid"]),
         "FalconMamba": dict(state_size=16, expand=2),
         "Mamba2": dict(num_heads=4, head_dim=16, state_size=16, n_groups=1, expand=2),
         "Qwen3_5Text": _LINEAR, "Qwen3Next": dict(_LINEAR, moe_intermediate_size=32,
                                                   shared_expert_intermediate_size=32, num_experts=4,
                                                   num_experts_per_tok=2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", action="store_true", help="also fp32 weights under bf16 autocast")
    args = parser.parse_args()
    rows = []
    precisions = ["float32", "bfloat16"] + ["float32+autocast"] * args.autocast
    for family in FAMILIES:
        for attn in ("sdpa", "eager"):
            for precision in precisions:
                dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
                row = {"family": family, "attn": attn, "dtype": precision}
                autocast = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16,
                                          enabled=precision.endswith("autocast"))
                try:
                    torch.manual_seed(0)
                    config = getattr(transformers, f"{family}Config")(
                        vocab_size=97, hidden_size=32, intermediate_size=64, ffn_dim=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        word_embed_proj_dim=32, attn_implementation=attn, **EXTRA.get(family, {}))
                    model = getattr(transformers, f"{CLASSES.get(family, family)}ForCausalLM")(config)
                    with autocast:
                        leak = packed_row_leak(model.to(args.device, dtype))
                    ratio = leak.packed / leak.mixed if leak.mixed > 0 else 0.0
                    row.update(leak._asdict(), ratio=ratio, refused=leak.leaks())
                except PackedForwardError as err:  # alone it runs, packed it raises: the run refuses it by name
                    row.update(refused=True, packed_error=f"{type(err.__cause__).__name__}: "
                                                          f"{str(err.__cause__).splitlines()[0][:160]}")
                except Exception as err:  # a family this transformers builds otherwise, or not with this attention
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                rows.append(row)
                shown = row.get("error") or (f"refused: {row['packed_error']}" if "packed_error" in row else
                                             f"packed {row['packed']:.3g}  mixed {row['mixed']:.3g}  ratio "
                                             f"{row['ratio']:.3g}  swapped {row['swapped']:.3g}  control "
                                             f"{row['control']:.3g}  {'REFUSED' if row['refused'] else 'kept apart'}")
                print(f"{family:11s} {attn:5s} {row['dtype']:16s} {shown}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
        args.out.write_text(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                                        "device": device,
                                        "tolerance": LEAK_TOLERANCE, "swap_tolerance": SWAP_TOLERANCE,
                                        "swap_noise": SWAP_NOISE, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
