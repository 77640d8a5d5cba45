"""The offline suite's section of docs/benchmarks.md and its chart (benchmark.png)."""

from __future__ import annotations

from pathlib import Path

from .checkpoints import PREFILL_STEP_SIZE, SEED, kv_cache_bytes
from .offline import CASES, cases_meta
from .report import fmt, machine_rows, mb, target_row


def section(record: dict) -> list:
    """Markdown lines: machine, settings, one table per case, ratios, targets, definitions."""
    info, settings, results, roof = record["machine"], record["settings"], record["results"], record["roofline"]
    results = {tuple(k.split("|")): v for k, v in results.items()}
    families = settings.get("cases") or sorted({f for f, _ in results})
    meta = cases_meta(families, settings["shape"], settings["dtype"])
    cases = [c for c in CASES if c.family in meta]
    targets, _ = evaluate_targets(settings, results, roof, meta)
    L = ["## Offline: one request at a time\n"] + machine_rows(record)
    L.append(
        f"| Checkpoints | synthetic, random weights (seed {SEED}), llava-hf layout, shape **{settings['shape']}**, "
        f"dtype **{settings['dtype']}** (transformers runs float32) |"
    )
    L.append(
        f"| Generation | greedy, {settings['tokens']} new tokens, EOS ignored, prefill step {PREFILL_STEP_SIZE}; "
        f"one warm-up run on a different image of the same size, then best of {settings['repeats']} measured runs; "
        "each implementation in its own process |"
    )
    L.append("")
    if info["backend"] == "cpu":
        L.append(
            "> **Note.** This run used MLX's **CPU backend** (Linux). It is far slower than MLX on a Mac's GPU "
            "(Metal), and half precision has no fast path there, so the `small` shape in float32 is what runs "
            "here. The `small` shape keeps the real token counts (336-pixel crops, 576 features a crop, the "
            "LLaVA-1.6 grid pinpoints, CLIP image size 336 / patch 14) with narrow, shallow layers; "
            "absolute numbers say little about a real 7B model on Apple silicon — rerun "
            "`python bench.py --shape 7b --dtype float16` there.\n"
        )
    if "mlx-vlm" in settings["impls"]:
        L.append(
            "> **How mlx-vlm is run.** Through its Python API (`mlx_vlm.load`, `mlx_vlm.stream_generate`), "
            "with three harness-side changes and nothing else: EOS is ignored by replacing "
            "`tokenizer.stopping_criteria` with a function that never stops; `model.get_input_embeddings` is "
            "wrapped to time it (with an `mx.eval` of its output) and to count the positions the language model "
            "receives; and the `padding` / `padding_side` keyword arguments its LLaVA processors forward to the "
            "image processor are dropped, because transformers 5.2x rejects them (mlx-vlm 0.7.10 cannot "
            "preprocess a LLaVA image with transformers 5.23 otherwise).\n"
        )
    if settings["shape"] == "small":
        L.append(
            "> **Decode at the small shape** reads only a few tens of MB of weights per token, so it is bound by "
            "fixed per-token costs (graph construction, sampling over 32064 logits, Python) rather than by "
            "memory bandwidth; every implementation sits far below the roofline here. The roofline target is "
            "meaningful at `--shape 7b`.\n"
        )
    for case in cases:
        m = meta[case.family]
        L.append(f"### {case.name}\n")
        t, v = m["cfg"]["text_config"], m["cfg"]["vision_config"]
        L.append(
            f"Language model: {t['model_type']}, hidden {t['hidden_size']}, {t['num_hidden_layers']} layers, "
            f"{t['num_attention_heads']} heads / {t['num_key_value_heads']} KV heads, intermediate "
            f"{t['intermediate_size']}, vocab {t['vocab_size']}. Vision: CLIP hidden {v['hidden_size']}, "
            f"{v['num_hidden_layers']} layers, image {v['image_size']}, patch {v['patch_size']}. "
            f"Weights {mb(m['weight_bytes'])}; decoder bytes read per token {mb(m['decode_bytes'])}. "
            f"Prompt: `{case.prompt!r}`. The original LLaVA code gives **{case.reference_positions}** image "
            "positions for this image.\n"
        )
        L.append(
            "| implementation | load s | encode s | TTFT s | prompt tok/s | decode tok/s | % roofline | peak memory "
            "| image positions | LM prompt length |"
        )
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        rf = roof.get(case.family, {})
        bw = rf.get("bandwidth")
        notes = []
        for impl in settings["impls"]:
            r = results.get((case.family, impl))
            if r is None:
                continue
            if "error" in r:
                L.append(f"| {impl} | cannot run this case: {r['error'][:300].replace('|', '/')} ||||||||| ")
                continue
            pp = r.get("prompt_positions")
            enc = r.get("encode_time")
            ptps = (pp / (r["ttft"] - enc)) if (pp and enc is not None and r["ttft"] > enc) else None
            r["prompt_tps"] = ptps
            roofp = (100 * r["decode_tps"] * m["decode_bytes"] / bw) if bw else None
            if impl == "transformers":
                roofp_s = fmt(roofp, ".0f", "%") + "†"
            else:
                roofp_s = fmt(roofp, ".0f", "%")
            r["roofline_pct"] = roofp
            ip = r.get("image_positions")
            ip_s = str(ip) if ip is not None else "–"
            if ip is not None and ip != case.reference_positions:
                ip_s += f" (≠ {case.reference_positions})"
                notes.append(
                    f"{impl} gives {ip} image positions where the original LLaVA gives {case.reference_positions}."
                )
            mem_s = mb(r.get("peak_memory")) + (" (RSS)" if r.get("memory_kind", "").startswith("peak RSS") else "")
            L.append(
                f"| {impl} | {fmt(r.get('load_time'))} | {fmt(enc, '.3f')} | {fmt(r['ttft'], '.3f')} | "
                f"{fmt(ptps, ',.0f')} | {fmt(r['decode_tps'], '.1f')} | {roofp_s} | {mem_s} | {ip_s} | "
                f"{pp if pp is not None else '–'} |"
            )
        L.append("")
        if bw:
            L.append(
                f"Roofline: MLX {info['backend']} reaches {bw / 1e9:.1f} GB/s on a plain matrix-vector product "
                f"({rf['form']}, {rf['rows']}×{rf['cols']} {settings['dtype']}, {mb(rf['bytes'])}); "
                f"decode at 100% of roofline would be {bw / m['decode_bytes']:.1f} tok/s. "
                "† transformers runs PyTorch float32, not MLX: its % is against the same MLX figure.\n"
            )
        ours = results.get((case.family, "llava-mlx"))
        ratio_rows = []
        if ours and "error" not in ours:
            for peer in settings["impls"]:
                if peer == "llava-mlx":
                    continue
                r = results.get((case.family, peer))
                if not r or "error" in r:
                    ratio_rows.append(f"| llava-mlx vs {peer} | peer cannot run this case ||||")
                    continue
                sp = ours["decode_tps"] / r["decode_tps"] if r.get("decode_tps") else None
                tt = r["ttft"] / ours["ttft"] if ours.get("ttft") else None
                en = (
                    (r["encode_time"] / ours["encode_time"])
                    if (r.get("encode_time") and ours.get("encode_time"))
                    else None
                )
                me = (
                    (ours["peak_memory"] / r["peak_memory"])
                    if (r.get("peak_memory") and ours.get("peak_memory"))
                    else None
                )
                ratio_rows.append(
                    f"| llava-mlx vs {peer} | {fmt(sp, '.2f', '×')} | {fmt(tt, '.2f', '×')} | "
                    f"{fmt(en, '.2f', '×')} | {fmt(me, '.2f', '×')} |"
                )
        if ratio_rows:
            L.append("| ratio | decode speed-up | TTFT speed-up | encode speed-up | peak memory (ours / theirs) |")
            L.append("|---|---:|---:|---:|---:|")
            L += ratio_rows
            L.append("")
        if notes:
            L.append(
                "Image positions: " + " ".join(notes) + " (transformers rounds the unpadded size and reads "
                "pinpoints as (height, width); mlx-vlm's LLaVA-NeXT model does not unpad at all: it appends a "
                "newline block per crop. The language model therefore sees a different sequence, which changes "
                "its prompt cost.)\n"
            )
    # targets
    L.append("### Targets\n")
    L.append("| target | measured | pass | margin |")
    L.append("|---|---:|:---:|---:|")
    L += targets
    L.append("")
    L.append(
        "Definitions: *TTFT* is wall time from the generate call (image preprocessing included) to the first token. "
        "*encode* is the vision tower + projector (mlx-vlm: its `get_input_embeddings`, which also merges the "
        "embeddings; ours: its own `encode_time`). *prompt tok/s* = LM prompt positions ÷ (TTFT − encode). "
        "*decode tok/s* = (N − 1) ÷ (time of token N − time of token 1). *peak memory*: MLX's "
        "`mx.get_peak_memory()` after `mx.reset_peak_memory()` (weights are resident, so they count); for "
        "transformers, peak RSS minus RSS before loading. *% roofline* = decode tok/s × decoder bytes per "
        "token ÷ matrix-vector bandwidth.\n"
    )
    L.append("![offline benchmark chart](benchmark.png)\n")
    return L


