"""Multi-stage teacher->student distillation. `python run_distillation.py --help` lists the options."""

from qwen_distillation.cli import main

if __name__ == "__main__":
    main()
