//! The monitoring files under deploy/ stay valid: promtool checks the scrape config and the
//! alert rules and runs the rules' unit tests; the dashboard is valid JSON whose queries use
//! only metrics the agent exports.

use std::process::Command;

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
