"""The serving suite's section of docs/benchmarks.md and its chart (benchmark-serving.png)."""

from __future__ import annotations

from pathlib import Path

from .checkpoints import PREFILL_STEP_SIZE, SEED
from .report import fmt, machine_rows, mb, target_row

COLORS = {"llava-mlx": "#1f77b4", "mlx-vlm": "#ff7f0e"}
SPEEDUP_GOAL = 3.0


def _levels(run: dict) -> list:
    return sorted(((int(c), r) for c, r in run.get("levels", {}).items()), key=lambda x: x[0])


def _speedup(run: dict, clients: int):
    levels = dict(_levels(run))
    one, many = levels.get(1, {}).get("aggregate_tps"), levels.get(clients, {}).get("aggregate_tps")
    return many / one if one and many is not None else None


def _unanswered(run: dict) -> tuple:
    """(requests not answered, requests) over every level and the two-turn chats."""
    sent = bad = 0
    for _, r in _levels(run):
        sent += r["requests"]
        bad += r["failed"] + r["not_sent"]
    t = run.get("second_turn")
    if t:
        sent += 2 * t["chats"]
        bad += 2 * t["chats"] - t["answered_first"] - t["answered_second"]
    return bad, sent


def evaluate_targets(record: dict) -> tuple:
    """Table rows and printable lines: the issue's goals, for this project's server."""
    rows, printable = [], []

    def add(name, measured, ok, margin):
        row, line = target_row(name, measured, ok, margin)
        rows.append(row)
        printable.append(line)

    top = max(record["settings"]["clients"])
    for name, run in record["servers"].items():
        if "error" in run:
            add(f"{name}: serves at all", "could not start", False, run["error"][:120].replace("|", "/"))
            continue
        if top > 1:
            s = _speedup(run, top)
            goal = f"{name}: {top} clients ≥ {SPEEDUP_GOAL:g}× the single-client aggregate tok/s"
            add(
                goal,
                fmt(s, ".2f", "×"),
                None if s is None else s >= SPEEDUP_GOAL,
                "–" if s is None else f"{100 * (s / SPEEDUP_GOAL - 1):+.0f}% vs {SPEEDUP_GOAL:g}×",
            )
        bad, sent = _unanswered(run)
        add(f"{name}: every request answered", f"{sent - bad} of {sent}", bad == 0, f"{bad} failed or not sent")
        t = run.get("second_turn") or {}
        if t.get("ttft_second") is not None and t.get("ttft_first"):
            cached = t.get("cached_second")
            add(
                f"{name}: second turn reuses the cached prefix",
                f"{fmt(cached, '.0f')} of {fmt(t.get('prompt_second'), '.0f')} prompt tokens cached",
                bool(cached),
                f"TTFT {t['ttft_first']:.2f}s → {t['ttft_second']:.2f}s",
            )
    return rows, printable


def section(record: dict) -> list:
    st, servers = record["settings"], record["servers"]
    sizes = ", ".join(f"{w}×{h}" for w, h in st["image_sizes"])
    L = ["## Serving: concurrent clients over HTTP\n"] + machine_rows(record)
    L.append(
        f"| Checkpoint | synthetic {st['family']}, random weights (seed {SEED}), llava-hf layout, shape "
        f"**{st['shape']}**, dtype **{st['dtype']}**; prefill step {PREFILL_STEP_SIZE} on both servers |"
    )
    L.append(
        f"| Load | official `openai` client, streamed chat completions, greedy, `max_tokens` {st['tokens']}, one "
        f"picture and the question {st['question']!r} per request; {st['requests']} requests per level, "
        f"{', '.join(map(str, st['clients']))} closed-loop clients (each sends its next request when its "
        f"answer ends); every picture distinct (no feature-cache hits), JPEG data URIs, sizes cycled: {sizes}; "
        f"{st['warmup']} warm-up requests first; no retries; loopback |"
    )
    for name, run in servers.items():
        L.append(f"| {name} | `{run.get('command', '–')}` |")
    if st.get("server_source") and "llava-mlx" in servers:
        L.append(f"| llava-mlx server code | {st['server_source']} |")
    L.append("")
    L.append(
        "| server | clients | answered | failed | aggregate tok/s | vs 1 client | TTFT p50 s | TTFT p95 s | "
        "tokens / answer | wall s | peak RSS |"
    )
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, run in servers.items():
        if "error" in run:
            L.append(f"| {name} | could not start: {run['error'][:300].replace('|', '/')} ||||||||||")
            continue
        for clients, r in _levels(run):
            sent = r["requests"] - r["not_sent"]
            L.append(
                f"| {name} | {clients} | {r['answered']} / {sent}"
                + (f" ({r['not_sent']} not sent)" if r["not_sent"] else "")
                + f" | {r['failed']} | {fmt(r['aggregate_tps'], '.1f')} | {fmt(_speedup(run, clients), '.2f', '×')} | "
                f"{fmt(r['ttft_p50'])} | {fmt(r['ttft_p95'])} | {fmt(r['tokens_per_request'], '.0f')} | "
                f"{fmt(r['wall'], '.1f')} | {mb(r.get('peak_rss'))} |"
            )
    L.append("")
    for name, run in servers.items():
        one = dict(_levels(run)).get(1, {})
        if one.get("prefill_share"):
            L.append(
                f"*{name}, one client*: the time to first token (image encoding and prompt prefill) is "
                f"{100 * one['prefill_share']:.0f}% of a request's time. If prefills run one after another and "
                f"only decoding overlaps, aggregate throughput can grow at most {1 / one['prefill_share']:.2f}× "
                "however many clients there are.\n"
            )
    turns = {name: run["second_turn"] for name, run in servers.items() if run.get("second_turn")}
    if turns:
        L.append(
            f"**Cached second turn** ({st['chats']} chat{'s' if st['chats'] != 1 else ''}, one client): the "
            f"question about a new picture, then {st['follow_up']!r} with the first answer in the history. "
            "Medians.\n"
        )
        L.append(
            "| server | turn 1 TTFT s | turn 2 TTFT s | turn 1 prompt tokens | turn 2 prompt tokens | "
            "turn 2 cached tokens (as reported) | answered |"
        )
        L.append("|---|---:|---:|---:|---:|---:|---:|")
        for name, t in turns.items():
            L.append(
                f"| {name} | {fmt(t['ttft_first'])} | {fmt(t['ttft_second'])} | {fmt(t['prompt_first'], '.0f')} | "
                f"{fmt(t['prompt_second'], '.0f')} | {fmt(t['cached_second'], '.0f')} | "
                f"{t['answered_first'] + t['answered_second']} / {2 * t['chats']} |"
            )
        L.append("")
    errors = [
        (name, e)
        for name, run in servers.items()
        for part in list(dict(_levels(run)).values()) + [run.get("second_turn") or {}]
        for e in part.get("errors", [])
    ]
    if errors:
        L.append("Errors seen by the clients (distinct messages, first few):\n")
        seen = set()
        for name, e in errors:
            if (name, e) not in seen:
                seen.add((name, e))
                L.append(f"- {name}: `{e[:240]}`")
        L.append("")
    rows, _ = evaluate_targets(record)
    L += ["### Serving targets\n", "| target | measured | pass | margin |", "|---|---:|:---:|---:|"] + rows + [""]
    L.append(
        "Definitions: *aggregate tok/s* = tokens generated in answered requests (`usage.completion_tokens`) ÷ "
        "wall time from the level's first request to its last answer. *TTFT* = time from sending the request "
        "to the first streamed content chunk, over answered requests (p95 interpolated linearly between "
        "samples). *failed* = an HTTP error, an error inside the stream, or a stream without content or "
        "`finish_reason`. *tokens / answer* differs from `max_tokens` when the random model emits EOS. "
        "*peak RSS* = the server's resident memory, sampled every 0.2 s during the level (weights "
        "included). *cached tokens* is what the server reports in `usage.prompt_tokens_details.cached_tokens`.\n"
    )
    L.append("![serving benchmark chart](benchmark-serving.png)\n")
    return L


