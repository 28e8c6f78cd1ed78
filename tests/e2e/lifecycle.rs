//! Who is judged and who is not, the proxy port, and a clean stop.

use std::{path::Path, process::Command};

use crate::harness::{self, privileged, privileged_with, program_exists, Agent, TcpServer, CLIENT};

const LOOP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/connect_loop.py");

const POLICY: &str = r#"
kind: MeshConfig
metadata: {name: egress}
spec: {traffic: {enableEgress: false}, proxy: {port: {proxy_port}}}
---
kind: Workload
metadata: {name: web}
"#;

/// Runs the client from a shell that first moves itself into cgroup `dir`.
fn client_in_cgroup(dir: &Path, args: &[&str]) -> String {
    let script = format!(
        "mkdir -p '{0}' && echo $$ > '{0}/cgroup.procs' && exec python3 '{1}' {2}",
        dir.display(),
        CLIENT,
        args.join(" ")
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    harness::split_local(String::from_utf8_lossy(&out.stdout).trim()).0
}

#[test]
fn only_enrolled_cgroups_are_judged_and_nesting_does_not_escape() {
    if !privileged() {
        return;
    }
    let srv = TcpServer::start("127.21.0.1");
    let agent = Agent::start(POLICY);
    let args = ["tcp", "127.21.0.1", &srv.port(), "x"];
    let ok = format!("ok peer={0} reply={0}|x", srv.addr);

    // The workload is refused (enableEgress false, no rules)...
    assert!(agent.client("web", &args).starts_with("err EPERM"));
    // ...a process outside every workload, here the test itself, is untouched...
    let out = Command::new("python3")
        .arg(harness::CLIENT)
        .args(args)
        .output()
        .unwrap();
    assert_eq!(
        harness::split_local(String::from_utf8_lossy(&out.stdout).trim()).0,
        ok
    );
    // ...so is one in a cgroup below the agent's root that is no workload...
    assert_eq!(client_in_cgroup(&agent.root.join("default"), &args), ok);
    // ...but a workload's process cannot escape by creating a child cgroup.
    let nested = agent.root.join("default/web/escape/deeper");
    let out = client_in_cgroup(&nested, &args);
    assert!(out.starts_with("err EPERM"), "nested cgroup escaped: {out}");
    assert_eq!(srv.accepted(), 2);
}

#[test]
fn the_proxy_port_is_not_a_way_out() {
    if !privileged() {
        return;
    }
    let agent = Agent::start(POLICY);
    let port = agent.proxy_port.to_string();
    // From a workload, dialling the proxy directly is refused in the kernel.
    let out = agent.client("web", &["tcp", "127.0.0.1", &port]);
    assert!(out.starts_with("err EPERM"), "{out}");
    let out = agent.client("web", &["tcp", "0.0.0.0", &port]);
    assert!(out.starts_with("err EPERM"), "{out}");
    // From elsewhere the connection is accepted but reset: the kernel did not redirect it,
    // so it has no original destination.
    let out = Command::new("python3")
        .arg(CLIENT)
        .args(["tcp", "127.0.0.1", &port])
        .output()
        .unwrap();
    let out = harness::split_local(String::from_utf8_lossy(&out.stdout).trim()).0;
    assert!(
        out == format!("ok peer=127.0.0.1:{port} reply=") || out.starts_with("err ECONNRESET"),
        "{out}"
    );
    agent.wait_log("refused a connection that the kernel did not redirect");
}

#[test]
fn a_stop_keeps_enforcing_and_uninstall_leaves_nothing() {
    if !privileged_with(&["bpftool"]) {
        return;
    }
    let mut agent = Agent::start(POLICY);
    let ids = agent.attached_programs();
    assert_eq!(
        ids.len(),
        cgroup_programs(&agent),
        "connect4/6, sendmsg4/6, recvmsg4/6, getpeername4/6, sock_create, cgroup_skb/egress (+ the socket_create LSM; no setsockopt without --node-interface): {ids:?}"
    );
    // cgroup/setsockopt stops nothing without a --node-interface (or with the LSM program).
    agent.wait_log("egress_setsockopt (not attached: ");
    let v = agent
        .pins
        .join(format!("v{}", egress_common::LAYOUT_VERSION));
    assert!(v.join("maps/EGRESS_CONFIG").exists());
    assert!(v.join("links/egress_connect4").exists());
    // Attached with bpf links in multi mode: never overriding, never overridable.
    let show = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&agent.root)
        .output()
        .unwrap();
    let show = String::from_utf8_lossy(&show.stdout).to_string();
    assert_eq!(
        show.matches(" multi ").count(),
        cgroup_programs(&agent),
        "{show}"
    );

    // SIGTERM: the agent goes, the enforcement stays (fail closed).
    let log = agent.stop_keep();
    assert!(
        log.contains("stopping; the programs stay attached"),
        "{log}"
    );
    assert_eq!(agent.attached_programs(), ids);
    let out = agent.client("web", &["tcp", "127.21.0.9", "80"]);
    assert!(
        out.starts_with("err EPERM"),
        "enforcement after stop: {out}"
    );

    // uninstall removes everything.
    let out = agent.uninstall();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !agent.root.exists(),
        "cgroup root {} left behind",
        agent.root.display()
    );
    assert!(
        !agent.pins.exists(),
        "pins {} left behind",
        agent.pins.display()
    );
    assert!(!agent.state.exists(), "state file left behind");
    for id in ids {
        assert!(!program_exists(id), "program {id} still loaded");
    }
}

