//! `cargo xtask bench`: the workloads (wrk, iperf3, connbench, policy apply), their parsers,
//! and the per-process CPU and load readings around them.

use std::{fmt::Write as _, fs, path::Path, time::Instant};

use anyhow::{bail, Context as _};

pub use crate::bench_cpu::clk_tck;
use crate::{bench_cpu::CpuSnap, bench_env::Env, bench_report::Sample};

/// A way from the client to the server.
pub struct Route {
    pub name: &'static str,
    /// The address the client dials.
    pub host: &'static str,
    /// The client runs inside the workload `web`.
    pub in_web: bool,
    /// The process whose CPU time is the cost of the path (the agent, haproxy).
    pub cpu_pid: Option<u32>,
}

/// The client outside every workload straight to nginx.
pub const DIRECT: Route = Route {
    name: "direct",
    host: "127.60.0.1",
    in_web: false,
    cpu_pid: None,
};

/// The client inside `web` to the same nginx, allowed directly by the bench's policy.
pub const ALLOWED: Route = Route {
    name: "egress-allow",
    host: "127.60.0.1",
    in_web: true,
    cpu_pid: None,
};

/// Runs `argv` in the namespace, inside `web` when `in_web`; returns stdout.
pub fn client(env: &Env, in_web: bool, argv: &[&str]) -> anyhow::Result<String> {
    if in_web {
        let v = env.in_web(argv);
        let v: Vec<&str> = v.iter().map(String::as_str).collect();
        env.ns_run(&v)
    } else {
        env.ns_run(argv)
    }
}

/// Fails unless every route serves the bench's page (before anything is measured).
pub fn check_routes(env: &Env, routes: &[Route]) -> anyhow::Result<()> {
    for r in routes {
        let url = format!("http://{}:8080/index.html", r.host);
        let page = client(env, r.in_web, &["curl", "-sSf", "--max-time", "5", &url])
            .with_context(|| format!("path {} does not work", r.name))?;
        anyhow::ensure!(
            page.contains("egress bench"),
            "path {} served something else: {page}",
            r.name
        );
    }
    Ok(())
}