def chart(record: dict, out: Path):
    """benchmark-serving.png: aggregate tok/s, TTFT p50/p95 and failed requests against clients; the second turn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st, info = record["settings"], record["machine"]
    runs = {n: r for n, r in record["servers"].items() if "error" not in r}
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.4))
    for name, run in runs.items():
        lv = _levels(run)
        xs = [c for c, _ in lv]
        col = COLORS.get(name)
        axes[0].plot(xs, [r["aggregate_tps"] or 0 for _, r in lv], "o-", color=col, label=name)
        one = dict(lv).get(1, {})
        if one.get("prefill_share") and one.get("aggregate_tps"):
            axes[0].axhline(
                one["aggregate_tps"] / one["prefill_share"],
                color=col,
                ls=":",
                lw=1,
                label=f"{name}: ceiling if prefill is serial",
            )
        if name == "llava-mlx" and one.get("aggregate_tps"):
            axes[0].axhline(
                SPEEDUP_GOAL * one["aggregate_tps"],
                color="grey",
                ls="--",
                lw=1,
                label=f"goal: {SPEEDUP_GOAL:g}× one client",
            )
        axes[1].plot(xs, [r["ttft_p50"] for _, r in lv], "o-", color=col, label=f"{name} p50")
        axes[1].plot(xs, [r["ttft_p95"] for _, r in lv], "s--", color=col, label=f"{name} p95")
        axes[2].plot(xs, [r["failed"] + r["not_sent"] for _, r in lv], "o-", color=col, label=name)
    names = list(runs)
    for j, name in enumerate(names):
        t = runs[name].get("second_turn") or {}
        vals = [t.get("ttft_first") or 0, t.get("ttft_second") or 0]
        xs = [i + (j - (len(names) - 1) / 2) * 0.35 for i in range(2)]
        bars = axes[3].bar(xs, vals, 0.35, color=COLORS.get(name), label=name)
        for b, y in zip(bars, vals):
            axes[3].annotate(f"{y:.2f}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=8)
    axes[3].set_xticks([0, 1])
    axes[3].set_xticklabels(["turn 1", "turn 2 (same picture)"])
    titles = [
        "aggregate generated tok/s (higher is better)",
        "time to first token, s (lower is better)",
        f"failed requests of {st['requests']} per level",
        "second turn: TTFT, s (median)",
    ]
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax is not axes[3]:
            ax.set_xticks(st["clients"])
            ax.set_xlabel("concurrent clients")
        ax.set_ylim(bottom=0)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(
        f"llava-mlx server vs mlx-vlm server — {st['family']} {st['shape']} {st['dtype']}, "
        f"{st['tokens']} tokens a request, MLX {info['mlx']} ({info['backend']}) — {info['cpu']}, "
        f"{info['cores']} cores",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out / "benchmark-serving.png", dpi=110)
    plt.close(fig)
