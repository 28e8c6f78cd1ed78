//! `cargo xtask bench --gateway`: a workload's traffic through the agent and an egress gateway
//! (`egress-agent gateway`, HTTP/2 tunnel and SOCKS5) against a direct connection and the
//! classic transparent-to-gateway peers, redsocks → dante (SOCKS5) and redsocks → squid (HTTP
//! CONNECT), all in one network namespace, measured in the same run, the paths interleaved.
//!
//! Paths (nginx and iperf3 serve every address; loopback stand-ins):
//! `direct` (outside every workload, 127.60.0.1), `gateway-http2tunnel` (inside `web`,
//! 127.66.0.1, `gateway: h2`: agent → one HTTP/2 connection → gateway → nginx),
//! `gateway-socks5` (inside `web`, 127.67.0.1, `gateway: socks`), `redsocks-dante` (outside,
//! 127.68.0.1, iptables REDIRECT to redsocks, SOCKS5 to danted) and `redsocks-squid` (outside,
//! 127.69.0.1, the same to squid by HTTP CONNECT).

use std::{fs, path::Path};

use anyhow::Context as _;

use crate::{
    bench_env::{ensure_packages, run_in, Env},
    bench_report::{self as report, Report, Row, Table, Verdict},
    bench_work::{self as work, Route},
};

const PACKAGES: &[&str] = &[
    "wrk",
    "iperf3",
    "nginx-light",
    "iptables",
    "curl",
    "redsocks",
    "dante-server",
    "squid",
];
const REPS: usize = 3;
const PEERS: [&str; 2] = ["redsocks-dante", "redsocks-squid"];

const NGINX: &str = "worker_processes 1;\ndaemon off;\npid @WORK@/gw-nginx.pid;\n\
error_log @WORK@/gw-nginx.error.log warn;\nevents { worker_connections 8192; }\nhttp {\n  \
access_log off;\n  keepalive_timeout 65;\n  keepalive_requests 10000000;\n  server {\n    \
listen 127.60.0.1:8080 backlog=4096;\n    listen 127.66.0.1:8080 backlog=4096;\n    \
listen 127.67.0.1:8080 backlog=4096;\n    listen 127.68.0.1:8080 backlog=4096;\n    \
listen 127.69.0.1:8080 backlog=4096;\n    root @WORK@/www;\n  }\n}\n";

const GATEWAY: &str = "kind: GatewayServer\nmetadata: {name: bench}\nspec:\n  listeners:\n    \
- {address: 127.0.8.1:18080, protocol: http}\n    - {address: 127.0.8.1:11080, protocol: socks5}\n  \
egressAddress: 127.0.8.1\n  allow:\n    - {ipAddresses: [127.66.0.0/15], ports: [{number: 8080}, {number: 5201}]}\n  \
maxConnections: 65536\n";

const POLICY: &str = "kind: MeshConfig\nmetadata: {name: egress}\nspec:\n  traffic: {enableEgress: false}\n  \
proxy: {port: 15001, maxConnections: 65536}\n---\nkind: Workload\nmetadata: {name: web}\n---\n\
kind: EgressGateway\nmetadata: {name: h2}\nspec: {endpoints: [{address: 127.0.8.1:18080, mode: http2tunnel}]}\n---\n\
kind: EgressGateway\nmetadata: {name: socks}\nspec: {endpoints: [{address: 127.0.8.1:11080, mode: socks5}]}\n---\n\
kind: Egress\nmetadata: {name: via-h2}\nspec: {sources: [{name: web}], ipAddresses: [127.66.0.1/32], ports: [{number: 8080}, {number: 5201}], gateway: h2}\n---\n\
kind: Egress\nmetadata: {name: via-socks}\nspec: {sources: [{name: web}], ipAddresses: [127.67.0.1/32], ports: [{number: 8080}, {number: 5201}], gateway: socks}\n";

const DANTE: &str = "logoutput: @WORK@/danted.log\ninternal: 127.0.9.4 port = 1080\nexternal: 127.0.9.4\n\
socksmethod: none\nclientmethod: none\nuser.privileged: root\nuser.unprivileged: nobody\n\
client pass { from: 0.0.0.0/0 to: 0.0.0.0/0 }\nsocks pass { from: 0.0.0.0/0 to: 0.0.0.0/0 command: connect }\n";

const SQUID: &str =
    "http_port 127.0.9.2:3128\nhttp_access allow all\ntcp_outgoing_address 127.0.9.2\n\
pid_filename @WORK@/squid.pid\ncache_log @WORK@/squid-cache.log\naccess_log none\ncache deny all\n\
cache_mem 8 MB\nvisible_hostname egress-bench\ncoredump_dir @WORK@\nshutdown_lifetime 0 seconds\n";

const REDSOCKS: &str = "base { log_debug = off; log_info = off; log = stderr; daemon = off; redirector = iptables; }\n\
redsocks { local_ip = 127.0.0.1; local_port = 12345; ip = 127.0.9.4; port = 1080; type = socks5; }\n\
redsocks { local_ip = 127.0.0.1; local_port = 12346; ip = 127.0.9.2; port = 3128; type = http-connect; }\n";

