"""How deep the model thought at every token: the report behind ``mythos loops``.

:func:`loop_report` runs a prompt (and optionally greedy generation) with ``output_loop_stats=True`` and returns, per
token, the loops its position ran and the relative state change ||h_{t+1} - h_t|| / ||h_{t+1}|| at every loop t.
:func:`format_table` prints it, one line per token; :func:`write_heatmap` draws it (matplotlib, imported there).
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .demo.files import write_atomically


@dataclass
class LoopReport:
    """Per token: its id, its text, where it came from (``prompt`` or ``new``), the loops its position ran (None for
    the last generated token, which no forward read) and the state change per loop (NaN where it did not run)."""

    token_ids: list[int]
    texts: list[str]
    sources: list[str]
    loops: list[int | None]
    state_change: list[list[float]]  # [tokens][longest budget]
    spectral_radius: float | None = None
    options: dict = field(default_factory=dict)

    @property
    def longest(self) -> int:
        return len(self.state_change[0]) if self.state_change else 0


def token_text(tokenizer, token_id: int) -> str:
    """The token's text; a piece that is not valid UTF-8 on its own (one byte of a character) keeps its token name."""
    text = tokenizer.decode([token_id])
    if "\ufffd" in text:
        text = tokenizer.convert_ids_to_tokens(token_id)
    return text


def _prompt_only(model, input_ids, options: dict):
    with torch.no_grad():
        out = model(input_ids, use_cache=False, output_loop_stats=True, **options)
    return out.loops_used[0].tolist(), out.loop_stats.state_change[:, 0].T, out.loop_stats


def _with_generation(model, input_ids, max_new_tokens: int, options: dict):
    from .modeling_mythos import MythosLoopRecorder

    recorder = MythosLoopRecorder(keep_stats=True)
    with torch.no_grad():
        sequences = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                   max_new_tokens=max_new_tokens, loop_recorder=recorder, **options)
    # the positions the forwards ran: the prompt, then every generated token but the last
    changes = [stats.state_change[:, 0].T for stats in recorder.stats]
    longest = max(change.shape[1] for change in changes)
    change = torch.cat([torch.nn.functional.pad(c, (0, longest - c.shape[1]), value=math.nan) for c in changes])
    loops = recorder.prompt_loops[0].tolist() + recorder.token_loops()[0, 1:].tolist()
    if len(loops) != change.shape[0]:
        raise RuntimeError(f"the loop recorder has loops for {len(loops)} positions but stats for {change.shape[0]}")
    return sequences[0], loops + [None], change, recorder.stats[-1]


def loop_report(model, tokenizer, prompt: str, max_new_tokens: int = 0, **options) -> LoopReport:
    """Run ``prompt`` through ``model`` (then generate ``max_new_tokens`` greedily) and report the loops per token.

    ``options`` go to every forward: ``n_loops``, ``exit_criterion``, ``exit_threshold`` (None values are dropped).
    """
    options = {key: value for key, value in options.items() if value is not None}
    input_ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=model.device)
    if input_ids.shape[1] == 0:
        raise ValueError(f"the prompt {prompt!r} encodes to no tokens")
    if max_new_tokens > 0:
        sequence, loops, change, stats = _with_generation(model, input_ids, max_new_tokens, options)
    else:
        sequence = input_ids[0]
        loops, change, stats = _prompt_only(model, input_ids, options)
    change = change.float().cpu()
    if len(loops) > change.shape[0]:  # the last generated token: no position ran
        change = torch.cat([change, torch.full((1, change.shape[1]), math.nan)])
    ids = sequence.tolist()
    prompt_len = input_ids.shape[1]
    return LoopReport(token_ids=ids, texts=[token_text(tokenizer, i) for i in ids],
                      sources=["prompt" if i < prompt_len else "new" for i in range(len(ids))], loops=loops,
                      state_change=change.tolist(), spectral_radius=stats.spectral_radius, options=options)


def _cell(value: float) -> str:
    return f"{'.':>7}" if math.isnan(value) else f"{value:>7.2g}"


def format_table(report: LoopReport) -> str:
    """One line per token: index, source, token text (repr-escaped), loops used, state change per loop."""
    texts = [repr(text) if len(repr(text)) <= 16 else repr(text)[:15] + "…" for text in report.texts]
    width = max(5, *(len(text) for text in texts))
    header = f"{'i':>4}  {'from':<6}  {'token':<{width}}  {'loops':>5}  " + "".join(
        f"{f't{t}':>7}" for t in range(report.longest))
    lines = [header]
    for i, (text, source, loops, change) in enumerate(zip(texts, report.sources, report.loops,
                                                          report.state_change)):
        used = "-" if loops is None else str(loops)
        lines.append(f"{i:>4}  {source:<6}  {text:<{width}}  {used:>5}  " + "".join(_cell(v) for v in change))
    ran = [loops for loops in report.loops if loops is not None]
    options = ", ".join(f"{key}={value}" for key, value in report.options.items()) or "defaults"
    footer = f"mean loops {sum(ran) / len(ran):.2f} over {len(ran)} positions ({options})"
    if report.spectral_radius is not None:
        footer += f"; rho(A) = {report.spectral_radius:.4f}"
    lines.append(footer)
    lines.append("t<k>: relative state change ||h_{t+1} - h_t|| / ||h_{t+1}|| at loop t; '.': not run")
    return "\n".join(lines)


def write_heatmap(report: LoopReport, path: Path) -> None:
    """Tokens (rows) by loops (columns), coloured by the state change; loops a position did not run stay blank.
    Written atomically: a temporary file beside ``path`` is renamed over it."""
    import matplotlib
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    grid = np.ma.masked_invalid(np.array(report.state_change, dtype=float))
    positive = grid.compressed()[grid.compressed() > 0]
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size and positive.min() < positive.max() \
        else None
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    rows = len(report.texts)
    fig = Figure(figsize=(2.5 + 0.55 * max(report.longest, 1), min(2 + 0.22 * rows, 40)))
    ax = fig.subplots()
    image = ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=r"$\|h_{t+1} - h_t\| \,/\, \|h_{t+1}\|$")
    ax.set_xticks(range(report.longest))
    ax.set_xlabel("loop t")
    if rows <= 120:  # beyond that the labels overlap; the row index still reads off the axis
        ax.set_yticks(range(rows), [f"{i} {text!r}" for i, text in enumerate(report.texts)], fontsize=7)
    prompt_len = report.sources.count("prompt")
    if prompt_len < rows:
        ax.axhline(prompt_len - 0.5, color="red", linewidth=1)
    ax.set_title("state change per loop (blank: not run)")
    fig.tight_layout()
    write_atomically(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
