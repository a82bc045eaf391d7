#!/usr/bin/env python3
"""Checks the dashboard and the alert rules against the metrics Parley really exports.

    python3 deploy/grafana/check_metrics.py        # from the repository root; needs PyYAML

For every PromQL expression in deploy/grafana/parley-dashboard.json and
deploy/kubernetes/prometheusrule.yaml it checks that
- every parley_* name is registered in shared/src/metrics.rs, with the suffixes the
  prometheus crate exposes (a counter's name as registered, ending in _total; a histogram's
  _bucket, _sum and _count; a gauge's name);
- every label in a selector, in `by (...)` and in `on (...)` is a label of the metrics it
  applies to (or a target label the ServiceMonitor adds, or `le` of a histogram bucket);
- every label value matched on a closed-set label (route, outcome, platform, api, kind)
  is one the code records — and each value in the table below is still a string literal
  in the file that records it, so the table cannot drift from the code unnoticed;
- every recorded series (level:metric:operations) used is defined by a recording rule.
Metrics of other exporters (rabbitmq_*, kube_*, up, ALERTS) are listed, not checked.
Exit status 1 on any finding.
"""

import json
import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
METRICS_RS = next((ROOT / "shared/src").rglob("metrics.rs"))
DASHBOARD = ROOT / "deploy/grafana/parley-dashboard.json"
RULES = ROOT / "deploy/kubernetes/prometheusrule.yaml"

# Labels every scraped series carries (Prometheus Operator ServiceMonitor with
# podTargetLabels app.kubernetes.io/component, see deploy/kubernetes/servicemonitor.yaml).
TARGET_LABELS = {"namespace", "pod", "instance", "job", "service", "endpoint", "container",
                 "app_kubernetes_io_component"}

# The closed label-value sets, and the source trees whose string literals they come from
# (whole crates, so moving code between files inside a crate needs no change here).
VALUES = {
    ("parley_http_requests_total", "route"): (
        {"dingtalk_callback", "wecom_callback", "wecom_verify", "notify"},
        ["ingress/src"]),
    ("parley_ack_duration_seconds", "route"): (
        {"dingtalk_callback", "wecom_callback", "wecom_verify", "notify"},
        ["ingress/src"]),
    ("parley_http_requests_total", "outcome"): (
        {"accepted", "ignored", "duplicate", "unknown_bot", "too_large", "unreadable",
         "bad_signature", "stale_timestamp", "bad_timestamp", "malformed", "wrong_receiver",
         "bad_ciphertext", "queue_unavailable", "unauthorized", "cache_unavailable", "refreshed", "slow_body"},
        ["ingress/src"]),
    ("parley_jobs_total", "platform"): (
        {"dingtalk", "wecom", "wecom_aibot", "dingtalk_robot", "wecom_robot"}, ["shared/src"]),
    ("parley_job_duration_seconds", "platform"): (
        {"dingtalk", "wecom", "wecom_aibot", "dingtalk_robot", "wecom_robot"}, ["shared/src"]),
    ("parley_jobs_total", "outcome"): (
        {"answered", "model_failed", "command", "fixed", "unsupported", "notice", "duplicate",
         "retried", "dead_lettered", "busy", "quota", "denied"},
        ["worker/src"]),
    ("parley_llm_requests_total", "outcome"): (
        {"ok", "timeout", "network", "rate_limited", "quota_exhausted", "server_error",
         "refused", "malformed"},
        ["shared/src"]),
    ("parley_llm_tokens_total", "kind"): ({"prompt", "completion"}, ["worker/src"]),
    ("parley_platform_requests_total", "platform"): (
        {"dingtalk", "wecom", "dingtalk_robot", "wecom_robot"},
        ["shared/src"]),
    ("parley_platform_requests_total", "api"): (
        {"token", "session_webhook", "group_send", "oto_send", "gettoken", "message_send",
         "robot_send"},
        ["shared/src"]),
    ("parley_platform_requests_total", "outcome"): (
        {"ok", "error", "network", "refused", "throttled", "busy", "expired", "token_refused"},
        ["shared/src"]),
    ("parley_aibot_refreshes_total", "outcome"): (
        {"progress", "final", "follows", "unknown", "slow"}, ["ingress/src"]),
    ("parley_aibot_response_url_total", "reason"): (
        {"late", "not_refreshed", "rest"}, ["shared/src"]),
    ("parley_aibot_response_url_total", "outcome"): (
        {"ok", "refused", "failed", "no_url"}, ["shared/src"]),
    ("parley_limit_rejections_total", "kind"): (
        {"rpm", "tpm", "backlog", "user_quota", "policy"}, ["shared/src", "worker/src"]),
    ("parley_limit_wait_seconds", "kind"): ({"rpm", "tpm"}, ["shared/src"]),
    ("parley_stream_connection_state", "state"): (
        {"connecting", "connected", "auth_failed", "failed"}, ["ingress/src"]),
    ("parley_stream_reconnects_total", "cause"): (
        {"disconnect", "closed", "timeout", "auth_failed", "open_failed", "connect_failed",
         "queue_unavailable"},
        ["ingress/src"]),
    ("parley_stream_frames_total", "type"): (
        {"callback", "event", "system", "unknown"}, ["ingress/src"]),
    ("parley_stream_frames_total", "outcome"): (
        {"queued", "not_queued", "malformed", "unsupported", "answered", "disconnect"},
        ["ingress/src"]),
    ("parley_token_fetches_total", "platform"): (
        {"dingtalk", "wecom"}, ["shared/src"]),
}