const METHOD: &str = "## How it is measured\n\n\
`cargo xtask bench --gateway` (see `xtask/src/bench_gateway.rs`). Everything runs in one network \
namespace the bench creates; loopback addresses stand in for hosts. nginx (1 worker, access log off, \
keep-alive on) serves a small file on port 8080 of every address below; iperf3 listens on port 5201. \
`egress-agent gateway` listens on 127.0.8.1 (HTTP and SOCKS5) and dials out from 127.0.8.1.\n\n\
- `direct`: the client outside every workload, to 127.60.0.1 (the baseline).\n\
- `gateway-http2tunnel`: inside `web`, to 127.66.0.1, whose Egress names the gateway `h2` \
(`mode: http2tunnel`): the kernel redirects to the agent's proxy, which opens an HTTP/2 CONNECT \
stream on its one connection to the gateway, which dials nginx. *proxy cpu* is the gateway's \
(the agent's own share is the main bench's `egress-proxy`).\n\
- `gateway-socks5`: the same to 127.67.0.1 through the gateway's SOCKS5 listener.\n\
- `redsocks-dante` (peer): outside, to 127.68.0.1, which an iptables `nat OUTPUT REDIRECT` sends \
to redsocks, which tunnels it by SOCKS5 to danted (1.4, on 127.0.9.4), which dials nginx. \
*proxy cpu* is redsocks'.\n\
- `redsocks-squid` (peer): outside, to 127.69.0.1, the same REDIRECT to redsocks, then HTTP \
CONNECT to squid (127.0.9.2). *proxy cpu* is redsocks'.\n\n";

pub fn bench(root: &Path) -> anyhow::Result<()> {
    eprintln!("==> setup (scripts/setup.sh) and the release agent");
    run_in(root, &["bash", "scripts/setup.sh"])?;
    let agent = crate::bench_env::release_agent(root)?;
    ensure_packages(PACKAGES)?;
    let mut env = Env::new(&agent)?;
    eprintln!("==> gateway bench in network namespace {}", env.ns);
    let result = run(&mut env);
    let report = env.conclude(result)?;
    println!("{}", report::text(&report));
    let md = report::markdown(&report, true);
    // The shared renderer describes the main bench; put this bench's method in its place.
    let body = md.find("## Machine").map_or(md.as_str(), |i| &md[i..]);
    let md = format!("# egress gateway benchmark\n\n{METHOD}{body}");
    let out = root.join("target/bench");
    fs::create_dir_all(&out)?;
    fs::write(out.join("gateway.json"), report::json(&report))?;
    fs::write(out.join("gateway.md"), &md)?;
    fs::write(root.join("docs/benchmarks-gateway.md"), &md)?;
    eprintln!("wrote target/bench/gateway.{{json,md}} and docs/benchmarks-gateway.md");
    Ok(())
}

fn write(env: &Env, name: &str, text: &str) -> anyhow::Result<String> {
    let p = env.work.join(name);
    fs::write(&p, text.replace("@WORK@", &env.work.display().to_string()))?;
    Ok(p.display().to_string())
}

