"""`make serve`: a run's GGUF file behind llama.cpp's OpenAI-compatible HTTP server (llama-cpp-python's).

Why llama-cpp-python's server rather than `litgpt serve`: it serves the very file `make gguf` checked
(the one people load in llama.cpp, ollama or LM Studio), speaks the OpenAI API (`/v1/completions`,
`/v1/chat/completions`, `/v1/models`) with server-sent-event streaming out of the box, and runs the
quantized files; `litgpt serve` needs LitServe, which this project does not install, and serves LitGPT's
own request format unless its OpenAI spec is switched on, for chat requests only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tinystories_lab.errors import UserError
from tinystories_lab.export.gguf import QUANTS
from tinystories_lab.export.gguf_parity import INSTALL_HINT
from tinystories_lab.models import results_dir, select_checkpoints

HOST = "127.0.0.1"  # local only: the server has no authentication


def server_command(gguf_file: Path, name: str, port: int) -> list[str]:
    """The llama-cpp-python server command line for `gguf_file`, answering as model `name` on `port`."""
    return [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_file), "--model_alias", name,
        "--host", HOST, "--port", str(port),
        "--n_ctx", "0",  # the context the model was trained with (from the file), not the server's 2048
        "--n_threads", str(os.cpu_count()),
    ]  # fmt: skip


def gguf_file_of(model: str, quant: str, queues: list[Path] | None) -> tuple[str, Path]:
    """The run's name and its checked GGUF file, or an error naming the command that makes it."""
    if quant not in QUANTS:
        raise UserError(f"Unknown QUANT {quant!r}: choose one of {', '.join(QUANTS)}.")
    name, checkpoint_dir = select_checkpoints(model, queues)[0]
    path = results_dir(checkpoint_dir) / "gguf" / f"{name}-{quant}.gguf"
    if not path.is_file():
        raise UserError(f"{path} does not exist: make it first with `make gguf MODEL={model} QUANT={quant}`.")
    return name, path


def serve(model: str, port: int = 8000, quant: str = "f32", queues: list[Path] | None = None) -> None:
    """Serve a run's GGUF file (from `make gguf`) on http://127.0.0.1:PORT with an OpenAI-compatible API.

    Endpoints: /v1/completions (stories from a prompt; "stream": true streams server-sent events),
    /v1/chat/completions, /v1/models; the model answers to the run's name. Runs until interrupted.

    Args:
        model: The experiment's name in the queues, or a checkpoint folder, as for `make gguf`.
        port: The port on 127.0.0.1.
        quant: Which of the run's GGUF files: f32, f16 or q8_0.
        queues: Queue files to look the name up in (default: experiments.yaml and experiments.demo.yaml).
    """
    name, path = gguf_file_of(model, quant, queues)
    try:
        import llama_cpp.server  # noqa: F401  (its FastAPI app, uvicorn and SSE come with the extra)
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    print(f"serving {path} as {name!r} on http://{HOST}:{port}/v1 (Ctrl-C stops it)", flush=True)
    command = server_command(path, name, port)
    os.execv(command[0], command)