problems = []


def problem(where, msg):
    problems.append(f"{where}: {msg}")


def registered():
    """name → (type, labels) from shared/src/metrics.rs."""
    src = METRICS_RS.read_text()
    out = {}
    for kind, name, rest in re.findall(
            r'\b(counter|histogram|gauge|gauge_vec)\(\s*&r,\s*"([a-z_]+)",\s*"[^"]*",?\s*([^)]*)\)', src):
        labels = re.findall(r'"([a-z_]+)"', rest.split("]")[0]) if kind != "gauge" else []
        out[name] = ("gauge" if kind == "gauge_vec" else kind, set(labels))
    if not out:
        sys.exit(f"no metric found in {METRICS_RS}")
    return out


def exposed(reg):
    """Exposed series name → (registered name, labels)."""
    out = {}
    for name, (kind, labels) in reg.items():
        if kind == "histogram":
            out[name + "_bucket"] = (name, labels | {"le"})
            out[name + "_sum"] = (name, labels)
            out[name + "_count"] = (name, labels)
        else:
            if kind == "counter" and not name.endswith("_total"):
                problem("metrics.rs", f"counter {name} does not end in _total")
            out[name] = (name, labels)
    return out


def check_values_in_code():
    for (metric, label), (values, files) in VALUES.items():
        text = "".join(rs.read_text() for f in files for rs in sorted((ROOT / f).rglob("*.rs")))
        for v in sorted(values):
            if f'"{v}"' not in text:
                problem("check_metrics.py", f'{metric}{{{label}="{v}"}}: "{v}" not found in {files}')


def matching(regex, values):
    return {v for v in values if re.fullmatch(regex, v)}