/// utime + stime of a process, in clock ticks (/proc/PID/stat fields 14 and 15).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): field N is f[N - 3].
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// The first child of `pid` (nginx's worker under its master), waiting up to 5 s for it.
pub fn child_pid(pid: u32) -> Option<u32> {
    for _ in 0..50 {
        let c = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
        if let Some(p) = c.split_whitespace().next().and_then(|p| p.parse().ok()) {
            return Some(p);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    None
}

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The 1-minute load average and procs_running, read before each point.
pub fn load() -> (f64, u32) {
    let l = fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let r = fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("procs_running "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0);
    (l, r)
}

/// A sample starting now: the load, and the CPU snapshot [`close_sample`] measures from.
pub fn new_sample() -> Sample {
    let (load, procs_running) = load();
    Sample {
        load,
        procs_running,
        since: CpuSnap::now(),
        ..Sample::default()
    }
}

/// Ends the point `s` started with [`new_sample`]: the cores other processes kept busy since.
pub fn close_sample(s: &mut Sample) {
    if let (Some(a), Some(b)) = (&s.since, CpuSnap::now()) {
        s.others = b.others_since(a);
    }
}

/// A wrk duration ("171.00us", "1.20ms", "2.00s") in microseconds.
fn wrk_duration_us(s: &str) -> Option<f64> {
    let (num, mul) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    Some(num.parse::<f64>().ok()? * mul)
}

/// wrk's output: requests/s (value), p50 and p99 (µs), errors; and the number of requests.
pub fn parse_wrk(out: &str) -> anyhow::Result<(Sample, u64)> {
    let mut rps = None;
    let (mut p50, mut p99, mut reqs) = (None, None, 0);
    let mut errors = Vec::new();
    for line in out.lines() {
        let t = line.trim();
        let f: Vec<&str> = t.split_whitespace().collect();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            rps = v.trim().parse::<f64>().ok();
        } else if f.len() == 2 && f[0] == "50%" {
            p50 = wrk_duration_us(f[1]);
        } else if f.len() == 2 && f[0] == "99%" {
            p99 = wrk_duration_us(f[1]);
        } else if f.len() > 2 && f[1] == "requests" && f[2] == "in" {
            reqs = f[0].parse().unwrap_or(0);
        } else if t.starts_with("Socket errors:") || t.starts_with("Non-2xx") {
            errors.push(t.to_string());
        }
    }
    let rps = rps.with_context(|| format!("no Requests/sec in wrk's output:\n{out}"))?;
    let s = Sample {
        value: rps,
        p50_us: p50,
        p99_us: p99,
        errors: (!errors.is_empty()).then(|| errors.join(", ")),
        ..Sample::default()
    };
    Ok((s, reqs))
}

/// W1/W2: wrk against `route`, with the CPU the path's process spent per request.
pub fn wrk(env: &Env, route: &Route, secs: u32, close: bool) -> anyhow::Result<Sample> {
    let headers: &[&str] = if close { &["Connection: close"] } else { &[] };
    wrk_with(env, route, secs, headers)
}

/// wrk against `route` with extra request `headers`, and the path's CPU per request.
pub fn wrk_with(env: &Env, route: &Route, secs: u32, headers: &[&str]) -> anyhow::Result<Sample> {
    wrk_on(env, route, secs, headers, &[])
}

/// [`wrk_with`], the client's argv after `prefix` (e.g. `taskset -c 0`).
pub fn wrk_on(
    env: &Env,
    route: &Route,
    secs: u32,
    headers: &[&str],
    prefix: &[&str],
) -> anyhow::Result<Sample> {
    let mut s = new_sample();
    let url = format!("http://{}:8080/index.html", route.host);
    let d = format!("{secs}s");
    let mut argv = prefix.to_vec();
    argv.extend(["wrk", "-t1", "-c50", "-d", &d, "--latency"]);
    for h in headers {
        argv.extend(["-H", h]);
    }
    argv.push(&url);
    let before = route.cpu_pid.and_then(cpu_ticks);
    let out = client(env, route.in_web, &argv)?;
    let after = route.cpu_pid.and_then(cpu_ticks);
    let (parsed, reqs) = parse_wrk(&out)?;
    s = Sample {
        load: s.load,
        procs_running: s.procs_running,
        since: s.since,
        ..parsed
    };
    close_sample(&mut s);
    if let (Some(b), Some(a)) = (before, after) {
        if reqs > 0 {
            s.cpu_us_per_req = Some((a - b) as f64 * 1e6 / clk_tck() / reqs as f64);
        }
    }
    Ok(s)
}

/// W5: the result of a churn soak on one path.
pub struct Churn {
    /// One sample per second (wrk -d1s, Connection: close), in order.
    pub per_sec: Vec<Sample>,
    /// The namespace's TcpRetransSegs delta over the soak.
    pub retrans: Option<u64>,
    /// Sockets in TIME_WAIT in the namespace at the start and at the end.
    pub time_wait: (Option<usize>, Option<usize>),
    /// nf_conntrack_count in the namespace at the end (it tracks every connection, as it has
    /// nat rules; a full table drops SYNs).
    pub conntrack: Option<u64>,
}

/// Tcp RetransSegs from /proc/net/snmp (a "Tcp:" header line, then a "Tcp:" values line).
pub fn parse_retrans(snmp: &str) -> Option<u64> {
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let head: Vec<&str> = tcp.next()?.split_whitespace().collect();
    let vals: Vec<&str> = tcp.next()?.split_whitespace().collect();
    let i = head.iter().position(|h| *h == "RetransSegs")?;
    vals.get(i)?.parse().ok()
}

/// The last-third mean over the first-third mean of `v` (None with fewer than 3 values).
pub fn decay(v: &[f64]) -> Option<f64> {
    let k = v.len() / 3;
    if k == 0 {
        return None;
    }
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let first = mean(&v[..k]);
    (first > 0.0).then(|| mean(&v[v.len() - k..]) / first)
}

/// W5: `secs` runs of `wrk -d1s -H 'Connection: close'` back to back against `route`.
pub fn churn(env: &Env, route: &Route, secs: u32) -> anyhow::Result<Churn> {
    let retrans = || {
        env.ns_run(&["cat", "/proc/net/snmp"])
            .ok()
            .and_then(|s| parse_retrans(&s))
    };
    let tw = || {
        env.ns_run(&["ss", "-Htan", "state", "time-wait"])
            .ok()
            .map(|s| s.lines().filter(|l| !l.trim().is_empty()).count())
    };
    let tw_start = tw();
    let before = retrans();
    let mut per_sec = Vec::new();
    for i in 0..secs {
        let s = wrk(env, route, 1, true)
            .with_context(|| format!("second {} of {}", i + 1, route.name))?;
        per_sec.push(s);
    }
    let after = retrans();
    let time_wait = (tw_start, tw());
    let conntrack = env
        .ns_run(&["cat", "/proc/sys/net/netfilter/nf_conntrack_count"])
        .ok()
        .and_then(|s| s.trim().parse().ok());
    Ok(Churn {
        per_sec,
        retrans: before.zip(after).map(|(b, a)| a.saturating_sub(b)),
        time_wait,
        conntrack,
    })
}

/// The receiver's bits per second from `iperf3 -J`: end.sum_received.bits_per_second.
pub fn parse_iperf_gbps(json: &str) -> anyhow::Result<f64> {
    // The last sum_received is end.sum_received (the summary follows the intervals).
    let sum = json
        .rfind("\"sum_received\"")
        .with_context(|| format!("no sum_received in iperf3's JSON:\n{json}"))?;
    let rest = &json[sum..];
    let key = "\"bits_per_second\":";
    let at = rest.find(key).context("no bits_per_second")? + key.len();
    let num: String = rest[at..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'))
        .collect();
    Ok(num.parse::<f64>()? / 1e9)
}

/// W3: iperf3 bulk transfer to `route` port 5201, in Gb/s.
pub fn iperf(env: &Env, route: &Route, secs: u32) -> anyhow::Result<Sample> {
    iperf_on(env, route, secs, None)
}

/// [`iperf`], client and server on the CPUs `affinity` names (iperf3 `-A client,server`).
pub fn iperf_on(
    env: &Env,
    route: &Route,
    secs: u32,
    affinity: Option<&str>,
) -> anyhow::Result<Sample> {
    iperf_port_on(env, route, "5201", secs, affinity)
}

/// [`iperf_on`] to the iperf3 server on `port`.
pub fn iperf_port_on(
    env: &Env,
    route: &Route,
    port: &str,
    secs: u32,
    affinity: Option<&str>,
) -> anyhow::Result<Sample> {
    let mut s = new_sample();
    let t = secs.to_string();
    let mut argv = vec![
        "iperf3", "-c", route.host, "-p", port, "-t", &t, "-P", "1", "-J",
    ];
    if let Some(a) = affinity {
        argv.extend(["-A", a]);
    }
    let out = client(env, route.in_web, &argv)?;
    s.value = parse_iperf_gbps(&out)?;
    close_sample(&mut s);
    Ok(s)
}

/// W4/W7: the output of connbench: (ns per iteration, iterations per second, ok, eperm).
pub fn connbench(
    env: &Env,
    bin: &Path,
    in_web: bool,
    proto: &str,
    addr: &str,
    port: &str,
    n: u64,
) -> anyhow::Result<(Sample, f64, u64, u64)> {
    let mut s = new_sample();
    let bin = bin.display().to_string();
    let n = n.to_string();
    let out = client(env, in_web, &[&bin, proto, addr, port, &n])?;
    let get = |k: &str| -> anyhow::Result<f64> {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
            .with_context(|| format!("no {k} in connbench's output: {out}"))?
            .parse::<f64>()
            .map_err(Into::into)
    };
    close_sample(&mut s);
    s.value = get("ns_per_iter")?;
    let per_sec = get("per_sec")?;
    let (ok, eperm, other) = (get("ok")? as u64, get("eperm")? as u64, get("other")?);
    if other > 0.0 {
        s.errors = Some(format!(
            "{other} connects failed with an errno other than EPERM"
        ));
    }
    Ok((s, per_sec, ok, eperm))
}

/// What the agent's log says it refused or failed so far (why connections were lost).
pub fn agent_refusals(env: &Env) -> String {
    let log = std::fs::read_to_string(env.log("agent")).unwrap_or_default();
    let count = |s: &str| log.matches(s).count();
    format!(
        "agent log so far: {} not redirected, {} over the limit, {} upstream unreachable, {} accept errors",
        count("did not redirect"),
        count("connection limit reached"),
        count("could not reach the original destination"),
        count("proxy accept failed"),
    )
}

/// Compiles scripts/bench/connbench.c into `work`; the binary's path.
pub fn build_connbench(root: &Path, work: &Path) -> anyhow::Result<std::path::PathBuf> {
    build_c(root, work, "connbench")
}

/// Compiles scripts/bench/NAME.c into `work/NAME`; the binary's path.
pub fn build_c(root: &Path, work: &Path, name: &str) -> anyhow::Result<std::path::PathBuf> {
    let bin = work.join(name);
    let src = root.join(format!("scripts/bench/{name}.c"));
    crate::bench_env::run_quiet(&[
        "gcc",
        "-O2",
        "-o",
        &bin.display().to_string(),
        &src.display().to_string(),
    ])?;
    Ok(bin)
}

/// The bench's policy: `web`, an allow for nginx/iperf3/the burst server (2222) on
/// 127.60.0.1, the same ports via proxy on 127.61.0.1, 127.70.0.1 judged by host (W1h), UDP
/// 9999 allowed on 127.60.0.1 (for connbench) and `extra` other /32 rules in `bulk-rules`
/// (10.x.y.z, offset by `salt` so re-applies change every entry).
pub fn policy(extra: u32, salt: u32) -> String {
    let mut s = String::from(
        "kind: MeshConfig\nmetadata: {name: egress}\nspec:\n  traffic: {enableEgress: false}\n  \
         proxy: {port: 15001, maxConnections: 65536}\n---\n\
         kind: Workload\nmetadata: {name: web, namespace: default}\n---\n\
         kind: Egress\nmetadata: {name: allow-nginx, namespace: default}\nspec:\n  \
         sources: [{kind: Workload, name: web}]\n  ipAddresses: [127.60.0.1/32]\n  \
         ports: [{number: 8080, protocol: tcp}, {number: 5201, protocol: tcp}, {number: 9999, protocol: udp}, {number: 2222, protocol: tcp}]\n---\n\
         kind: Egress\nmetadata: {name: nginx-via-proxy, namespace: default}\nspec:\n  \
         sources: [{kind: Workload, name: web}]\n  ipAddresses: [127.61.0.1/32]\n  \
         ports: [{number: 8080, protocol: tcp}, {number: 5201, protocol: tcp}, {number: 2222, protocol: tcp}]\n  via: proxy\n---\n\
         kind: Egress\nmetadata: {name: spread, namespace: default}\nspec:\n  \
         sources: [{kind: Workload, name: web}]\n  ipAddresses: [127.60.0.0/16]\n  \
         ports: [{number: 9999, protocol: udp}]\n",
    );
    // W1h: 127.70.0.1 judged by host, request by request (named, so the proxy may dial it).
    s.push_str(
        "---\nkind: Egress\nmetadata: {name: nginx-by-host, namespace: default}\nspec:\n  \
         sources: [{kind: Workload, name: web}]\n  hosts: [bench.example]\n  \
         ipAddresses: [127.70.0.1/32]\n  ports: [{number: 8080, protocol: tcp}]\n",
    );
    if extra > 0 {
        s.push_str(
            "---\nkind: Egress\nmetadata: {name: bulk-rules, namespace: default}\nspec:\n  \
             sources: [{kind: Workload, name: web}]\n  ports: [{number: 443, protocol: tcp}]\n  \
             ipAddresses: [",
        );
        for i in 0..extra {
            let x = i + salt;
            if i > 0 {
                s.push_str(", ");
            }
            let _ = write!(
                s,
                "10.{}.{}.{}/32",
                (x >> 16) & 255,
                (x >> 8) & 255,
                x & 255
            );
        }
        s.push_str("]\n");
    }
    s
}

/// W8: seconds `policy apply -f FILE` takes with `extra` rules.
pub fn apply(env: &Env, extra: u32, salt: u32) -> anyhow::Result<Sample> {
    let file = env.work.join(format!("policy-{extra}.yaml"));
    fs::write(&file, policy(extra, salt))?;
    let mut s = new_sample();
    let agent = env.agent.display().to_string();
    let sock = env.sock.display().to_string();
    let f = file.display().to_string();
    let t = Instant::now();
    let out = env.ns_run(&[&agent, "--admin-socket", &sock, "policy", "apply", "-f", &f]);
    s.value = t.elapsed().as_secs_f64();
    close_sample(&mut s);
    if let Err(e) = out {
        bail!("policy apply of {extra} rules failed: {e:#}");
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 3s test @ http://127.60.0.1:8080/index.html
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.02ms  300.00us   5.00ms   80.00%
    Req/Sec    48.00k     2.00k   50.00k    70.00%
  Latency Distribution
     50%  171.00us
     75%    1.00ms
     90%    1.10ms
     99%    1.20ms
  144000 requests in 3.00s, 40.00MB read
  Socket errors: connect 0, read 12, write 0, timeout 0
Requests/sec:  48000.50
Transfer/sec:     13.33MB
";

    #[test]
    fn wrk_output() {
        let (s, reqs) = parse_wrk(WRK).unwrap();
        assert_eq!(s.value, 48000.5);
        assert_eq!(s.p50_us, Some(171.0));
        assert_eq!(s.p99_us, Some(1200.0));
        assert_eq!(reqs, 144000);
        assert!(s.errors.unwrap().contains("read 12"));
    }

    #[test]
    fn iperf_json() {
        let j = "{\"intervals\": [{\"sum\": {\"end\": 1.0, \"bits_per_second\": 1}}], \"end\": {\"sum_sent\": {\"bits_per_second\": 3.5e10}, \"sum_received\": {\"end\":\t1.00007, \"bits_per_second\":\t34000000000.5}}}";
        assert!((parse_iperf_gbps(j).unwrap() - 34.0).abs() < 1e-6);
    }

    #[test]
    fn snmp_retrans() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\nTcp: RtoAlgorithm ActiveOpens RetransSegs InErrs\nTcp: 1 200 17 0\nUdp: InDatagrams\nUdp: 5\n";
        assert_eq!(parse_retrans(snmp), Some(17));
    }

    #[test]
    fn decay_ratio() {
        let v = [10.0, 10.0, 10.0, 9.0, 8.0, 8.0];
        assert!((decay(&v).unwrap() - 0.8).abs() < 1e-9);
        assert_eq!(decay(&[1.0, 2.0]), None);
    }

    #[test]
    fn cpu_fields() {
        // Fields 14 and 15 after a comm with spaces and parentheses.
        let stat = "42 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 111 222 0 0";
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        assert_eq!((f[11], f[12]), ("111", "222"));
    }
}
