"""The `mintvcs serve` and `mintvcs demo` commands; mintvcs.cli loads this module only when they run."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from mintvcs.cli import DirectoryPath, _complain
from mintvcs.errors import MintError


def _nonempty_host(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Refuse `--host ""`: aiohttp takes it for every interface, which an unset `--host "$HOST"`
    must not open up (the admin endpoints are open without --api-key-file)."""
    if not value.strip():
        raise click.BadParameter(
            "empty, which would bind every interface; give the address to bind (0.0.0.0 for all)"
        )
    # An IPv6 address as URLs write it, `[::1]`: the address inside.
    return value[1:-1] if value.startswith("[") and value.endswith("]") else value


@click.command("serve")
@click.option(
    "--repo",
    "repo",
    type=DirectoryPath(),
    default=".",
    show_default=True,
    help="The mintvcs repository whose refs are served.",
)
@click.option(
    "--base-model",
    "base_model",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="Local HF checkpoint directory of the base model.",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    callback=_nonempty_host,
    help="Address to bind (0.0.0.0: every IPv4 interface; ::, every interface, IPv4 too).",
)
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to bind (0 picks a free one).",
)
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default=None,
    help="Compute dtype [default: float32 on CPU; on CUDA float16 for a base stored in float16, else bfloat16, as vLLM's auto].",
)
@click.option(
    "--max-loras",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Device slots: revisions resident next to the base at once.",
)
@click.option(
    "--max-cpu-loras",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Decoded revisions kept in host memory.",
)
@click.option(
    "--max-rank",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Largest LoRA rank served.",
)
@click.option(
    "--api-key-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="File of bearer tokens, one a line, that the notify/warm/adapters endpoints require "
    "(--api-key-scope all: every endpoint but /health). Re-read while serving, so tokens rotate "
    "without a restart (rename a new file over it); a pipe is read once, at start.",
)
@click.option(
    "--api-key-scope",
    type=click.Choice(["admin", "all"]),
    default="admin",
    show_default=True,
    help="Which endpoints need the token: the admin ones, or all but /health (as vLLM's --api-key).",
)
@click.option(
    "--max-batch-size",
    default=32,
    show_default=True,
    type=click.IntRange(min=1),
    help="Sequences decoded together.",
)
@click.option(
    "--max-queued-requests",
    default=None,
    type=click.IntRange(min=1),
    help="Choices (sequences: n per prompt of each request) that may wait to start; a request "
    "that would take them past N gets 503 with Retry-After [default: no bound].",
)
@click.option(
    "--max-num-batched-tokens",
    default=4096,
    show_default=True,
    type=click.IntRange(min=1),
    help="Prompt tokens prefilled per step; a longer prompt is prefilled in chunks over several "
    "steps (lower it to keep running requests' token rate steady while long prompts arrive).",
)
@click.option(
    "--prefix-caching/--no-prefix-caching",
    default=True,
    show_default=True,
    help="Keep finished requests' keys and values until the room is needed (least recently used "
    "dropped first), so that a prompt starting with the same tokens for the same revision and "
    "cache_salt (a system prompt, an earlier turn) skips computing them.",
)
@click.option(
    "--cpu-threads",
    default=None,
    type=click.IntRange(min=1),
    help="Threads computing each step on CPU [default: the CPUs this process may use, "
    "counting a container's CPU quota].",
)
@click.option(
    "--max-model-len",
    default=None,
    type=click.IntRange(min=2),
    help="Prompt + output tokens per sequence [default: min(2048, the model's)].",
)
@click.option(
    "--max-prompt-bytes",
    default=64 * 1024,
    show_default=True,
    type=click.IntRange(min=1),
    help="Larger prompts get 413.",
)
@click.option(
    "--max-tokens-limit",
    default=1024,
    show_default=True,
    type=click.IntRange(min=1),
    help="Largest max_tokens a request may ask for.",
)
@click.option(
    "--ref-poll-interval",
    default=0.15,
    show_default=True,
    type=click.FloatRange(0.01, 1.0),
    help="Seconds between checks of the refs in use.",
)
@click.option(
    "--send-timeout",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds one write of a response (a stream's event, or a whole answer) may wait for "
    "its client to read; past it the request is cancelled (499) and the connection closed.",
)
@click.option(
    "--max-stream-backlog",
    default=8192,
    show_default=True,
    type=click.IntRange(min=1),
    help="Events (tokens of all its choices) generated for one streamed response and not yet "
    "sent to its client; past it the request is cancelled as a slow consumer (499) and the "
    "connection closed.",
)
@click.option(
    "--drain-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="On SIGTERM/SIGINT/SIGHUP, seconds to let running requests finish (a second signal stops waiting).",
)
@click.option(
    "--tool-call-parser",
    type=click.Choice(
        ["hermes", "llama3_json"]
    ),  # http_chat.TOOL_CALL_FORMATS (not imported: torch)
    help='Read replies to tool_choice "auto" for tool calls in this format (hermes: '
    '<tool_call>{"name": ..., "arguments": ...}</tool_call>, as Qwen2.5 and Hermes '
    'models write them; llama3_json: {"name": ..., "parameters": ...} objects separated by ";" '
    "as the whole reply, as Llama 3.1-3.3 write them) [default: auto is refused].",
)
@click.option(
    "--served-model-name",
    help="The model (or ref) that asks for the base model alone, with no adapter "
    "[default: the --base-model folder's name, or org/name for a Hugging Face hub cache "
    "snapshot]. It wins over a branch or tag of the same name.",
)
@click.option(
    "--generation-config",
    type=click.Choice(["auto", "vllm"]),
    default="auto",
    show_default=True,
    help="auto: a request that leaves out temperature, top_p, top_k, min_p or "
    "repetition_penalty (a chat request: max_tokens, from max_new_tokens) gets the base's "
    "generation_config.json value, as vLLM does; "
    "vllm: the neutral defaults (temperature 1, no top-p/top-k/min-p, no penalty).",
)
@click.option(
    "--enforce-eager",
    is_flag=True,
    help="Run every decode step eagerly on CUDA instead of replaying captured CUDA graphs.",
)
def serve(
    repo: Path,
    base_model: Path,
    host: str,
    port: int,
    device: str,
    dtype: str | None,
    max_loras: int,
    max_cpu_loras: int,
    max_rank: int,
    api_key_file: Path | None,
    api_key_scope: str,
    max_batch_size: int,
    max_queued_requests: int | None,
    max_num_batched_tokens: int,
    prefix_caching: bool,
    cpu_threads: int | None,
    max_model_len: int | None,
    max_prompt_bytes: int,
    max_tokens_limit: int,
    ref_poll_interval: float,
    send_timeout: float,
    max_stream_backlog: int,
    drain_timeout: float,
    tool_call_parser: str | None,
    served_model_name: str | None,
    generation_config: str,
    enforce_eager: bool,
) -> None:
    """Serve generate-by-ref over HTTP from one resident base model."""
    from mintvcs.console import Terminated, catch_terminating_signals

    # SIGTERM or SIGHUP before the server's own handlers are in place (importing torch takes
    # seconds) is the clean stop it is afterwards, exit 0, not death by the signal.
    catch_terminating_signals()
    try:
        from mintvcs.serve.app import ServerConfig, base_name_problem, run

        # Refused here as usage errors (exit 2, naming --help), as click's own checks are;
        # ServerConfig checks them again for Python callers.
        if api_key_scope == "all" and api_key_file is None:
            raise click.UsageError(
                "--api-key-scope all needs --api-key-file: without tokens every endpoint is open"
            )
        if served_model_name is not None and (problem := base_name_problem(served_model_name)):
            raise click.BadParameter(
                f"{served_model_name!r} {problem}; give a plain name",
                param_hint="'--served-model-name'",
            )
        config = ServerConfig(
            repo=repo,
            base_model=base_model,
            host=host,
            port=port,
            device=device,
            dtype=dtype,
            max_loras=max_loras,
            max_cpu_loras=max_cpu_loras,
            max_rank=max_rank,
            api_key_file=api_key_file,
            api_key_scope=api_key_scope,
            max_batch_size=max_batch_size,
            max_queued_requests=max_queued_requests,
            max_num_batched_tokens=max_num_batched_tokens,
            prefix_caching=prefix_caching,
            cpu_threads=cpu_threads,
            max_model_len=max_model_len,
            max_prompt_bytes=max_prompt_bytes,
            max_tokens_limit=max_tokens_limit,
            ref_poll_interval=ref_poll_interval,
            send_timeout=send_timeout,
            max_stream_backlog=max_stream_backlog,
            drain_timeout=drain_timeout,
            tool_call_parser=tool_call_parser,
            served_model_name=served_model_name,
            enforce_eager=enforce_eager,
            generation_config=generation_config,
        )
        status = run(config)
    except Terminated as err:
        if err.signum == signal.SIGQUIT:  # a core dump asked for: not a stop
            raise
        _complain("mintvcs serve: stopped before it was listening")
        sys.exit(0)
    except MintError as err:
        _complain(f"error: {err}")  # escaped, as every command's error line
        sys.exit(err.exit_code)
    except OSError as err:  # the port is taken, most often
        _complain(f"error: cannot serve on {host}:{port}: {err.strerror or err}")
        sys.exit(1)
    sys.exit(status)


@click.command("demo")
@click.option(
    "--workdir",
    type=DirectoryPath(),
    default=None,
    help="Where the demo writes its adapters and repository: a new or empty directory, or one "
    "an earlier demo made [default: a fresh temporary directory].",
)
@click.option(
    "--cache-dir",
    type=DirectoryPath(),
    default=None,
    help="Where the tiny base is cached [default: $XDG_CACHE_HOME/mintvcs/demo].",
)
@click.option(
    "--train-steps",
    default=None,
    type=click.IntRange(min=1),
    help="PEFT training steps per adapter (a few seconds' worth by default).",
)
def demo(workdir: Path | None, cache_dir: Path | None, train_steps: int | None) -> None:
    """Run the whole story on an embedded tiny base: train, commit, branch, tag, serve, move main, log, diff."""
    from mintvcs.serve.demo import run_demo

    try:  # the demo trains its adapters with PEFT; serving needs neither
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        _complain(
            f"error: mintvcs demo trains its adapters with PEFT, and {err.name or err} is not "
            "installed: pip install 'mintvcs[demo]'"
        )
        sys.exit(1)

    try:
        run_demo(workdir=workdir, cache_dir=cache_dir, train_steps=train_steps)
    except MintError as err:
        _complain(f"error: {err}")  # escaped, as every command's error line
        sys.exit(err.exit_code)


@click.group()
def _main() -> None:
    """Run the serving commands without the rest of the CLI (python -m mintvcs.serve.cli)."""


_main.add_command(serve)
_main.add_command(demo)

if __name__ == "__main__":
    _main()
