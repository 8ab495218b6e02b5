"""Reads burrow-bench JSON lines (the first target is `direct`) and prints a Markdown table of
figures and their ratios to direct. A target measured several times shows the median of each
figure, and the idle-memory figure of the repetition that measured it."""
import json
import statistics
import sys

runs = [json.loads(line) for line in sys.stdin if line.strip()]
labels = list(dict.fromkeys(r["label"] for r in runs))


def merged(label):
    mine = [r for r in runs if r["label"] == label]
    out = dict(mine[-1])
    for key, value in mine[0].items():
        if isinstance(value, (int, float)) and key != "idle_connections":
            out[key] = statistics.median(r[key] for r in mine)
    out["rss_kib_per_idle_conn"] = next(
        (r["rss_kib_per_idle_conn"] for r in reversed(mine) if r["rss_kib_per_idle_conn"]), []
    )
    out["repeats"] = len(mine)
    return out


rows = [merged(label) for label in labels]
direct = rows[0]


def ratio(value, base, higher_is_better=False):
    if not base or not value:
        return "—"
    return f"{value / base:.2f}×"


def after_bulk(r):
    if "rtt_after_bulk_p50_us" not in r:
        return "—"
    return f"{r['rtt_after_bulk_p50_us']:.0f} / {r['rtt_after_bulk_p99_us']:.0f} µs"


def cpu(r):
    v = r.get("cpu_us_per_mib", 0)
    if not v:
        return "—"
    # The direct target's only process is the echo server, not a tunnel.
    return f"(echo server: {v:.0f} µs)" if r is direct else f"{v:.0f} µs"


print()
print(f"Median of {max(r['repeats'] for r in rows)} runs per target.")
print()
print("| target | RTT p50 | RTT p99 | 1 MiB msgs MiB/s | tunnel CPU per MiB | connect→first msg p50 | RTT p50 under bulk (HOL) | RTT p99 under bulk (HOL) | KiB RSS per idle WS (both sides) |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    rss = sum(kib for _, kib in r["rss_kib_per_idle_conn"]) if r["rss_kib_per_idle_conn"] else 0
    print(
        f"| {r['label']} "
        f"| {r['rtt_p50_us']:.0f} µs ({ratio(r['rtt_p50_us'], direct['rtt_p50_us'])}) "
        f"| {r['rtt_p99_us']:.0f} µs ({ratio(r['rtt_p99_us'], direct['rtt_p99_us'])}) "
        f"| {r['throughput_mib_s']:.0f} ({ratio(r['throughput_mib_s'], direct['throughput_mib_s'])}) "
        f"| {cpu(r)} "
        f"| {r['connect_p50_us']:.0f} µs ({ratio(r['connect_p50_us'], direct['connect_p50_us'])}) "
        f"| {r['hol_rtt_p50_us']:.0f} µs ({ratio(r['hol_rtt_p50_us'], direct['hol_rtt_p50_us'])}) "
        f"| {r['hol_rtt_p99_us']:.0f} µs ({ratio(r['hol_rtt_p99_us'], direct['hol_rtt_p99_us'])}) "
        f"| {rss:.1f} |"
    )

print()
print("Per operation, the tunnel's own processes (direct: the echo server), medians: CPU time and")
print("thread context switches per 64-byte round trip and per new connection (opened, one echo,")
print("closed); and 64-byte round trips on the throughput connection right after its bulk")
print("transfer (every other round-trip figure is taken after a pause, see burrow-bench --settle-ms).")
print()
print("| target | CPU per round trip | switches per round trip | CPU per connection | switches per connection | RTT p50 / p99 right after bulk |")
print("|---|---|---|---|---|---|")
for r in rows:
    if "cpu_us_per_rtt" not in r:
        continue
    print(
        f"| {r['label']} "
        f"| {r['cpu_us_per_rtt']:.1f} µs "
        f"| {r['switches_per_rtt']:.2f} "
        f"| {r['cpu_us_per_connect']:.0f} µs "
        f"| {r['switches_per_connect']:.1f} "
        f"| {after_bulk(r)} |"
    )
