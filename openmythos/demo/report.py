"""What the demo prints and writes about its results: training summaries, the accuracy table, the headline numbers
and the plot.

Standard library only at import (matplotlib inside ``plot``), so ``openmythos.demo`` can re-export these without
importing torch.
"""

from pathlib import Path

from .files import write_atomically

# the three models, and the accuracy table's column names
LOOPED, SAME_PARAMS, SAME_COMPUTE = "looped", "dense_same_params", "dense_same_compute"


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


def format_table(table: dict, args) -> str:
    """Markdown: one row per hop count, one column per model (the looped one at each n_loops)."""
    columns = [f"{LOOPED}@hops"] + [f"{LOOPED}@{n}" for n in range(1, args.max_loops + 1)] + [SAME_PARAMS,
                                                                                                SAME_COMPUTE]
    titles = ["hops", "looped, n_loops=hops"] + [f"n_loops={n}" for n in range(1, args.max_loops + 1)] + [
        "dense, same params", "dense, same compute"]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for i in range(args.eval_hops):
        mark = "" if i < args.train_hops else " (held out)"
        cells = [f"{table[c][i] * 100:.0f}%" for c in columns]
        lines.append(f"| {i + 1}{mark} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(table: dict, args) -> dict:
    """The headline numbers the demo is judged by."""
    k, deep = args.train_hops, args.eval_hops
    in_dist = table[f"{LOOPED}@hops"][:k]
    return {
        "looped_in_distribution": sum(in_dist) / len(in_dist),
        "looped_at_eval_hops_with_n_loops_eq_hops": table[f"{LOOPED}@hops"][deep - 1],
        "looped_at_eval_hops_with_training_depth": table[f"{LOOPED}@{min(k, args.max_loops)}"][deep - 1],
        "dense_same_params_in_distribution": sum(table[SAME_PARAMS][:k]) / k,
        "dense_same_params_at_eval_hops": table[SAME_PARAMS][deep - 1],
        "dense_same_compute_in_distribution": sum(table[SAME_COMPUTE][:k]) / k,
        "dense_same_compute_at_eval_hops": table[SAME_COMPUTE][deep - 1],
    }


def plot(table: dict, args, path: Path, title: str) -> None:
    """Left: accuracy against hops, one line per n_loops and per baseline. Right: the looped model's accuracy for
    every (hops, n_loops) pair, where a correct model lights up the diagonal. ``title`` names the task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hops = list(range(1, args.eval_hops + 1))
    loops = list(range(1, args.max_loops + 1))
    fig, (ax, heat) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1.25, 1]})
    colors = plt.cm.viridis([i / max(1, args.max_loops - 1) for i in range(args.max_loops)])
    for n in loops:
        ax.plot(hops, [a * 100 for a in table[f"{LOOPED}@{n}"]], color=colors[n - 1], marker="o", markersize=3,
                linewidth=0.8, alpha=0.6, label=f"looped, n_loops={n}")
    ax.plot(hops, [a * 100 for a in table[f"{LOOPED}@hops"]], color="black", linewidth=2.5, marker="o",
            label="looped, n_loops=hops")
    ax.plot(hops, [a * 100 for a in table[SAME_PARAMS]], "r--", linewidth=2, marker="s", label="dense, same params")
    ax.plot(hops, [a * 100 for a in table[SAME_COMPUTE]], "m:", linewidth=2, marker="^", label="dense, same compute")
    ax.axvspan(args.train_hops + 0.5, args.eval_hops + 0.5, color="grey", alpha=0.12, label="held out")
    ax.set(xlabel="hops in the question", ylabel="accuracy (%)", xticks=hops, ylim=(-3, 103),
           xlim=(0.5, args.eval_hops + 0.5), title=f"Trained on 1..{args.train_hops} hops")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))

    grid = [[table[f"{LOOPED}@{n}"][k - 1] * 100 for n in loops] for k in hops]
    heat.imshow(grid, cmap="Greens", vmin=0, vmax=100, origin="lower", aspect="auto",
                extent=(0.5, args.max_loops + 0.5, 0.5, args.eval_hops + 0.5))
    for k in hops:
        for n in loops:
            value = grid[k - 1][n - 1]
            heat.text(n, k, f"{value:.0f}", ha="center", va="center", fontsize=7,
                      color="white" if value > 60 else "black")
    heat.axhline(args.train_hops + 0.5, color="grey", linestyle="--", linewidth=1)
    heat.set(xlabel="n_loops at inference", ylabel="hops in the question", xticks=loops, yticks=hops,
             title="Looped model accuracy (%)")
    fig.suptitle(title)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
