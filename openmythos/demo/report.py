"""What the demo prints and writes about its results: training summaries, the accuracy table, the headline numbers
and the plot.

Standard library only at import (matplotlib inside ``plot``), so ``openmythos.demo`` can re-export these without
importing torch.
"""

from pathlib import Path

from .files import write_atomically

# the three models, and the accuracy table's column names
LOOPED, SAME_PARAMS, SAME_COMPUTE = "looped", "dense_same_params", "dense_same_compute"
# the looped model under the exit rule (no hop count given): accuracy, and the mean loops its answer position ran
EXIT, EXIT_LOOPS = "looped@exit", "looped@exit:mean_loops"


def training_record(steps: int, seconds: float, log_history: list[dict]) -> dict:
    """Steps, time, first and last logged loss and, for the looped model, the expert load balance at the end."""
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    record = {"steps": steps, "seconds": seconds, "first_loss": losses[0] if losses else None,
              "last_loss": losses[-1] if losses else None}
    balance = [entry for entry in log_history if "moe/load_cv" in entry]
    if balance:
        # load_cv is finite even when an expert got no token (where load_max_min_ratio is inf)
        record["expert_load_cv"] = balance[-1]["moe/load_cv"]
        record["idle_expert"] = balance[-1].get("moe/load_max_min_ratio") == float("inf")
    return record


def describe_training(name: str, record: dict) -> str:
    """One console line per trained model, e.g. ``looped: 1500 steps in 95 s, loss 3.10 -> 0.02, ...``."""
    line = f"  {name}: {record['steps']} steps in {record['seconds']:.0f} s"
    if record["first_loss"] is not None:
        line += f", loss {record['first_loss']:.3f} -> {record['last_loss']:.3f}"
    if "expert_load_cv" in record:
        idle = "; an expert got no token" if record["idle_expert"] else ""
        line += (f", expert load CV {record['expert_load_cv']:.2f} at the last step (std/mean of tokens per expert, "
                 f"0 = even{idle})")
    return line


def lowest_at_or_past_hops(table: dict, args) -> list[float | None]:
    """Per hop count k, the looped model's lowest accuracy over n_loops = k..--max-loops (None when k is past it):
    1.0 means no loop count at or past the hop count loses the answer (no overthinking)."""
    return [min(table[f"{LOOPED}@{n}"][k - 1] for n in range(k, args.max_loops + 1)) if k <= args.max_loops else None
            for k in range(1, args.eval_hops + 1)]


