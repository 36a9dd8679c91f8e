"""Entry point of ``python -m trainer`` (run from the pack's folder): bring up ComfyUI, run the CLI.

ComfyUI is located by ``implicit_negatives.comfyui.headless`` (``$COMFYUI_PATH``, or the ComfyUI tree this
pack is installed in); ``--cpu`` forces the CPU, otherwise CUDA is used when it is usable.
"""

import sys

from implicit_negatives.comfyui.headless import EngineError, import_comfyui


def main() -> int:
    try:
        import_comfyui(cpu="--cpu" in sys.argv[1:])
    except EngineError as error:
        sys.exit(f"error: {error}\nThe trainer runs inside ComfyUI (even --help): run it with the Python that runs "
                 "ComfyUI, from ComfyUI/custom_nodes/<this pack>, or set COMFYUI_PATH=/path/to/ComfyUI.")
    from trainer.cli import main as cli_main
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
