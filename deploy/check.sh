#!/usr/bin/env bash
# Checks the deploy/ artifacts: Prometheus config, alert rules and their unit
# tests, the Grafana dashboard (JSON, layout, and every PromQL query), and the
# systemd units. Runs every check, then exits non-zero if any failed.
#
#   bash deploy/check.sh
#
# Needs promtool (Debian: prometheus) and python3. Uses systemd-analyze and
# ShellCheck when present, and says so when it skips them.
set -euo pipefail
cd "$(dirname "$0")/.."

failed=()
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# run NAME CMD...: run CMD, show its output indented, record a failure.
run() {
	local name=$1
	shift
	printf '==> %s\n' "$name"
	if "$@" >"$tmp/out" 2>&1; then
		sed 's/^/    /' "$tmp/out"
		printf '    ok\n'
	else
		sed 's/^/    /' "$tmp/out"
		printf '    FAILED: %s\n' "$name"
		failed+=("$name")
	fi
}

skip() {
	printf '==> %s\n    SKIPPED: %s\n' "$1" "$2"
}

missing() {
	printf '==> %s\n    FAILED: %s\n' "$1" "$2"
	failed+=("$1")
}

# --- Prometheus ---------------------------------------------------------------
if command -v promtool >/dev/null 2>&1; then
	# check config also checks the rule_files and file_sd files it names,
	# resolved relative to prometheus.yml.
	run "promtool check config" promtool check config deploy/prometheus/prometheus.yml
	run "promtool check rules" promtool check rules deploy/prometheus/alerts.yml
	run "promtool test rules" promtool test rules deploy/prometheus/alerts.test.yml
else
	missing "promtool" "promtool not found (Debian package prometheus; scripts/install-deps.sh installs it)"
fi

# Every alert: severity, summary, description, and a runbook_url whose anchor is
# a section of deploy/RUNBOOK.md.
alert_annotations() {
	python3 - deploy/prometheus/alerts.yml deploy/RUNBOOK.md <<'EOF'
import re, sys, yaml

rules_path, runbook_path = sys.argv[1], sys.argv[2]
with open(rules_path, encoding="utf-8") as f:
    groups = yaml.safe_load(f)["groups"]
with open(runbook_path, encoding="utf-8") as f:
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", f.read(), re.M)}
errors = []
for g in groups:
    for r in g["rules"]:
        name = r.get("alert")
        if not name:
            continue
        if r.get("labels", {}).get("severity") not in ("critical", "warning"):
            errors.append(f"{name}: severity must be critical or warning")
        ann = r.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            if not ann.get(key):
                errors.append(f"{name}: no {key}")
        anchor = ann.get("runbook_url", "").partition("#")[2]
        if anchor and anchor not in anchors:
            errors.append(f"{name}: runbook_url anchor #{anchor} is not a heading of {runbook_path}")
for e in errors:
    print(f"{rules_path}: {e}")
sys.exit(1 if errors else 0)
EOF
}

if command -v python3 >/dev/null 2>&1 && python3 -c 'import yaml' 2>/dev/null; then
	run "alerts: severity, summary, description, runbook_url" alert_annotations
else
	missing "alert annotations" "needs python3 with yaml (Debian: python3-yaml)"
fi

# --- Grafana ------------------------------------------------------------------
dashboard=deploy/grafana/vipshare.json

# Structure: valid JSON, the datasource input, unique panel ids, no panel
# overlapping another. Writes every query as a recording rule so promtool can
# parse the PromQL (Grafana's $variables replaced by plausible values).
grafana_structure() {
	python3 - "$dashboard" "$tmp/dashboard-rules.yml" <<'EOF'
import json, sys

path, rules_out = sys.argv[1], sys.argv[2]
with open(path, encoding="utf-8") as f:
    d = json.load(f)
errors = []
if not any(i.get("name") == "DS_PROMETHEUS" for i in d.get("__inputs", [])):
    errors.append("no DS_PROMETHEUS input")
if not isinstance(d.get("schemaVersion"), int) or d["schemaVersion"] < 36:
    errors.append(f"schemaVersion {d.get('schemaVersion')!r} (want >= 36)")
ids, cells, exprs = set(), {}, []
for p in d.get("panels", []):
    title = p.get("title", "?")
    if p.get("id") in ids:
        errors.append(f"duplicate panel id {p.get('id')} ({title})")
    ids.add(p.get("id"))
    g = p.get("gridPos", {})
    if g.get("x", 0) + g.get("w", 0) > 24:
        errors.append(f"panel {title!r} is wider than the grid")
    for x in range(g.get("x", 0), g.get("x", 0) + g.get("w", 0)):
        for y in range(g.get("y", 0), g.get("y", 0) + g.get("h", 0)):
            if (x, y) in cells:
                errors.append(f"panel {title!r} overlaps {cells[(x, y)]!r}")
                break
            cells[(x, y)] = title
    if p.get("type") != "row":
        if p.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
            errors.append(f"panel {title!r} does not use ${{DS_PROMETHEUS}}")
        if not p.get("targets"):
            errors.append(f"panel {title!r} has no query")
    for t in p.get("targets", []):
        exprs.append((title, t.get("expr", "")))
for a in d.get("annotations", {}).get("list", []):
    if a.get("expr"):
        exprs.append((a.get("name", "annotation"), a["expr"]))
for e in dict.fromkeys(errors):
    print(f"{path}: {e}")

def promql(expr):
    for var, value in (("$__rate_interval", "1m"), ("$__interval", "15s"),
                       ("$__range", "1h"), ("$agent", ".*"), ("$vip", ".*")):
        expr = expr.replace(var, value)
    return expr

with open(rules_out, "w", encoding="utf-8") as f:
    f.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, (title, expr) in enumerate(exprs):
        f.write(f"      # {title}\n      - record: dashboard:query{i}\n")
        f.write(f"        expr: {json.dumps(promql(expr))}\n")
print(f"{len(d.get('panels', []))} panels, {len(exprs)} queries")
sys.exit(1 if errors else 0)
EOF
}

