//! A scrape storm on `/metrics` (50 concurrent scrapers for 10 s) does not slow `policy apply`
//! beyond twice its quiet time, and the agent stays within the DaemonSet's memory limit: the
//! scrapes read a snapshot of the kernel's state that a thread of its own takes, without the
//! datapath lock policy changes need, and the endpoint serves a few connections at a time.

use std::{
    io::{Read, Write},
    net::TcpStream,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use crate::harness::{privileged, temp_dir, Agent};

const WORKLOADS: usize = 40;
const SCRAPERS: usize = 50;
const STORM: Duration = Duration::from_secs(10);
/// `resources.limits.memory` of deploy/kubernetes/base/daemonset.yaml.
const MEMORY_LIMIT: u64 = 256 << 20;

/// A policy with WORKLOADS workloads, each allowed to one /32 on `port`.
fn policy(port: u16) -> String {
    let mut p = String::from("kind: MeshConfig\nmetadata: {name: egress}\nspec: {traffic: {enableEgress: false}, proxy: {port: {proxy_port}}}\n");
    for i in 0..WORKLOADS {
        p += &format!("---\nkind: Workload\nmetadata: {{name: w{i}, namespace: storm}}\n---\nkind: Egress\nmetadata: {{name: e{i}, namespace: storm}}\nspec: {{sources: [{{name: w{i}}}], ipAddresses: [127.52.{}.{}/32], ports: [{{number: {port}}}]}}\n", i / 200, i % 200 + 1);
    }
    p
}

/// Wall time of one `egress-agent policy apply` that changes the policy.
fn apply(agent: &Agent, file: &std::path::Path, port: u16) -> Duration {
    std::fs::write(
        file,
        policy(port).replace("{proxy_port}", &agent.proxy_port.to_string()),
    )
    .unwrap();
    let t = Instant::now();
    let out = agent.cli_ok(&["policy", "apply", "-f", file.to_str().unwrap()]);
    let took = t.elapsed();
    assert!(out.contains("generation"), "{out}");
    took
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

#[test]
fn scrape_storm_does_not_slow_policy_changes() {
    if !privileged() {
        return;
    }
    let mut agent = Agent::new(&policy(1000));
    agent.spawn();
    let dir = temp_dir("storm");
    let file = dir.join("policy.yaml");
    let pid = agent.pid().unwrap();
    let mut port = 1000;
    let mut next = || {
        port += 1;
        port
    };
    apply(&agent, &file, next()); // warm up

    // Quiet and storm phases alternate (5 rounds, 2 s of storm each: 10 s in all), so that
    // the machine's other load weighs on both alike.
    let (stop, storming) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let (scrapes, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let metrics_port = agent.metrics_port;
    let scrapers: Vec<_> = (0..SCRAPERS)
        .map(|_| {
            let (stop, storming) = (stop.clone(), storming.clone());
            let (scrapes, failed) = (scrapes.clone(), failed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if !storming.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    let ok = TcpStream::connect(("127.0.0.1", metrics_port))
                        .and_then(|mut s| {
                            s.set_read_timeout(Some(Duration::from_secs(15)))?;
                            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
                            let mut body = String::new();
                            s.read_to_string(&mut body)?;
                            Ok(body.contains("egress_policy_generation"))
                        })
                        .unwrap_or(false);
                    let counter = if ok { &scrapes } else { &failed };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let mut quiet = Vec::new();
    let mut storm = Vec::new();
    let mut peak = rss(pid);
    for _ in 0..STORM.as_secs() / 2 {
        storming.store(false, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(300));
        for _ in 0..4 {
            quiet.push(apply(&agent, &file, next()));
        }
        storming.store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(300));
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(2) {
            storm.push(apply(&agent, &file, next()));
            peak = peak.max(rss(pid));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for s in scrapers {
        s.join().unwrap();
    }
    let (q, s) = (median(quiet.clone()), median(storm.clone()));
    let ms = |v: &[Duration]| {
        let mut v: Vec<u128> = v.iter().map(|d| d.as_millis()).collect();
        v.sort();
        format!(
            "min {} median {} max {} (n={})",
            v[0],
            v[v.len() / 2],
            v[v.len() - 1],
            v.len()
        )
    };
    eprintln!(
        "policy apply, {WORKLOADS} workloads: quiet {} ms; during {SCRAPERS} scrapers {} ms; {} scrapes served, {} failed; agent RSS peak {} MiB",
        ms(&quiet),
        ms(&storm),
        scrapes.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        peak >> 20
    );
    assert!(
        s <= q * 2,
        "policy apply took {s:?} (median) during the storm, {q:?} when quiet"
    );
    assert!(scrapes.load(Ordering::Relaxed) > 0, "no scrape was served");
    assert!(peak < MEMORY_LIMIT, "agent RSS {peak} bytes");
    // Silent clients hold connections but not the endpoint: the probes are still answered
    // while 60 of them are open, and each is closed after 2 s.
    let silent: Vec<TcpStream> = (0..60)
        .map(|_| TcpStream::connect(("127.0.0.1", metrics_port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    assert_eq!(agent.http_get("/readyz").0, "HTTP/1.1 200 OK");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    for mut s in silent {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(
            s.read(&mut buf).unwrap_or(1),
            0,
            "a silent client is closed"
        );
    }
    drop(agent);
    let _ = std::fs::remove_dir_all(dir);
}
