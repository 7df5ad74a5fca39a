"""Delta Chat A→B samples (bench/dc_meter.py) put next to the relays' journals, and the
tables of bench_delivery.py and bench_federation.py: where in the way from the send call
to the receiver's incoming-message event each sample's time went."""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

from common import machine_facts, percentile

RESULTS = Path(__file__).resolve().parent / "results"

WARMUP = 3  # samples per relay not counted: the first ones open the SMTP connection

# (stage, where, pattern): the first line matching `pattern` in the sample's window of
# `where` marks the stage; times are seconds after the send call. The submission smtpd
# hands the message to filtermail before queueing it (NOQUEUE); Dovecot tells the IDLE
# client before it logs the delivery and Postfix logs it after that, so the LMTP session's
# start marks the delivery.
STAGES = [
    ("submitted: A's relay has the message (smtpd, after MAIL FROM)", "sender_relay",
     r"smtpd\[\d+\]: (NOQUEUE|[0-9A-F]+): client=.*sasl_username"),
    ("A's relay: TLS to B's relay up (smtp: `Verified TLS connection established`)",
     "sender_relay", r"postfix/smtp\[\d+\]: Verified TLS connection established"),
    ("B's relay has the message (port 25 smtpd, after MAIL FROM)", "receiver_relay",
     r"postfix/smtpd\[\d+\]: (NOQUEUE|[0-9A-F]+): client="),
    ("A's relay sent it to B's relay (smtp status=sent)", "sender_relay",
     r"postfix/smtp\[\d+\]: .*status=sent"),
    ("delivery: Dovecot's LMTP session starts", "receiver_relay",
     r"lmtp\(\d+\): Connect from"),
    ("B's client: IDLE woke up (`Idle has NewData`)", "receiver_events",
     r"Idle has NewData"),
    ("B's client: fetched, handed to receive_imf()", "receiver_events",
     r"Passing message UID \d+ to receive_imf"),
    ("B's client: message parsed and decrypted (`Receiving message`)", "receiver_events",
     r"Receiving message"),
]


def arguments(doc, releases, flags=()):
    """--suite, --samples, --gap of bench_delivery.py and bench_federation.py, and the
    script's own `flags` ((name, help) of on/off options)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    for name, text in flags:
        parser.add_argument(name, action="store_true", help=text)
    parser.add_argument("--suite", default="bookworm", choices=sorted(releases))
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--gap", type=float, default=1.0,
                        help="seconds between samples (one message out of the next's way)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root")
    return args


def load_line():
    """`uptime`'s load averages, to print next to the numbers (the host is shared)."""
    out = subprocess.run(["uptime"], capture_output=True, text=True).stdout
    return out.strip().split("load average: ")[-1]


def save_run(name, args, release, core, runs, load_before):
    """Write every sample to results/<name>-<release>.json (first: the report may fail);
    the first lines of the release's section: what ran when, on what, under what load."""
    raw = RESULTS / f"{name}-{release}.json"
    raw.write_text(json.dumps({"core": core, "runs": runs}))
    facts, loads = machine_facts(), (load_before, load_line())
    flags = "".join(f" --{flag.replace('_', '-')}" for flag in ("quickack", "before_after")
                    if getattr(args, flag, False))
    return [
        f"## {release}",
        "",
        f"Measured by `bench/bench_{name}.py --suite {args.suite} --samples {args.samples}"
        f"{flags}` on "
        f"{facts['date']}; every sample in results/{raw.name}.",
        "",
        f"- machine: {facts['nproc']} CPUs ({facts['cpu']}), {facts['memory']}, "
        f"Linux {facts['kernel']}, host {facts['os']}; load (uptime) before: {loads[0]}; "
        f"after: {loads[1]}",
    ]


def window(lines, start, end):
    return [(round(t - start, 6), text) for t, text in lines if start <= t < end]


def split_journal(samples, sender_lines, receiver_lines):
    """Attach to each sample the journal lines of its time window (from its send call to
    0.2 s after its incoming-message event) of the sender's and the receiver's relay."""
    for s in samples:
        end = s["start"] + s["incoming"] + 0.2
        s["sender_relay"] = window(sender_lines, s["start"], end)
        s["receiver_relay"] = window(receiver_lines, s["start"], end)


def stage_time(sample, where, pattern):
    for t, *rest in sample.get(where, []):
        if re.search(pattern, rest[-1]):
            return t
    return None


