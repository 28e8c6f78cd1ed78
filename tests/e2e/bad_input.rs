//! Bad input is refused with exit status 2 and one line naming the file, object and field,
//! before anything on the machine changes. These run without root: `run` validates first.

use std::process::Command;

use crate::harness::{cgroup2_mount, require, Need, AGENT};

const GOOD: &str = r#"kind: MeshConfig
metadata: {name: egress}
spec: {traffic: {enableEgress: false}, proxy: {port: 15001}}
---
kind: Workload
metadata: {name: web}
---
kind: Egress
metadata: {name: allow-api}
spec:
  sources: [{name: web}]
  ipAddresses: [127.11.0.0/16]
  ports: [{number: 443, protocol: https}]
"#;

fn run_with(
    text: &str,
    tag: &str,
) -> (Option<i32>, String, std::path::PathBuf, std::path::PathBuf) {
    let file = std::env::temp_dir().join(format!("egress-bad-{}-{tag}.yaml", std::process::id()));
    std::fs::write(&file, text).unwrap();
    let root = cgroup2_mount().join(format!("egress-test-bad-{}-{tag}", std::process::id()));
    let pins = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/egress-test-bad-{}-{tag}",
        std::process::id()
    ));
    let out = Command::new(AGENT)
        .args(["run", "--config"])
        .arg(&file)
        .arg("--cgroup-root")
        .arg(&root)
        .arg("--pin-dir")
        .arg(&pins)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    (out.status.code(), stderr, root, pins)
}

#[test]
fn invalid_policies_exit_2_with_one_line_naming_file_object_and_field() {
    if !require(&[Need::Cgroup2]) {
        return;
    }
    let cases: &[(&str, String, &str)] = &[
        (
            "yaml",
            "kind: Egress\nmetadata: {name: x\n".into(),
            "document 1:",
        ),
        (
            "kind",
            GOOD.replace("kind: Workload", "kind: Pod"),
            "Pod default/web: kind: unknown kind",
        ),
        (
            "field",
            GOOD.replace("ports: [", "colour: blue\n  ports: ["),
            "Egress default/allow-api: spec.colour: unknown field `colour`",
        ),
        (
            "cidr",
            GOOD.replace("127.11.0.0/16", "127.11.0.0/33"),
            "Egress default/allow-api: spec.ipAddresses[0]: invalid CIDR",
        ),
        (
            "port0",
            GOOD.replace("number: 443", "number: 0"),
            "Egress default/allow-api: spec.ports[0].number: port 0 is out of range 1-65535",
        ),
        (
            "port65536",
            GOOD.replace("number: 443", "number: 65536"),
            "Egress default/allow-api: spec.ports[0].number: port 65536 is out of range 1-65535",
        ),
        (
            "proxyport",
            GOOD.replace("port: 15001", "port: 0"),
            "MeshConfig egress: spec.proxy.port: port 0 is out of range",
        ),
        (
            "dup",
            format!("{GOOD}---\nkind: Workload\nmetadata: {{name: web}}\n"),
            "Workload default/web: metadata.name: duplicate Workload default/web",
        ),
        (
            "missing",
            GOOD.replace("sources: [{name: web}]", "sources: [{name: db}]"),
            "Egress default/allow-api: spec.sources[0].name: no Workload default/db in this file",
        ),
        (
            // A standalone agent has no cluster to find a Service's endpoints in.
            "svcgw",
            format!("{GOOD}---\nkind: EgressGateway\nmetadata: {{name: g}}\nspec: {{global: [{{service: {{name: gw, namespace: fsm}}, mode: socks5}}]}}\n"),
            "EgressGateway g: spec.global[0].service: a gateway named by Service needs Kubernetes mode",
        ),
        (
            "fsmrules",
            format!("{GOOD}---\napiVersion: policy.flomesh.io/v1alpha1\nkind: EgressGateway\nmetadata: {{name: g, namespace: fsm}}\nspec: {{global: [{{service: gw, namespace: fsm}}], rules: [{{egressPolicies: [{{name: e, namespace: a}}], egressGateways: [{{service: gw, namespace: fsm}}]}}]}}\n"),
            "EgressGateway g: spec.rules: FSM's gateway rules",
        ),
    ];
    for (tag, text, want) in cases {
        let (code, stderr, root, pins) = run_with(text, tag);
        assert_eq!(code, Some(2), "{tag}: exit status, stderr: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{tag}: not one line: {stderr}");
        assert!(
            stderr.contains(&format!("egress-bad-{}-{tag}.yaml: ", std::process::id())),
            "{tag}: file not named: {stderr}"
        );
        assert!(stderr.contains(want), "{tag}: want {want:?} in {stderr:?}");
        assert!(
            !root.exists() && !pins.exists(),
            "{tag}: something was created"
        );
    }
}

#[test]
fn the_root_cgroup_is_refused() {
    if !require(&[Need::Cgroup2]) {
        return;
    }
    let file = std::env::temp_dir().join(format!("egress-root-{}.yaml", std::process::id()));
    std::fs::write(&file, GOOD).unwrap();
    let out = Command::new(AGENT)
        .args(["run", "--config"])
        .arg(&file)
        .arg("--cgroup-root")
        .arg(cgroup2_mount())
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("is the root of the cgroup v2 hierarchy"),
        "{stderr}"
    );
    assert!(stderr.contains("--allow-root-cgroup"), "{stderr}");
}

#[test]
fn bad_usage_exits_2() {
    for args in [
        &["frobnicate"][..],
        &["run"],
        &["exec", "--workload", "Not_A_Name", "--", "true"],
        &["run", "--config", "/nonexistent/policy.yaml"],
    ] {
        let out = Command::new(AGENT).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(!stderr.trim().is_empty(), "{args:?}: no message");
    }
}