def chart(record: dict, out: Path):
    """benchmark.png: decode tok/s, TTFT and peak memory per case and implementation."""
    info, settings = record["machine"], record["settings"]
    results = {tuple(k.split("|")): v for k, v in record["results"].items()}
    cases = [c for c in CASES if c.family in {f for f, _ in results}]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = settings["impls"]
    colors = {"llava-mlx": "#1f77b4", "mlx-vlm": "#ff7f0e", "transformers": "#2ca02c"}
    metrics = [
        ("decode_tps", "decode tok/s (higher is better)", 1),
        ("ttft", "time to first token, s (lower is better)", 1),
        ("peak_memory", "peak memory, MB (lower is better)", 1 / 2**20),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    width = 0.8 / max(1, len(impls))
    for ax, (key, title, scale) in zip(axes, metrics):
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for i, case in enumerate(cases):
                r = results.get((case.family, impl))
                if r and "error" not in r and r.get(key) is not None:
                    xs.append(i + (j - (len(impls) - 1) / 2) * width)
                    ys.append(r[key] * scale)
            bars = ax.bar(xs, ys, width, label=impl, color=colors.get(impl))
            for b, y in zip(bars, ys):
                ax.annotate(f"{y:.3g}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([c.family + ("\n1000×600" if c.family == "llava-1.6" else "\n1 image") for c in cases])
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"llava-mlx benchmark — shape {settings['shape']}, {settings['dtype']}, MLX {info['mlx']} "
        f"({info['backend']}) — {info['cpu']}, {info['cores']} cores",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out / "benchmark.png", dpi=110)
    plt.close(fig)


def evaluate_targets(settings, results, roof, meta_by_family):
    """Table rows and printable lines for the offline targets of the cases measured."""
    lines = []
    pr = []

    def add(name, measured, ok, margin):
        row, line = target_row(name, measured, ok, margin)
        lines.append(row)
        pr.append(line)

    for case in [c for c in CASES if c.family in meta_by_family]:  # the cases this run measured
        ours = results.get((case.family, "llava-mlx"))
        vlm = results.get((case.family, "mlx-vlm"))
        ok_ours = ours is not None and "error" not in ours
        ok_vlm = vlm is not None and "error" not in vlm
        meta = meta_by_family[case.family]
        if ok_ours and ok_vlm:
            s = ours["decode_tps"] / vlm["decode_tps"]
            add(
                f"{case.family}: decode ≥ 1.25× mlx-vlm",
                f"{s:.2f}×",
                s >= 1.25,
                f"{100 * (s / 1.25 - 1):+.0f}% vs 1.25×",
            )
        else:
            add(f"{case.family}: decode ≥ 1.25× mlx-vlm", "–", None, "ours or mlx-vlm did not run")
        bw = roof.get(case.family, {}).get("bandwidth")
        if ok_ours and bw:
            p = ours["decode_tps"] * meta["decode_bytes"] / bw
            add(
                f"{case.family}: decode ≥ 90% of roofline",
                f"{100 * p:.0f}%",
                p >= 0.9,
                f"{100 * (p - 0.9):+.0f} points",
            )
        if case.family == "llava-1.6":
            if ok_ours and ok_vlm:
                s = vlm["ttft"] / ours["ttft"]
                add(
                    f"{case.family} 1000×600: TTFT ≥ 2× faster than mlx-vlm",
                    f"{s:.2f}×",
                    s >= 2.0,
                    f"{100 * (s / 2 - 1):+.0f}% vs 2×",
                )
            else:
                add(f"{case.family} 1000×600: TTFT ≥ 2× faster than mlx-vlm", "–", None, "ours or mlx-vlm did not run")
        if ok_ours and ours.get("peak_memory"):
            L = (ours.get("prompt_positions") or 0) + settings["tokens"]
            base = meta["weight_bytes"] + kv_cache_bytes(meta["cfg"], settings["dtype"], L)
            budget = base + max(0.10 * base, 64 * 2**20)
            add(
                f"{case.family}: peak memory ≤ weights + KV + max(10%, 64 MB)",
                f"{mb(ours['peak_memory'])} ≤ {mb(budget)}",
                ours["peak_memory"] <= budget,
                f"{(budget - ours['peak_memory']) / 2**20:+,.0f} MB headroom "
                f"(weights {mb(meta['weight_bytes'])}, KV {mb(base - meta['weight_bytes'])} for {L} positions)",
            )
    return lines, pr
