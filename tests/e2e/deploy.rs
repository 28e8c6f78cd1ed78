//! The monitoring files under deploy/ stay valid: promtool checks the scrape config and the
//! alert rules and runs the rules' unit tests; the dashboard is valid JSON whose queries use
//! only metrics the agent exports.

use std::process::Command;

use crate::harness::{require, Need};

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(DEPLOY)
        .output()
        .expect("promtool (Debian package prometheus, installed by scripts/setup.sh)");
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_and_scrape_config_pass_promtool() {
    if !require(&[Need::Tool("promtool")]) {
        return;
    }
    promtool(&["check", "config", "prometheus/prometheus.yml"]);
    promtool(&["check", "rules", "prometheus/egress-alerts.yaml"]);
    promtool(&["test", "rules", "prometheus/egress-alerts.test.yaml"]);
}

#[test]
fn dashboard_is_json_and_uses_exported_metrics() {
    let text = std::fs::read_to_string(format!("{DEPLOY}/grafana/egress-dashboard.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(v["panels"].as_array().is_some_and(|p| !p.is_empty()));
    let exported = [
        "egress_connections_total",
        "egress_denied_total",
        "egress_proxy_connections_total",
        "egress_proxy_bytes_total",
        "egress_proxy_connect_duration_seconds",
        "egress_proxy_connect_duration_seconds_bucket",
        "egress_proxy_connect_duration_seconds_sum",
        "egress_proxy_connect_duration_seconds_count",
        "egress_proxy_active_connections",
        "egress_policy_generation",
        "egress_policy_rules",
        "egress_workloads",
        "egress_map_entries",
        "egress_map_capacity",
        "egress_flow_events_lost_total",
        "egress_ready",
        "egress_build_info",
    ];
    for name in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if name.starts_with("egress_")
            && !name.starts_with("egress_agent")
            && name != "egress_dashboard"
        {
            assert!(
                exported.contains(&name),
                "the dashboard queries {name}, which the agent does not export"
            );
        }
    }
}

// ---- Kubernetes manifests (deploy/kubernetes), checked offline ----------------------------

const CRDS: [&str; 3] = [
    "kubernetes/base/crds/meshconfigs.yaml",
    "kubernetes/base/crds/egresses.yaml",
    "kubernetes/base/crds/egressgateways.yaml",
];

fn run_in_deploy(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .current_dir(DEPLOY)
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (installed by scripts/setup.sh)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `kubectl kustomize DIR` into a temporary file.
fn kustomize(dir: &str, tag: &str) -> std::path::PathBuf {
    let (ok, text) = run_in_deploy(Command::new("kubectl").args(["kustomize", dir]));
    assert!(ok, "kubectl kustomize {dir}:\n{text}");
    let path = std::env::temp_dir().join(format!(
        "egress-{tag}-{}-{}.yaml",
        dir.replace('/', "-"),
        std::process::id()
    ));
    std::fs::write(&path, &text).unwrap();
    path
}

#[test]
fn kustomization_builds_and_every_manifest_validates_against_the_kubernetes_schemas() {
    if !require(&[Need::Tool("kubectl"), Need::Tool("python3")]) {
        return;
    }
    for overlay in ["kubernetes", "kubernetes/cgroupfs"] {
        validate_kustomization(overlay);
    }
    // The ServiceMonitor is a Prometheus Operator CRD kind without an offline schema here:
    // it is checked for building only.
    let mon = kustomize("kubernetes/monitoring", "monitoring");
    let text = std::fs::read_to_string(&mon).unwrap();
    assert!(text.contains("kind: ServiceMonitor"), "{text}");
    let _ = std::fs::remove_file(mon);
}

fn validate_kustomization(dir: &str) {
    let built = kustomize(dir, "kustomize");
    let root = if dir.ends_with("cgroupfs") {
        "--cgroup-root=/sys/fs/cgroup/kubepods\n"
    } else {
        "--cgroup-root=/sys/fs/cgroup/kubepods.slice\n"
    };
    assert!(
        std::fs::read_to_string(&built).unwrap().contains(root),
        "{dir}: no {root}"
    );
    for version in ["1.30.0", "1.33.0"] {
        let (ok, text) = run_in_deploy(
            Command::new("python3")
                .args(["-m", "kubernetes_validate", "--strict", "-k", version])
                .arg(&built),
        );
        assert!(ok, "kubernetes-validate {version}:\n{text}");
        // Every object was checked against a schema, none skipped as unknown.
        assert!(!text.contains("Couldn't find schema"), "{text}");
        for kind in [
            "namespace/egress-system",
            "customresourcedefinition/meshconfigs.policy.egress.dev",
            "customresourcedefinition/egresses.policy.egress.dev",
            "customresourcedefinition/egressgateways.policy.egress.dev",
            "serviceaccount/egress-agent",
            "clusterrole/egress-agent",
            "clusterrolebinding/egress-agent",
            "daemonset/egress-agent",
            "service/egress-agent-metrics",
        ] {
            assert!(
                text.contains(&format!("passed for resource {kind}")),
                "{kind} not validated:\n{text}"
            );
        }
    }
    let _ = std::fs::remove_file(built);
}

#[test]
fn daemonset_capabilities_are_the_justified_few() {
    let text = std::fs::read_to_string(format!("{DEPLOY}/kubernetes/base/daemonset.yaml")).unwrap();
    let ds = egress_agent::policy::documents(&text, "daemonset.yaml").unwrap()[0]
        .body
        .clone();
    let c = &ds["spec"]["template"]["spec"]["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], serde_json::Value::from(false));
    assert_eq!(
        sc["capabilities"]["drop"][0],
        serde_json::Value::from("ALL")
    );
    let added: Vec<&str> = sc["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(added, ["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"]);
    // Each one is justified by a comment right above it.
    for cap in added {
        let line = text
            .lines()
            .position(|l| l.trim() == format!("- {cap}"))
            .unwrap();
        let above = text.lines().nth(line - 1).unwrap().trim();
        assert!(above.starts_with('#'), "{cap} has no comment above it");
    }
    assert_eq!(
        ds["spec"]["template"]["spec"]["hostPID"],
        serde_json::Value::from(true)
    );
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(args.contains(&"--kubernetes"), "{args:?}");
    // The agent's own parser accepts the arguments the DaemonSet gives it (an unknown flag
    // fails before --help is honoured).
    agent_ok(
        Command::new(env!("CARGO_BIN_EXE_egress-agent"))
            .args(&args)
            .arg("--help"),
    );
}

fn agent_ok(cmd: &mut Command) {
    let out = cmd.output().expect("egress-agent");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// scripts/validate-crd-objects.py with our CRDs.
fn crd_validator() -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg("../scripts/validate-crd-objects.py");
    for crd in CRDS {
        cmd.args(["--crd", crd]);
    }
    cmd
}

#[test]
fn example_objects_validate_against_the_crd_schemas_and_the_agent() {
    if !require(&[Need::Tool("python3")]) {
        return;
    }
    let (ok, text) = run_in_deploy(
        crd_validator().args(["examples/kubernetes.yaml", "kubernetes/meshconfig.yaml"]),
    );
    assert!(ok, "{text}");
    assert_eq!(text.matches("ok   ").count(), 10, "{text}");
    // The same objects through the agent's own parser (the one the watcher uses).
    agent_ok(
        Command::new(env!("CARGO_BIN_EXE_egress-agent"))
            .args(["validate", "--kubernetes", "--config"])
            .arg(format!("{DEPLOY}/examples/kubernetes.yaml")),
    );
    // The schema check does catch what it should: an unknown field and an out-of-range port.
    let bad = std::env::temp_dir().join(format!("egress-bad-crd-{}.yaml", std::process::id()));
    std::fs::write(
        &bad,
        "apiVersion: policy.egress.dev/v1alpha1\nkind: Egress\nmetadata: {name: x, namespace: y}\nspec: {sources: [{name: a, podSelector: {}}], ports: [{number: 70000, protocl: tcp}]}\n",
    )
    .unwrap();
    let (ok, text) = run_in_deploy(crd_validator().arg(&bad));
    let _ = std::fs::remove_file(&bad);
    assert!(!ok, "{text}");
    assert!(text.contains("'protocl' was unexpected"), "{text}");
    assert!(
        text.contains("spec.sources.0: {"),
        "name and podSelector both: {text}"
    );
    assert!(
        text.contains("spec.ports.0.number: 70000 is greater than the maximum of 65535"),
        "{text}"
    );
}

/// The MeshConfig CRD keeps `spec.dns` and `spec.hostBinding` (an API server prunes fields
/// its schema does not list, which would leave pods' DNS unsteered).
#[test]
fn the_meshconfig_crd_accepts_dns_and_host_binding() {
    if !require(&[Need::Tool("python3")]) {
        return;
    }
    let file = std::env::temp_dir().join(format!("egress-dns-crd-{}.yaml", std::process::id()));
    std::fs::write(
        &file,
        "apiVersion: policy.egress.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: egress}\nspec:\n  traffic: {enableEgress: false, meshCIDRs: [10.96.0.0/12]}\n  dns: {enabled: true, port: 15053, minTtl: 5s, grace: 5s, maxAddressesPerName: 1000, upstreamTimeout: 500ms}\n  hostBinding: 'off'\n---\napiVersion: policy.egress.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: typo}\nspec: {dns: {enabled: true, ttl: 5s}}\n",
    )
    .unwrap();
    let (ok, text) = run_in_deploy(crd_validator().arg(&file));
    let _ = std::fs::remove_file(&file);
    assert!(!ok, "{text}");
    assert_eq!(text.matches("ok   ").count(), 1, "{text}");
    assert!(text.contains("'ttl' was unexpected"), "{text}");
}