fn run(env: &mut Env) -> anyhow::Result<Report> {
    let work_dir = env.work.clone();
    fs::create_dir_all(work_dir.join("www"))?;
    fs::write(
        work_dir.join("www/index.html"),
        "<html><body>egress bench: a small page</body></html>\n",
    )?;
    // squid drops to its own user and writes its log in the work dir.
    fs::set_permissions(
        &work_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )?;
    let nginx = write(env, "gw-nginx.conf", NGINX)?;
    env.spawn("nginx", &["nginx", "-c", &nginx])?;
    env.wait_listen("nginx", "127.69.0.1:8080")?;
    env.spawn("iperf3", &["iperf3", "-s", "-p", "5201"])?;
    env.wait_listen("iperf3", "*:5201")?;

    let a = env.agent.display().to_string();
    let gw_cfg = write(env, "gateway.yaml", GATEWAY)?;
    let gateway = env.spawn(
        "gateway",
        &[
            &a,
            "gateway",
            "--config",
            &gw_cfg,
            "--metrics-addr",
            "127.0.0.1:15191",
        ],
    )?;
    env.wait_listen("gateway", "127.0.8.1:18080")?;
    let dante_cfg = write(env, "danted.conf", DANTE)?;
    env.spawn("danted", &["danted", "-f", &dante_cfg, "-N", "1"])?;
    env.wait_listen("danted", "127.0.9.4:1080")?;
    let squid_cfg = write(env, "squid.conf", SQUID)?;
    env.spawn("squid", &["squid", "-N", "-f", &squid_cfg])?;
    env.wait_listen("squid", "127.0.9.2:3128")?;
    let redsocks_cfg = write(env, "redsocks.conf", REDSOCKS)?;
    let redsocks = env.spawn("redsocks", &["redsocks", "-c", &redsocks_cfg])?;
    env.wait_listen("redsocks", "127.0.0.1:12346")?;
    // The peers' REDIRECTs; the gateways' own connections (from their outgoing addresses)
    // are left alone.
    for (dst, not_from, to) in [
        ("127.68.0.1", "127.0.9.4", "12345"),
        ("127.69.0.1", "127.0.9.2", "12346"),
    ] {
        env.ns_run(&[
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-d",
            dst,
            "!",
            "-s",
            not_from,
            "-p",
            "tcp",
            "-m",
            "multiport",
            "--dports",
            "8080,5201",
            "-j",
            "REDIRECT",
            "--to-ports",
            to,
        ])?;
    }

    let cfg_file = write(env, "policy.yaml", POLICY)?;
    env.start_agent(Path::new(&cfg_file), &[])?;

    let routes = [
        work::DIRECT,
        Route {
            name: "gateway-http2tunnel",
            host: "127.66.0.1",
            in_web: true,
            cpu_pid: Some(gateway),
        },
        Route {
            name: "gateway-socks5",
            host: "127.67.0.1",
            in_web: true,
            cpu_pid: Some(gateway),
        },
        Route {
            name: PEERS[0],
            host: "127.68.0.1",
            in_web: false,
            cpu_pid: Some(redsocks),
        },
        Route {
            name: PEERS[1],
            host: "127.69.0.1",
            in_web: false,
            cpu_pid: Some(redsocks),
        },
    ];
    for r in &routes {
        let url = format!("http://{}:8080/index.html", r.host);
        let page = work::client(env, r.in_web, &["curl", "-sSf", "--max-time", "5", &url])
            .with_context(|| format!("path {} does not work", r.name))?;
        anyhow::ensure!(
            page.contains("egress bench"),
            "path {} served something else: {page}",
            r.name
        );
    }
    let mk = |id, title: &str, unit| Table {
        id,
        title: title.to_string(),
        unit,
        baseline: Some("direct"),
        peers: PEERS.to_vec(),
        higher_is_better: true,
        rows: Row::named(routes.iter().map(|r| r.name)),
        note: None,
    };
    let secs = 3;
    let mut w1 = mk("W1", "keep-alive small HTTP (wrk -t1 -c50 -d3s)", "req/s");
    let mut w2 = mk(
        "W2",
        "new connection per request (wrk -t1 -c50 -d3s, Connection: close)",
        "req/s",
    );
    let mut w3 = mk("W3", "bulk (iperf3 -t 3 -P 1)", "Gb/s");
    for (table, kind) in [(&mut w1, 1), (&mut w2, 2), (&mut w3, 3)] {
        eprintln!("==> {}: {}", table.id, table.title);
        for rep in 0..REPS {
            for (i, r) in routes.iter().enumerate() {
                let s = match kind {
                    1 => work::wrk(env, r, secs, false),
                    2 => work::wrk(env, r, secs, true),
                    _ => work::iperf(env, r, secs),
                }
                .with_context(|| format!("{} on {} (run {})", table.id, r.name, rep + 1))?;
                eprintln!(
                    "    run {} {:<20} {:>12.2} {}  (load {:.2})",
                    rep + 1,
                    r.name,
                    s.value,
                    table.unit,
                    s.load
                );
                table.rows[i].samples.push(s);
            }
        }
    }

    let best_peer = |t: &Table| {
        PEERS
            .iter()
            .filter_map(|p| t.ratio(p))
            .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))))
    };
    let mut verdicts = Vec::new();
    for (t, min) in [(&w1, 0.35), (&w3, 0.6)] {
        let what = if t.id == "W1" { "keep-alive" } else { "bulk" };
        let peer = best_peer(t);
        let x = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}x"));
        for path in ["gateway-http2tunnel", "gateway-socks5"] {
            let r = t.ratio(path);
            verdicts.push(Verdict {
                target: format!("{what} {path} >= {min:.2}x direct"),
                measured: x(r),
                pass: r.map(|r| r >= min),
            });
            verdicts.push(Verdict {
                target: format!("{what} {path} above redsocks → dante/squid"),
                measured: format!("{} (best peer {})", x(r), x(peer)),
                pass: r.zip(peer).map(|(r, p)| r > p),
            });
        }
    }
    Ok(Report {
        mode: "gateway",
        machine: vec![
            (
                "nproc".into(),
                std::thread::available_parallelism()
                    .map(|n| n.to_string())
                    .unwrap_or_default(),
            ),
            (
                "load average at the end".into(),
                fs::read_to_string("/proc/loadavg")
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
            ),
        ],
        tables: vec![w1, w2, w3],
        verdicts,
        notes: vec![
            "the gateway and the agent share the 2 cores with nginx, iperf3 and the clients; \
             the peers run outside every workload (no eBPF hook on their path)"
                .into(),
        ],
    })
}