def format_table(table: dict, args) -> str:
    """Markdown: one row per hop count, one column per model (the looped one at each n_loops, and under the exit rule
    with its mean loops when the table has it)."""
    exit_rule = EXIT in table
    columns = ([EXIT, EXIT_LOOPS, "lowest"] if exit_rule else []) + [f"{LOOPED}@hops"] + [
        f"{LOOPED}@{n}" for n in range(1, args.max_loops + 1)] + [SAME_PARAMS, SAME_COMPUTE]
    titles = (["hops"] + (["exit rule (no hop count)", "exit rule: mean loops", "n_loops >= hops: lowest"]
                          if exit_rule else [])
              + ["looped, n_loops=hops"] + [f"n_loops={n}" for n in range(1, args.max_loops + 1)]
              + ["dense, same params", "dense, same compute"])
    values = dict(table, lowest=lowest_at_or_past_hops(table, args))
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for i in range(args.eval_hops):
        mark = "" if i < args.train_hops else " (held out)"
        cells = ["-" if values[c][i] is None else f"{values[c][i]:.2f}" if c == EXIT_LOOPS
                 else f"{values[c][i] * 100:.0f}%" for c in columns]
        lines.append(f"| {i + 1}{mark} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(table: dict, args) -> dict:
    """The headline numbers the demo is judged by."""
    k, deep = args.train_hops, args.eval_hops
    in_dist = table[f"{LOOPED}@hops"][:k]
    numbers = {
        "looped_in_distribution": sum(in_dist) / len(in_dist),
        "looped_at_eval_hops_with_n_loops_eq_hops": table[f"{LOOPED}@hops"][deep - 1],
        "looped_at_eval_hops_with_training_depth": table[f"{LOOPED}@{min(k, args.max_loops)}"][deep - 1],
        "dense_same_params_in_distribution": sum(table[SAME_PARAMS][:k]) / k,
        "dense_same_params_at_eval_hops": table[SAME_PARAMS][deep - 1],
        "dense_same_compute_in_distribution": sum(table[SAME_COMPUTE][:k]) / k,
        "dense_same_compute_at_eval_hops": table[SAME_COMPUTE][deep - 1],
    }
    if EXIT in table:
        lowest = [a for a in lowest_at_or_past_hops(table, args) if a is not None]
        numbers.update({
            "exit_rule_lowest": min(table[EXIT]),
            "exit_rule_most_loops_past_hops": max(n - (i + 1) for i, n in enumerate(table[EXIT_LOOPS])),
            "fixed_loops_at_or_past_hops_lowest": min(lowest),
            "dense_best_held_out": max(max(table[name][k:]) for name in (SAME_PARAMS, SAME_COMPUTE)) if deep > k
            else None,
        })
    return numbers


def plot(table: dict, args, path: Path, title: str) -> None:
    """Left: accuracy against hops, one line per n_loops and per baseline (and, when the table has them, the exit
    rule with its mean loops and the lowest accuracy over n_loops >= hops). Right: the looped model's accuracy for
    every (hops, n_loops) pair: one loop per hop lights up the diagonal, a convergent model everything right of it.
    ``title`` names the task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hops = list(range(1, args.eval_hops + 1))
    loops = list(range(1, args.max_loops + 1))
    fig, (ax, heat) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [1.25, 1]})
    colors = plt.cm.viridis([i / max(1, args.max_loops - 1) for i in range(args.max_loops)])
    for n in loops:
        ax.plot(hops, [a * 100 for a in table[f"{LOOPED}@{n}"]], color=colors[n - 1], marker="o", markersize=3,
                linewidth=0.8, alpha=0.5, label=f"looped, n_loops={n}")
    ax.plot(hops, [a * 100 for a in table[f"{LOOPED}@hops"]], color="black", linewidth=2.5, marker="o",
            label="looped, n_loops=hops")
    if EXIT in table:
        lowest = lowest_at_or_past_hops(table, args)
        ax.plot([k for k, a in zip(hops, lowest) if a is not None], [a * 100 for a in lowest if a is not None],
                color="tab:blue", linewidth=2, linestyle="-.", marker="D", markersize=4,
                label="looped, lowest over n_loops >= hops")
        ax.plot(hops, [a * 100 for a in table[EXIT]], color="tab:orange", linewidth=2.5, marker="*", markersize=10,
                label=f"looped, exit rule (no hop count, <= {args.exit_budget} loops)")
        for k, a, n in zip(hops, table[EXIT], table[EXIT_LOOPS]):
            ax.annotate(f"{n:.1f}", (k, a * 100), textcoords="offset points", xytext=(0, -14), ha="center",
                        fontsize=7, color="tab:orange")
    ax.plot(hops, [a * 100 for a in table[SAME_PARAMS]], "r--", linewidth=2, marker="s", label="dense, same params")
    ax.plot(hops, [a * 100 for a in table[SAME_COMPUTE]], "m:", linewidth=2, marker="^", label="dense, same compute")
    ax.axvspan(args.train_hops + 0.5, args.eval_hops + 0.5, color="grey", alpha=0.12, label="held out")
    subtitle = " (orange numbers: the exit rule's mean loops)" if EXIT in table else ""
    ax.set(xlabel="hops in the question", ylabel="accuracy (%)", xticks=hops, ylim=(-8, 103),
           xlim=(0.5, args.eval_hops + 0.5), title=f"Trained on 1..{args.train_hops} hops{subtitle}")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))

    grid = [[table[f"{LOOPED}@{n}"][k - 1] * 100 for n in loops] for k in hops]
    heat.imshow(grid, cmap="Greens", vmin=0, vmax=100, origin="lower", aspect="auto",
                extent=(0.5, args.max_loops + 0.5, 0.5, args.eval_hops + 0.5))
    for k in hops:
        for n in loops:
            value = grid[k - 1][n - 1]
            heat.text(n, k, f"{value:.0f}", ha="center", va="center", fontsize=6,
                      color="white" if value > 60 else "black")
    heat.axhline(args.train_hops + 0.5, color="grey", linestyle="--", linewidth=1)
    heat.set(xlabel="n_loops at inference", ylabel="hops in the question", xticks=loops, yticks=hops,
             title="Looped model accuracy (%)")
    fig.suptitle(title)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