def balanced(expr, start):
    """Index just past the parenthesised group that opens at expr[start] == '('."""
    depth = 0
    for i in range(start, len(expr)):
        if expr[i] == "(":
            depth += 1
        elif expr[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(expr)


NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
SELECTOR = re.compile(rf"({NAME})\s*(\{{[^}}]*\}})?")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
KEYWORDS = {"sum", "max", "min", "avg", "count", "rate", "increase", "irate", "by", "on",
            "without", "ignoring", "and", "or", "unless", "offset", "histogram_quantile",
            "absent", "label_values", "group_left", "group_right", "bool", "topk", "bottomk",
            "present_over_time", "last_over_time", "time", "vector", "scalar"}


def series_in(expr, exp, recorded):
    """(name, labels or None) of every series selector in expr; None = not ours."""
    out = []
    for m in SELECTOR.finditer(expr):
        name = m.group(1)
        before = expr[:m.start()]
        # skip label names inside {...}, function names, keywords, durations, strings
        if name in KEYWORDS or before.count('"') % 2 == 1 or re.search(r"\{[^}]*$", before):
            continue
        if re.match(r"\s*\(", expr[m.end():]) and not m.group(2):
            continue  # a function call
        if re.search(r"(\[|\d)$", before):
            continue  # a duration: [5m], offset 15m
        if re.search(r"(by|on|without|ignoring)\s*\([^)]*$", before):
            continue
        out.append((name, m.group(2) or ""))
    return out


def check_expr(where, expr, exp, recorded, others):
    expr = expr.replace("$__rate_interval", "5m")
    all_labels = set(TARGET_LABELS)
    names = series_in(expr, exp, recorded)
    foreign = False
    for name, sel in names:
        if name.startswith("parley_"):
            if name not in exp:
                problem(where, f"{name} is not a metric Parley exports")
                continue
            base, labels = exp[name]
        elif name in recorded:
            base, labels = None, recorded[name]
        elif ":" in name:
            problem(where, f"{name} looks like a recorded series but no rule records it")
            continue
        else:
            others.add(name)
            foreign = True
            continue
        all_labels |= labels
        for label, op, value in MATCHER.findall(sel):
            if label not in labels | TARGET_LABELS:
                problem(where, f"{name} has no label {label}")
                continue
            key = (base, label) if base else None
            if key is None:
                key = next(((m, l) for (m, l) in VALUES if l == label and m in expr), None)
            if key not in VALUES or "$" in value:
                continue
            allowed = VALUES[key][0]
            if op in ("=", "!="):
                if value not in allowed:
                    problem(where, f'{name}{{{label}{op}"{value}"}}: "{value}" is never recorded')
            else:
                for alt in value.split("|"):
                    if re.fullmatch(r"[a-z_]+", alt) and alt not in allowed:
                        problem(where, f'{name}{{{label}{op}"{value}"}}: "{alt}" is never recorded')
                if op == "=~" and not matching(value, allowed):
                    problem(where, f'{name}{{{label}=~"{value}"}} matches no recorded value')
    # by (...) / on (...): labels must exist on the series they group.
    for m in re.finditer(r"\b(by|on)\s*\(([^)]*)\)", expr):
        labels = {l.strip() for l in m.group(2).split(",") if l.strip()}
        if m.group(1) == "by":
            rest = expr[m.end():].lstrip()
            body = expr[m.end():m.end() + balanced(rest, 0) + (len(expr[m.end():]) - len(rest))]
            inner = series_in(body, exp, recorded)
            for name, _ in inner:
                have = (exp[name][1] if name in exp else recorded.get(name)) if (
                    name in exp or name in recorded) else None
                if have is None:
                    continue
                missing = labels - have - TARGET_LABELS
                if missing:
                    problem(where, f"by ({', '.join(sorted(labels))}) over {name}: no label {', '.join(sorted(missing))}")
        elif not foreign:
            missing = labels - all_labels
            if missing:
                problem(where, f"on ({', '.join(sorted(labels))}): no label {', '.join(sorted(missing))}")
    return [n for n, _ in names]


def main():
    reg = registered()
    exp = exposed(reg)
    check_values_in_code()
    others = set()
    used = set()

    rules = yaml.safe_load(RULES.read_text())
    recorded = {}
    for group in rules["spec"]["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                by = re.match(r"\s*(?:sum|max|min|avg|count)\s+by\s*\(([^)]*)\)", rule["expr"])
                hq = re.search(r"histogram_quantile\([^,]+,\s*sum by \(([^)]*)\)", rule["expr"])
                m = by or hq
                labels = {l.strip() for l in m.group(1).split(",")} - {"le"} if m else set()
                if not m:  # a ratio of two recorded series: same labels as its operands
                    first = re.match(rf"\s*({NAME})", rule["expr"]).group(1)
                    labels = recorded[first]
                recorded[rule["record"]] = labels
    for group in rules["spec"]["groups"]:
        for rule in group["rules"]:
            where = f"{RULES.name}: {rule.get('record') or rule.get('alert')}"
            used |= set(check_expr(where, rule["expr"], exp, recorded, others))
            if "alert" in rule:
                for key in ("for",):
                    if key not in rule:
                        problem(where, "no for:")
                if rule.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
                    problem(where, "no severity label")
                ann = rule.get("annotations", {})
                if not ann.get("summary") or "Runbook" not in ann.get("description", ""):
                    problem(where, "needs a summary and a description with a Runbook hint")

    dash = json.loads(DASHBOARD.read_text())

    def walk(panels):
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))

    for p in walk(dash["panels"]):
        if p["type"] == "row":
            continue
        where = f"{DASHBOARD.name}: {p['title']}"
        if not p.get("description"):
            problem(where, "no description")
        if not p.get("fieldConfig", {}).get("defaults", {}).get("unit"):
            problem(where, "no unit")
        for t in p.get("targets", []):
            used |= set(check_expr(where, t["expr"], exp, recorded, others))
            if "rate(" in t["expr"] and re.search(r"rate\([^\]]*\[(?!5m\])", t["expr"]):
                problem(where, f"rate() window other than [5m]: {t['expr']}")
    for v in dash["templating"]["list"]:
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if v["type"] == "query":
            lv = re.match(r"label_values\((.*),\s*([a-z_]+)\)$", q)
            used |= set(check_expr(f"{DASHBOARD.name}: variable {v['name']}", lv.group(1), exp, recorded, others))
            name = re.match(NAME, lv.group(1)).group(0)
            if lv.group(2) not in exp[name][1] | TARGET_LABELS:
                problem(f"variable {v['name']}", f"{name} has no label {lv.group(2)}")
    for a in dash["annotations"]["list"]:
        if a.get("expr"):
            check_expr(f"{DASHBOARD.name}: annotation {a['name']}", a["expr"], exp, recorded, others)

    ours = {exp[n][0] for n in used if n in exp}
    print(f"metrics registered in metrics.rs: {len(reg)}; used: {len(ours)} "
          f"({', '.join(sorted(ours))})")
    unused = set(reg) - ours
    if unused:
        print(f"registered but unused: {', '.join(sorted(unused))}")
    print(f"recorded series defined: {len(recorded)}")
    print(f"other exporters' metrics (not checked): {', '.join(sorted(others)) or 'none'}")
    for p in problems:
        print("PROBLEM", p)
    print(f"{len(problems)} problem(s)")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
