"""The ``darkroom`` command: the TUI by default, ``--batch JOBS`` for headless runs.

Imports here stay light: neither Textual nor torch is imported at module level, so ``darkroom --batch`` never
loads Textual and ``darkroom --version`` / usage errors answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Sequence

EXIT_USAGE = 2
# Same names as tui.widgets.image.PROTOCOLS, repeated so this module never imports the UI package.
IMAGE_PROTOCOLS = ("auto", "tgp", "sixel", "halfcell", "unicode")
ATTENTION_MODES = ("auto", "sage", "xformers", "sdpa")  # core.accel.attention_mode.MODES


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("darkroom")
    except PackageNotFoundError:
        return "unknown"


def _where_things_are() -> str:
    """The folders Darkroom uses when no option names them, as they are on this machine: a new user's first
    questions are where to put the models and where the images went."""
    from core.paths import config_dir, data_dir

    data = data_dir(create=False)
    return (f"Without options, checkpoints are looked for in $DARKROOM_MODELS and {data / 'models'}; images are "
            f"saved in {data / 'outputs'} (a folder per day); the queue and history are in "
            f"{data / 'darkroom.sqlite3'}; your presets are in {config_dir(create=False) / 'presets'}.")


def _wrap(paragraph: str) -> str:
    return textwrap.fill(paragraph, 78, break_long_words=False, break_on_hyphens=False)  # paths stay whole


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="darkroom",
        description="Local Stable Diffusion image generation: a terminal UI, or headless with --batch.",
        # two paragraphs, wrapped here: argparse's own formatter would run them into one
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(_wrap(paragraph) for paragraph in (
            _where_things_are(),
            "Exit codes with --batch: 0 all jobs succeeded, 1 a job failed, 2 usage or input error, "
            "3 a model cannot be found or loaded, 4 the job database cannot be used (locked by another process "
            "for over 30 s, or $DARKROOM_DB_TIMEOUT seconds; disk full), 130 interrupted (129 the terminal closed, 143 SIGTERM: the current job is "
            "marked interrupted).")),
    )
    parser.add_argument(
        "--batch",
        metavar="JOBS",
        help="run jobs without the UI: a TOML file of [[job]] tables, a .jsonl file (one job per line), "
        "a .json file (one job or an array of jobs), an image that records its parameters (the job that "
        "made it), or - for stdin; "
        "prints one image path per line",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="with --batch: run only the jobs of JOBS that an earlier run did not finish (interrupted, killed, "
        "failed); a job done before is skipped and its image paths are printed as if it had run",
    )
    parser.add_argument(
        "--models-dir",
        metavar="DIR",
        action="append",
        default=None,
        help="a folder with checkpoints (ComfyUI or A1111 layout, or plain); repeatable",
    )
    parser.add_argument(
        "--output-dir", metavar="DIR", help="where images are saved (default: outputs in the data folder, named below)"
    )
    parser.add_argument("--db", metavar="FILE", help="the job queue and history database")
    parser.add_argument(
        "--image-protocol",
        choices=IMAGE_PROTOCOLS,
        default=None,
        help="how the terminal UI draws images: auto (probe the terminal: kitty graphics, then sixel, "
        "else half-cells), tgp (kitty graphics protocol), sixel, halfcell (coloured half-block characters, "
        "works everywhere incl. tmux), unicode (block characters); default: $DARKROOM_IMAGE_PROTOCOL or auto",
    )
    parser.add_argument(
        "--attention",
        choices=ATTENTION_MODES,
        type=str.lower,
        default=None,
        help="attention kernel: auto (per layer: SageAttention, then xformers, then PyTorch SDPA, as each "
        "can run it), or force one for debugging (a layer the forced kernel cannot run uses sdpa); "
        "default: $DARKROOM_ATTENTION or auto",
    )
    parser.add_argument(
        "--lowvram",
        action="store_true",
        help="for GPUs with little memory: each network on the GPU only while it runs (model offload), or "
        "the denoiser block by block when even that does not fit; default: $DARKROOM_MEMORY (auto, gpu, "
        "lowvram, sequential) or auto, which offloads only when a job's memory estimate exceeds the free VRAM",
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const="auto",
        default=None,
        metavar="MODE",
        help="compile the denoiser once per model and image size: auto or torch (the bare flag: torch.compile "
        "of each block; on an NVIDIA GPU, replayed from a CUDA graph where no cache or offload decides per "
        "step), stable-fast (when installed, NVIDIA GPUs, not with --lowvram or offload), off; "
        "the first job of each size pays the compile time; default: $DARKROOM_COMPILE or off",
    )
    parser.add_argument(
        "--precision",
        default=None,
        metavar="DTYPE",
        help="the networks' precision: auto (bf16 on GPUs with native bf16, else fp16; on a CPU bf16 where it "
        "has AMX, else fp32), fp32, bf16, fp16; default: $DARKROOM_PRECISION or auto",
    )
    parser.add_argument(
        "--list-models",
        action="store_true",
        help="list the checkpoints in the models folders with each one's family (SD1.x, SDXL, ...), variant, "
        "dtype and size, read from the file headers, and exit",
    )
    parser.add_argument(
        "--enhance",
        action="store_true",
        help="with --batch: a local Ollama-compatible LLM rewrites each job's prompt into a detailed one before "
        "it is queued (the image records both; if it cannot be reached the job runs with its own prompt)",
    )
    parser.add_argument("--enhance-url", metavar="URL", default=None,
                        help="the prompt enhancer's address (default: $DARKROOM_ENHANCE_URL or http://127.0.0.1:11434)")
    parser.add_argument("--enhance-model", metavar="NAME", default=None,
                        help="the model the enhancer runs (default: $DARKROOM_ENHANCE_MODEL or llama3.2)")
    parser.add_argument("--version", action="version", version=f"darkroom {_version()}")
    return parser


def _enhance_settings(args: argparse.Namespace):
    from core.enhance import EnhanceSettings

    return EnhanceSettings.from_env(args.enhance_url, args.enhance_model)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on usage errors
    if args.resume and args.batch is None:
        parser.error("--resume goes with --batch JOBS (it runs the jobs of that file an earlier run did not finish)")
    if args.list_models:
        if args.batch is not None:
            parser.error("--list-models lists the models and exits; run --batch JOBS separately")
        from cli.list_models import list_models

        try:
            code = list_models(args.models_dir)
            sys.stdout.flush()
        except BrokenPipeError:
            # `--list-models | head`: the reader has what it wanted. Point stdout at /dev/null so the flush at
            # exit does not raise again, as the Python docs advise for SIGPIPE.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        return code
    if args.batch is not None:
        from cli.batch import EXIT_INTERRUPTED, Hangup, run_batch

        try:
            return run_batch(
                args.batch, models_dirs=args.models_dir, output_dir=args.output_dir, db_path=args.db,
                resume=args.resume, attention=args.attention, lowvram=args.lowvram, enhance=args.enhance,
                enhance_settings=_enhance_settings(args), compile=args.compile,
                precision=args.precision,
            )
        except KeyboardInterrupt as exc:
            # Ctrl-C outside the job loop (reading stdin, scanning models, a second Ctrl-C while stopping), or
            # a SIGHUP/SIGTERM there (cli.batch.Hangup): no traceback; whatever reached the queue is safe in the
            # database. After SIGHUP the terminal may be gone, and writing to it fails.
            try:
                print(f"darkroom: {exc if isinstance(exc, Hangup) else 'interrupted'}", file=sys.stderr, flush=True)
            except OSError:
                pass
            return exc.exit_code if isinstance(exc, Hangup) else EXIT_INTERRUPTED
    import gc

    # Importing Textual allocates tens of thousands of long-lived objects; collections during that import free
    # nothing and delay the first frame. run_app keeps the collector off until the first paint, then re-enables it.
    gc.disable()
    try:
        from tui.app import run_app
    except ImportError as exc:
        from core.text import visible

        gc.enable()
        print(
            f"darkroom: error: the terminal UI cannot start ({visible(exc)}); check that Textual is "
            "installed, or run headless with --batch JOBS",
            file=sys.stderr,
        )
        return 1
    return run_app(args)


if __name__ == "__main__":
    sys.exit(main())