def ms(seconds):
    return f"{seconds * 1000:.1f}"


def spread(values):
    """median / p95 in ms, or what is missing."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{ms(statistics.median(values))} / {ms(percentile(values, 0.95))}"


def summary_table(runs, labels):
    """Markdown lines: A→B per relay, then the stages (median / p95, ms after the send
    call) and the parts between them."""
    counted = {label: runs[label][WARMUP:] for label in labels}
    lines = ["| relay | samples | median A→B | p95 | min | max |", "|---|---|---|---|---|---|"]
    for label in labels:
        values = [s["incoming"] for s in counted[label]]
        lines.append(f"| {label} | {len(values)} | **{ms(statistics.median(values))}** | "
                     f"{ms(percentile(values, 0.95))} | {ms(min(values))} | "
                     f"{ms(max(values))} |")
    first, second = ([statistics.median([s["incoming"] for s in counted[label]])
                      for label in labels])
    lines += ["", f"{labels[0]} / {labels[1]} (medians): {first / second:.2f}."]
    lines += ["", "Where the time goes: each stage's time after the send call, ms, median / "
              "p95 (a stage that is no part of this way is left out):", "",
              "| stage | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    lines.append("| the send call returns (message rendered, encrypted, queued) | "
                 + " | ".join(spread([s["send_call"] for s in counted[label]])
                              for label in labels) + " |")
    for name, where, pattern in STAGES:
        cells = [spread([stage_time(s, where, pattern) for s in counted[label]])
                 for label in labels]
        if any(cell != "–" for cell in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| B's client: incoming-message event | " + " | ".join(
        spread([s["incoming"] for s in counted[label]]) for label in labels) + " |")
    lines += ["", "| part | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for name, first, second in PARTS:
        cells = [spread([part(s, first, second) for s in counted[label]]) for label in labels]
        if any(cell != "–" for cell in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    limited = {label: sum("rate limited" in e[2] for s in runs[label]
                          for e in s["sender_events"]) for label in labels}
    lines += ["", "Sender's core log lines saying `rate limited` during the run: "
              + ", ".join(f"{label} {n}" for label, n in limited.items()) + "."]
    return lines


# (part, from stage, to stage): stage indices into STAGES, "start" or "incoming"
PARTS = [
    ("A's client: send call to the relay having the message", "start", 0),
    ("relay(s): submission to the LMTP delivery", 0, 4),
    ("of which relay to relay: TLS up to B's relay having the message (EHLO, MAIL FROM)",
     1, 2),
    ("Dovecot: delivery and IDLE notification, until the core wakes", 4, 5),
    ("B's client: IMAP FETCH", 5, 6),
    ("B's client: parsing and decryption (MimeMessage::from_bytes)", 6, 7),
    ("B's client: the rest of receive_imf until the incoming-message event", 7, "incoming"),
]


def point(sample, stage):
    if stage == "start":
        return 0.0
    if stage == "incoming":
        return sample["incoming"]
    return stage_time(sample, *STAGES[stage][1:])


def part(sample, first, second):
    a, b = point(sample, first), point(sample, second)
    return None if a is None or b is None else b - a


def write_report(path, title, sections):
    """`path` (markdown) from the sections of every release measured so far, kept in a
    .sections.json next to it (`sections`: {release: {"header": lines, "labels": [...],
    "raw": the run's .json}}; the run adds or replaces its own). The tables are made from
    the samples each time, so a better analysis can be applied to earlier runs."""
    store = path.with_suffix(".sections.json")
    known = json.loads(store.read_text()) if store.exists() else {}
    known.update(sections)
    store.write_text(json.dumps(known, indent=1))
    text = [f"# {title}", ""]
    for release in sorted(known):
        section = known[release]
        runs = json.loads((path.parent / section["raw"]).read_text())["runs"]
        text += section["header"] + summary_table(runs, section["labels"]) + [""]
    path.write_text("\n".join(text))


def rewrite_reports():
    """Every report again from its stored sections and samples."""
    for store in sorted(RESULTS.glob("*.sections.json")):
        path = store.with_name(store.name.replace(".sections.json", ".md"))
        text = path.read_text() if path.exists() else "# ?"
        write_report(path, text.splitlines()[0].removeprefix("# "), {})


if __name__ == "__main__":
    rewrite_reports()
