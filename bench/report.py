"""The bench's verdict: the physical limit, the ratios DESIGN.md asks for, a table and JSON."""

from __future__ import annotations

from typing import Any

from clipguard.bench.onnx_rates import onnx_lines
from clipguard.bench.peer import peer_lines
from clipguard.bench.views import views_lines

EFFICIENCY_TARGET = 0.9
HALF_LOAD = 0.5
#: Other ways the same backlog was drained, next to the in-process worker: report key, name.
#: ``own_process`` is the worker alone in its process, as ``clipguard serve`` runs it.
ALTERNATIVE_WORKERS = (
    ("worker_model_process", "model_process"),
    ("worker_own_process", "own_process"),
)


def derive(report: dict[str, Any]) -> dict[str, Any]:
    """Add ``limit``, ``efficiency``, ``batching`` and the latency bound to a raw report."""
    stages = report["stages"]
    capacities = {
        "model": stages["model"]["images_per_s"],
        "decode": stages["decode"]["images_per_s"],
        "broker": stages["broker"]["records_per_s"],
    }
    stage = min(capacities, key=capacities.__getitem__)
    limit = capacities[stage]
    serial = 1.0 / sum(1.0 / c for c in capacities.values())
    report["limit"] = {
        "stage": stage,
        "events_per_s": limit,
        "capacities": capacities,
        # On a CPU the stages share the same cores: if each stage needs all of them for its
        # share of an event, the pipeline cannot beat this. The truth lies in between.
        "serial_events_per_s": serial,
    }
    worker = report.get("worker")
    if worker:
        ratio = worker["events_per_s"] / limit
        report["efficiency"] = {
            "ratio": ratio,
            "target": EFFICIENCY_TARGET,
            "meets_target": ratio >= EFFICIENCY_TARGET,
            "vs_serial": worker["events_per_s"] / serial,
        }
    for key in ("worker", *(key for key, _ in ALTERNATIVE_WORKERS)):
        drained = report.get(key)
        around = drained.get("model_around") if drained else None
        if around:  # against the model as fast as it was just before and after this drain
            around["mean"] = (around["before"] + around["after"]) / 2
            drained["efficiency_vs_model_around"] = drained["events_per_s"] / around["mean"]
    for key, name in ALTERNATIVE_WORKERS:
        separate = report.get(key)
        if worker and separate:
            report["efficiency"][f"{name}_ratio"] = separate["events_per_s"] / limit
            report["efficiency"][f"{name}_gain"] = separate["events_per_s"] / worker["events_per_s"]
    naive = report.get("naive")
    if worker and naive:
        report["batching"] = {
            "worker_events_per_s": worker["events_per_s"],
            "naive_events_per_s": naive["events_per_s"],
            "gain": worker["events_per_s"] / naive["events_per_s"],
        }
    latency = report.get("latency")
    if latency:
        config = report["config"]
        bound_ms = config["max_batch_wait_ms"] + 2000 * stages["model"]["batch_seconds_p50"]
        latency["bound_ms"] = bound_ms
        half = [p for p in latency["loads"] if p["load"] == HALF_LOAD]
        if half:
            latency["p99_within_bound_at_50"] = half[0]["p99_ms"] < bound_ms
    return report


def _rate(value: float) -> str:
    return f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


def _kb(value: float) -> str:
    return f"{value / 1024:.1f} KB" if value < 1024 * 1024 else f"{value / 1024 / 1024:.1f} MB"


def _usage(section: dict[str, Any]) -> str:
    parts = [f"cpu {section['process_cpu_cores']:.2f} cores"]
    if "broker_cpu_cores" in section:
        parts.append(f"broker {section['broker_cpu_cores']:.2f}")
    return ", ".join(parts)


def _mix_line(mix: dict[str, Any]) -> str:
    kinds = {k.removeprefix("count_"): v for k, v in mix.items() if k.startswith("count_")}
    if kinds:
        parts = ", ".join(f"{count} {kind}" for kind, count in kinds.items())
        mean = _kb(mix["mean_jpeg_bytes"])
        return f"mix      {mix['images']} upload-like files ({parts}), mean {mean}"
    return (
        f"mix      {mix['images']} zoo JPEGs {mix['width']}x{mix['height']} q{mix['quality']}, "
        f"mean {_kb(mix['mean_jpeg_bytes'])}"
    )