if command -v python3 >/dev/null 2>&1; then
	run "grafana: valid JSON" python3 -m json.tool "$dashboard" /dev/null
	run "grafana: dashboard structure" grafana_structure
	if command -v promtool >/dev/null 2>&1 && [ -s "$tmp/dashboard-rules.yml" ]; then
		run "grafana: PromQL of every query" promtool check rules "$tmp/dashboard-rules.yml"
	fi
else
	missing "grafana" "python3 not found"
fi

# --- agent.toml ---------------------------------------------------------------
# The example must parse, and use only keys that node-agent/src/config.rs
# declares (a field renamed there must be renamed here too).
agent_toml() {
	python3 - deploy/agent.toml node-agent/src/config.rs <<'EOF'
import re, sys, tomllib

example, source = sys.argv[1], sys.argv[2]
with open(example, "rb") as f:
    cfg = tomllib.load(f)
try:
    with open(source, encoding="utf-8") as f:
        fields = set(re.findall(r"^\s*pub\s+(\w+)\s*:", f.read(), re.M))
except FileNotFoundError:
    print(f"{source} not found: checked the TOML syntax only")
    sys.exit(0)

def keys(d, prefix=""):
    for k, v in d.items():
        yield prefix + k, k
        for item in v if isinstance(v, list) else [v]:
            if isinstance(item, dict):
                yield from keys(item, prefix + k + ".")

unknown = sorted({path for path, k in keys(cfg) if k not in fields})
for path in unknown:
    print(f"{example}: key {path} is not a field in {source}")
sys.exit(1 if unknown else 0)
EOF
}

if command -v python3 >/dev/null 2>&1 && python3 -c 'import tomllib' 2>/dev/null; then
	run "agent.toml against node-agent/src/config.rs" agent_toml
else
	skip "agent.toml" "needs python3 >= 3.11 (tomllib)"
fi

# --- systemd ------------------------------------------------------------------
units=(vipshare-controller vipshare-agent)

# systemd-analyze verify refuses an ExecStart binary that does not exist, and
# only warns (exit 0) on unknown keys or bad values. So verify copies whose
# ExecStart points at stub executables, and fail on any output at all.
systemd_verify() {
	mkdir -p "$tmp/units/bin"
	local u paths=()
	for u in "${units[@]}"; do
		printf '#!/bin/sh\nexit 0\n' >"$tmp/units/bin/$u"
		chmod +x "$tmp/units/bin/$u"
		sed "s#^ExecStart=/usr/local/bin/#ExecStart=$tmp/units/bin/#" \
			"deploy/systemd/$u.service" >"$tmp/units/$u.service"
		paths+=("$tmp/units/$u.service")
	done
	local out rc=0
	out=$(systemd-analyze verify "${paths[@]}" 2>&1) || rc=$?
	if [ -n "$out" ]; then
		printf '%s\n' "$out"
	fi
	[ "$rc" -eq 0 ] && [ -z "$out" ]
}

# Guard against the hardening being weakened by accident: exposure score
# (0-100 here, shown as 0.0-10.0) must stay at or below these. Today:
# controller 1.2, agent 2.0 (it needs CAP_NET_ADMIN, CAP_NET_RAW, AF_NETLINK
# and a writable /proc/sys/net).
systemd_security() {
	local u threshold rc=0
	for u in "${units[@]}"; do
		case $u in
		vipshare-controller) threshold=20 ;;
		*) threshold=30 ;;
		esac
		if systemd-analyze security --offline=true --threshold="$threshold" \
			"$tmp/units/$u.service" >"$tmp/security" 2>&1; then
			grep 'Overall exposure' "$tmp/security" || true
		else
			grep 'Overall exposure' "$tmp/security" || cat "$tmp/security"
			printf '%s: exposure above %s.%s\n' "$u" "${threshold:0:1}" "${threshold:1}"
			rc=1
		fi
	done
	return "$rc"
}

if command -v systemd-analyze >/dev/null 2>&1; then
	run "systemd-analyze verify" systemd_verify
	if systemd-analyze security --help 2>/dev/null | grep -q -- '--offline'; then
		run "systemd-analyze security (offline)" systemd_security
	else
		skip "systemd-analyze security" "this systemd has no --offline (needs systemd 250 or later)"
	fi
else
	skip "systemd-analyze verify" "systemd-analyze not installed; the units were not checked"
fi

# --- this script ----------------------------------------------------------------
if command -v shellcheck >/dev/null 2>&1; then
	run "shellcheck deploy/check.sh" shellcheck deploy/check.sh
else
	skip "shellcheck" "shellcheck not installed"
fi

echo
if [ "${#failed[@]}" -gt 0 ]; then
	printf 'deploy/check.sh: %d check(s) FAILED:\n' "${#failed[@]}"
	printf '  - %s\n' "${failed[@]}"
	exit 1
fi
echo "deploy/check.sh: all checks passed"