#[test]
fn an_older_layout_is_replaced_only_after_the_new_programs_attach() {
    if !privileged_with(&["bpftool"]) {
        return;
    }
    let mut agent = Agent::start(POLICY);
    let old_ids = agent.attached_programs();
    agent.stop_keep();
    // Make the installed pins look like an older layout version (bpffs keeps pins valid across
    // a rename): the programs behind them keep enforcing.
    let cur = agent
        .pins
        .join(format!("v{}", egress_common::LAYOUT_VERSION));
    let old = agent
        .pins
        .join(format!("v{}", egress_common::LAYOUT_VERSION - 1));
    std::fs::rename(&cur, &old).unwrap();
    assert!(agent
        .client("web", &["tcp", "127.21.0.9", "80"])
        .starts_with("err EPERM"));

    // A workload keeps trying a refused destination throughout the migration.
    let looper = Command::new(crate::harness::AGENT)
        .args(["exec", "--workload", "web", "--cgroup-root"])
        .arg(&agent.root)
        .args([
            "--",
            "python3",
            LOOP,
            "3",
            "127.21.0.8",
            "80",
            "127.21.0.9",
            "80",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // `egress-agent exec` joined the workload and exec'd the loop before the new agent starts.
    assert!(
        harness::wait_until(std::time::Duration::from_secs(5), || {
            harness::runs(looper.id(), "connect_loop.py")
        }),
        "the connect loop never started"
    );
    agent.spawn();
    let out = looper.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("denied_leaked=0") && !text.contains("denied_refused=0"),
        "{text}"
    );
    let log = agent.log();
    assert!(log.contains("retired the pins of an older layout"), "{log}");
    assert!(!old.exists(), "old pins left behind");
    let new_ids = agent.attached_programs();
    assert_eq!(
        new_ids.len(),
        cgroup_programs(&agent),
        "exactly one set of programs: {new_ids:?}"
    );
    for id in &old_ids {
        assert!(
            !new_ids.contains(id) && !program_exists(*id),
            "old program {id} still attached"
        );
    }
    assert!(agent
        .client("web", &["tcp", "127.21.0.9", "80"])
        .starts_with("err EPERM"));
}

/// Programs on the agent's cgroup root: 11, and the socket_create LSM program where it runs
/// (cgroup/setsockopt only with `--node-interface` where the LSM program cannot run).
fn cgroup_programs(agent: &Agent) -> usize {
    let lsm = agent.pins.join(format!(
        "v{}/links/egress_lsm_socket_create",
        egress_common::LAYOUT_VERSION
    ));
    10 + lsm.exists() as usize
}