def table(report: dict[str, Any]) -> str:
    """The human-readable summary, one aligned line per measurement."""
    cfg, machine, stages = report["config"], report["machine"], report["stages"]
    model, decode, broker = stages["model"], stages["decode"], stages["broker"]
    mix = cfg["mix"]
    lines = [
        f"clipguard bench  {report['started_at']}  commit {report.get('commit') or 'unknown'}",
        f"model    {cfg['model']} ({cfg['weights']}), input {cfg['model_image_size']} px, "
        f"{machine['device']} {machine['dtype']}, batch {cfg['batch_size']}, "
        f"wait {cfg['max_batch_wait_ms']} ms",
        f"machine  {machine['cores']} cores, torch threads {machine['torch_threads']}, "
        f"load avg {machine['loadavg_start']:.2f} -> {machine['loadavg_end']:.2f}, "
        f"kafka-python CRC-32C {machine['kafka_crc32c']}",
        _mix_line(mix),
        "",
        f"{'stage capacity (each alone)':<30}{'per s':>10}  detail",
        f"{'  model only':<30}{_rate(model['images_per_s']):>10}  images/s, "
        f"{1000 * model['batch_seconds_p50']:.1f} ms per batch of {model['batch_size']} (p50); "
        f"{_usage(model)}",
    ]
    noise = report.get("noise")
    if noise:
        lines.append(
            f"{'    start / end of the run':<30}{'':>10}  "
            f"{_rate(noise['model_images_per_s_at_start'])} / "
            f"{_rate(noise['model_images_per_s_at_end'])} images/s ({noise['drift']:+.0%}, "
            "other load on the machine): the better one counts"
        )
    precision = report.get("precision")
    if precision and "skipped" not in precision:
        lines.append(
            f"{'    fp32 / bf16 weights':<30}{'':>10}  "
            f"{_rate(precision['float32_images_per_s'])} / "
            f"{_rate(precision['bfloat16_images_per_s'])} images/s "
            f"(bf16 {precision['bf16_speedup']:.2f}x); auto chose {precision['chosen']} "
            f"({precision['reason']})"
        )
        agree = precision
        lines.append(
            f"{'    bf16 vs fp32 agreement':<30}{'':>10}  "
            f"{agree['agreement_images']} held-out zoo images: |delta ai_score| p99 "
            f"{agree['p99_abs_delta_ai_score']:.4f}, max {agree['max_abs_delta_ai_score']:.4f}; "
            f"same decisions {agree['same_decisions']:.1%} ({agree['decisions_changed']} "
            f"changed), same labels {agree['same_labels']:.1%}"
        )
    elif precision:
        lines.append(f"{'    fp32 / bf16 weights':<30}{'':>10}  {precision['skipped']}")
    lines += onnx_lines(report.get("onnx"), model["images_per_s"], machine["dtype"])
    lines += views_lines(report.get("views"))
    draft = " (JPEGs DCT-scaled)" if decode.get("jpeg_draft") else ""
    lines += [
        f"{'  decode+preprocess':<30}{_rate(decode['images_per_s']):>10}  images/s = "
        f"{_rate(decode['images_per_s_per_core'])} per core x {decode['cores']} cores "
        f"({decode['ms_per_image']:.2f} ms/image){draft}",
    ]
    full = report.get("full_decode")
    full_kinds = full.get("kinds", {}) if full else {}
    for kind, cost in decode.get("kinds", {}).items():
        versus = ""
        if kind in full_kinds:
            versus = f"; full decode {full_kinds[kind]['ms_per_image']:.1f} ms"
        lines.append(
            f"{'    decode ' + kind:<30}{_rate(1000 / cost['ms_per_image']):>10}  "
            f"images/s per core ({cost['ms_per_image']:.1f} ms/image{versus})"
        )
    if full:
        agree = full["draft_agreement"]
        lines.append(
            f"{'    without DCT scaling':<30}{_rate(full['images_per_s_per_core']):>10}  "
            f"images/s per core ({full['ms_per_image']:.2f} ms/image): DCT scaling "
            f"{decode['images_per_s_per_core'] / full['images_per_s_per_core']:.2f}x; scores "
            f"|delta| max {agree['max_abs_delta']:.4f} p99 {agree['p99_abs_delta']:.4f}, "
            f"decisions identical {agree['decisions_identical']:.1%}"
        )
    provenance = report.get("provenance")
    if provenance:
        lines.append(
            f"{'    provenance readers':<30}{'':>10}  {provenance['ms_per_image']:.3f} ms/image "
            f"({provenance['share_of_decode']:.1%} of decode+preprocess; "
            f"{', '.join(provenance['readers'])})"
        )
    lines.append(
        f"{'  broker round trip':<30}{_rate(broker['records_per_s']):>10}  records/s of "
        f"{_kb(broker['mean_record_bytes'])}, produce+consume; {_usage(broker)}"
    )
    limit = report["limit"]
    lines.append(
        f"{'  limit':<30}{_rate(limit['events_per_s']):>10}  {limit['stage'].upper()} is the "
        f"bottleneck (all stages on shared cores: {_rate(limit['serial_events_per_s'])}/s)"
    )
    lines += ["", f"{'pipeline':<30}{'per s':>10}  detail"]
    worker = report.get("worker")
    if worker:
        eff = report["efficiency"]
        verdict = "meets" if eff["meets_target"] else "BELOW"
        lines.append(
            f"{'  worker, input -> verdicts':<30}{_rate(worker['events_per_s']):>10}  "
            f"events/s over {worker['events']} events; {_usage(worker)}"
        )
        inside = worker.get("inside")
        if inside:
            lines.append(
                f"{'    inside the worker':<30}{'':>10}  model busy {inside['model_busy']:.0%}, "
                f"{inside['batches']} batches of {inside['mean_batch_size']:.1f} (wait "
                f"{inside['mean_batch_wait_ms']:.0f} ms), decode {inside['decode_busy_cores']:.2f} "
                f"cores, in flight {inside['mean_inflight']:.0f} (max "
                f"{inside['max_inflight']:.0f}), paused {inside['paused_fraction']:.0%}"
            )
        lines.append(
            f"{'  efficiency':<30}{eff['ratio']:>10.2f}  of the limit, {verdict} the "
            f"target {eff['target']:.2f}; {eff['vs_serial']:.2f} of the shared-core bound"
        )
        lines += _around_line(worker, report["limit"]["stage"])
        for key, name in ALTERNATIVE_WORKERS:
            separate = report.get(key)
            if separate:
                label = f"  worker, {name.replace('_', ' ')}"
                lines.append(
                    f"{label:<30}{_rate(separate['events_per_s']):>10}  "
                    f"events/s, efficiency {eff[f'{name}_ratio']:.2f}, "
                    f"{eff[f'{name}_gain']:.2f}x the in-process worker; {_usage(separate)}"
                )
                lines += _around_line(separate, report["limit"]["stage"])
    else:
        lines.append("  worker: skipped")
    naive = report.get("naive")
    if naive:
        lines.append(
            f"{'  naive one-at-a-time':<30}{_rate(naive['events_per_s']):>10}  "
            f"events/s over {naive['events']} events; {_usage(naive)}"
        )
    if "batching" in report:
        lines.append(f"{'  batching gain':<30}{report['batching']['gain']:>9.2f}x  worker / naive")
    latency = report.get("latency")
    lines.append("")
    if latency:
        lines.append(
            f"latency, produce -> verdict read back (bound at 50%: wait + 2 x batch = "
            f"{latency['bound_ms']:.0f} ms)"
        )
        lines.append(
            f"{'  load':<10}{'offered/s':>10}{'events':>8}{'p50 ms':>10}{'p99 ms':>10}"
            f"{'max ms':>10}  {'inside worker p50/p99':>22}  p99 vs bound"
        )
        for phase in latency["loads"]:
            check = ""
            if phase["load"] == HALF_LOAD:
                check = "ok" if latency["p99_within_bound_at_50"] else "OVER"
            lines.append(
                f"  {round(100 * phase['load']):>3}%    {_rate(phase['offered_events_per_s']):>10}"
                f"{phase['events']:>8}{phase['p50_ms']:>10.0f}{phase['p99_ms']:>10.0f}"
                f"{phase['max_ms']:>10.0f}  "
                f"{phase['inside_worker_p50_ms']:>11.0f} / {phase['inside_worker_p99_ms']:<8.0f}  "
                f"{check}"
            )
    else:
        lines.append("latency: skipped")
    memory = report.get("memory")
    lines.append("")
    if memory:
        lines.append(
            f"memory, burst of {memory['events']} JPEGs {memory['width']}x{memory['height']} "
            f"({_kb(memory['mean_jpeg_bytes'])} each)"
        )
        check = "within" if memory["within_bound"] else "OVER"
        inflight = memory.get("peak_inflight")
        lines.append(
            f"  rss {memory['baseline_rss_mb']:.0f} MB -> peak {memory['peak_rss_mb']:.0f} MB "
            f"(+{memory['growth_mb']:.0f} MB), {check} the bound of +{memory['bound_mb']:.0f} MB"
            + (f"; peak in flight {inflight}" if inflight is not None else "")
        )
        lines.append(
            f"  bound = fetch buffer {memory['fetch_buffer_mb']:.0f} MB + in-flight cap "
            f"{memory['inflight_cap']} ({memory['inflight_cap_source']}) x "
            f"{memory['held_per_event_mb']:.1f} MB held + {memory['decoding_at_once']} decoding x "
            f"{memory['pixels_per_decode_mb']:.0f} MB of pixels"
        )
    else:
        lines.append("memory: skipped")
    peer = peer_lines(report.get("peer"))
    if peer:
        lines += ["", *peer]
    return "\n".join(lines)


def _around_line(drained: dict[str, Any], limit: str) -> list[str]:
    """Only where the model is the limit: against a decode-bound drain it says nothing."""
    around = drained.get("model_around")
    if not around or "mean" not in around or limit != "model":
        return []
    return [
        f"{'    vs the model around it':<30}{drained['efficiency_vs_model_around']:>10.2f}  "
        f"of model only just before / after the drain ({_rate(around['before'])} / "
        f"{_rate(around['after'])} images/s)"
    ]
