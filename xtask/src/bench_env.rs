//! `cargo xtask bench`: running commands, the bench's network namespace and the cleanup.
//!
//! Everything the bench starts runs inside one network namespace it creates
//! (`egress-bench-PID`). Processes enter it with `nsenter --net=/run/netns/NS`, not
//! `ip netns exec`: the latter also unshares the mount namespace and remounts /sys, which hides
//! /sys/fs/bpf and the cgroup2 mount below /sys/fs/cgroup from the agent.
//!
//! The cleanup runs in a guard process (bash, in its own process group, ignoring SIGINT) that
//! waits for end-of-file on a pipe from this process. The pipe closes when the bench finishes,
//! fails, panics or is killed by Ctrl-C, so the cleanup always runs: it stops the PIDs the bench
//! started (SIGTERM, then SIGKILL after 10 s), runs `egress-agent uninstall`, deletes the
//! namespace and the temporary directory, and says what, if anything, is left behind.

use std::{
    fs,
    io::Write as _,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

const GUARD: &str = r#"
trap '' INT TERM HUP
cat >/dev/null
pids=$(tr "\n" " " <"$PIDS" 2>/dev/null)
alive() { for p in $pids; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
if alive; then
  echo "bench: cleanup: stopping pids $pids (SIGTERM)" >&2
  for p in $pids; do kill -TERM "$p" 2>/dev/null; done
  for i in $(seq 100); do alive || break; sleep 0.1; done
  if alive; then for p in $pids; do kill -KILL "$p" 2>/dev/null; done; sleep 0.2; fi
fi
"$AGENT" uninstall --pin-dir "$PIN" --cgroup-root "$CG" --state-file "$STATE" >"$WORK/uninstall.log" 2>&1 \
  || { echo "bench: cleanup: egress-agent uninstall failed:" >&2; cat "$WORK/uninstall.log" >&2; }
ip netns del "$NS" 2>/dev/null
rm -rf "$WORK"
left=""
for p in "$PIN" "$CG" "/run/netns/$NS" "$WORK"; do [ -e "$p" ] && left="$left $p"; done
if [ -n "$left" ]; then echo "bench: cleanup: LEFT BEHIND:$left" >&2; exit 1; fi
echo "bench: cleanup: done (pin dir, cgroup root, netns $NS and $WORK are gone)" >&2
"#;

/// The bench's namespace, temporary directory, agent paths and the processes it started.
pub struct Env {
    pub ns: String,
    pub work: PathBuf,
    pub agent: PathBuf,
    pub cg: PathBuf,
    pub pin: PathBuf,
    pub sock: PathBuf,
    pub state: PathBuf,
    children: Vec<(String, Child)>,
    guard: Option<(Child, ChildStdin)>,
}

impl Env {
    /// Creates the temporary directory, starts the cleanup guard, then the namespace.
    pub fn new(agent: &Path) -> anyhow::Result<Env> {
        let id = std::process::id();
        let name = format!("egress-bench-{id}");
        let mount = cgroup2_mount()?;
        let work = PathBuf::from(format!("/tmp/{name}"));
        fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
        let mut env = Env {
            ns: name.clone(),
            agent: agent.to_path_buf(),
            cg: mount.join(&name),
            pin: PathBuf::from(format!("/sys/fs/bpf/{name}")),
            sock: work.join("admin.sock"),
            state: work.join("agent.state"),
            work,
            children: Vec::new(),
            guard: None,
        };
        let mut guard = Command::new("bash")
            .args(["-c", GUARD])
            .env("PIDS", env.work.join("pids"))
            .env("AGENT", &env.agent)
            .env("PIN", &env.pin)
            .env("CG", &env.cg)
            .env("STATE", &env.state)
            .env("NS", &env.ns)
            .env("WORK", &env.work)
            .stdin(Stdio::piped())
            .process_group(0)
            .spawn()
            .context("cannot start the cleanup guard (bash)")?;
        let stdin = guard.stdin.take().expect("piped");
        env.guard = Some((guard, stdin));
        run_quiet(&["ip", "netns", "add", &env.ns])?;
        run_quiet(&["ip", "-n", &env.ns, "link", "set", "lo", "up"])?;
        // Per-namespace knobs: many short connections in W2 must not run out of ports.
        env.ns_run(&["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"])?;
        env.ns_run(&[
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_local_port_range=1024 65000",
        ])?;
        env.ns_run(&["sysctl", "-q", "-w", "net.core.somaxconn=8192"])?;
        Ok(env)
    }

    /// `nsenter --net=/run/netns/NS -- argv...`
    pub fn ns_command(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns))
            .arg("--")
            .args(argv);
        c
    }

    /// The argv that runs `argv` inside the workload `web`.
    pub fn in_web(&self, argv: &[&str]) -> Vec<String> {
        let mut v = vec![
            self.agent.display().to_string(),
            "exec".into(),
            "--workload".into(),
            "web".into(),
            "--cgroup-root".into(),
            self.cg.display().to_string(),
            "--".into(),
        ];
        v.extend(argv.iter().map(|s| s.to_string()));
        v
    }

    /// Runs `argv` in the namespace to completion; its stdout, or an error with its stderr.
    pub fn ns_run(&self, argv: &[&str]) -> anyhow::Result<String> {
        stdout_of(self.ns_command(argv), argv)
    }

    /// Starts a long-running process in the namespace (own process group, so Ctrl-C reaches
    /// only the guard's cleanup), its output in WORK/NAME.log; returns its PID.
    pub fn spawn(&mut self, name: &str, argv: &[&str]) -> anyhow::Result<u32> {
        let log = fs::File::create(self.log(name))?;
        let child = self
            .ns_command(argv)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start `{}`", argv.join(" ")))?;
        let pid = child.id();
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.work.join("pids"))?;
        writeln!(f, "{pid}")?;
        self.children.push((name.to_string(), child));
        Ok(pid)
    }

    /// The PID of the first process started under `name` (see [`Env::spawn`]).
    pub fn pid_of(&self, name: &str) -> Option<u32> {
        self.children
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.id())
    }

    /// `egress-agent run` on `config` with the bench's admin socket, cgroup root, pins and
    /// state, metrics on 127.0.0.1:15190.
    fn agent_argv(&self, config: &Path) -> Vec<String> {
        let p = |x: &Path| x.display().to_string();
        let mut v = vec![p(&self.agent), "--admin-socket".into(), p(&self.sock)];
        v.extend(["run".into(), "--config".into(), p(config)]);
        v.extend([
            "--cgroup-root".into(),
            p(&self.cg),
            "--pin-dir".into(),
            p(&self.pin),
        ]);
        v.extend(["--state-file".into(), p(&self.state)]);
        v.extend(["--metrics-addr".into(), "127.0.0.1:15190".into()]);
        v
    }

    /// Starts the agent (child `agent`) on `config`, with `env` (`NAME=VALUE`) if any, and
    /// waits until it is ready; its PID.
    pub fn start_agent(&mut self, config: &Path, env: &[&str]) -> anyhow::Result<u32> {
        let argv = self.agent_argv(config);
        let mut all: Vec<&str> = Vec::new();
        if !env.is_empty() {
            all.push("env");
            all.extend_from_slice(env);
        }
        all.extend(argv.iter().map(String::as_str));
        let pid = self.spawn("agent", &all)?;
        self.wait_log("agent", &[" ready", "\"ready\""], 60)?;
        Ok(pid)
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.work.join(format!("{name}.log"))
    }

    /// Fails when the child `name` has exited, showing the end of its log.
    fn check_alive(&mut self, name: &str) -> anyhow::Result<()> {
        let log = self.log(name);
        if let Some((_, c)) = self.children.iter_mut().find(|(n, _)| n == name) {
            if let Some(status) = c.try_wait()? {
                let text = fs::read_to_string(&log).unwrap_or_default();
                // The last 15 lines, each cut to 300 characters (verifier logs are huge).
                let tail: Vec<String> = text
                    .lines()
                    .rev()
                    .take(15)
                    .map(|l| match l.char_indices().nth(300) {
                        Some((i, _)) => format!("{} [...]", &l[..i]),
                        None => l.to_string(),
                    })
                    .collect();
                let tail: Vec<String> = tail.into_iter().rev().collect();
                bail!(
                    "{name} exited ({status}); its log:\n  | {}",
                    tail.join("\n  | ")
                );
            }
        }
        Ok(())
    }

    /// Waits until `name` listens on TCP `addr` (as `ss -ltn` shows it in the namespace).
    pub fn wait_listen(&mut self, name: &str, addr: &str) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            self.check_alive(name)?;
            let out = self.ns_run(&["ss", "-Hltn"])?;
            if out.split_whitespace().any(|w| w == addr) {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(15) {
                bail!("{name} does not listen on {addr} after 15 s");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the log of `name` contains one of `needles`.
    pub fn wait_log(&mut self, name: &str, needles: &[&str], secs: u64) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let text = fs::read_to_string(self.log(name)).unwrap_or_default();
            if needles.iter().any(|n| text.contains(n)) {
                return Ok(());
            }
            self.check_alive(name)?;
            if start.elapsed() > Duration::from_secs(secs) {
                bail!("{name} was not ready after {secs} s");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the child `name` (SIGTERM, SIGKILL after 10 s) and forgets it.
    pub fn stop(&mut self, name: &str) -> anyhow::Result<()> {
        let Some(i) = self.children.iter().position(|(n, _)| n == name) else {
            return Ok(());
        };
        let (_, mut child) = self.children.remove(i);
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let start = Instant::now();
        while child.try_wait()?.is_none() {
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Stops every process the bench started (the agent last, SIGTERM then wait), then lets
    /// the guard uninstall and remove the rest. Fails if anything is left behind.
    /// [`Env::finish`] after a run that gave `result`: the run's error first, then the
    /// cleanup's.
    pub fn conclude<T>(&mut self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        let cleanup = self.finish();
        let r = result?;
        cleanup?;
        Ok(r)
    }

    pub fn finish(&mut self) -> anyhow::Result<()> {
        let mut children = std::mem::take(&mut self.children);
        children.sort_by_key(|(n, _)| n == "agent");
        for (name, child) in &mut children {
            if child.try_wait()?.is_none() {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
            let start = Instant::now();
            while child.try_wait()?.is_none() {
                if start.elapsed() > Duration::from_secs(10) {
                    eprintln!("bench: {name} did not stop within 10 s: SIGKILL");
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        let Some((mut guard, stdin)) = self.guard.take() else {
            return Ok(());
        };
        drop(stdin);
        let status = guard.wait()?;
        let mut left = Vec::new();
        for p in [&self.pin, &self.cg] {
            if p.exists() {
                left.push(p.display().to_string());
            }
        }
        if let Ok(rd) = fs::read_dir("/sys/fs/bpf") {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                // A bench that still runs beside this one (its PID is in the name) is not
                // left behind.
                let running = name
                    .strip_prefix("egress-bench-")
                    .is_some_and(|pid| Path::new("/proc").join(pid).exists());
                if name.starts_with("egress-bench-") && !running {
                    left.push(e.path().display().to_string());
                }
            }
        }
        if !status.success() || !left.is_empty() {
            bail!("cleanup left something behind: {left:?} (guard {status})");
        }
        Ok(())
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.guard.is_some() {
            let _ = self.finish();
        }
    }
}

/// Builds the release agent; its path.
pub fn release_agent(root: &Path) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let argv = [
        &cargo,
        "build",
        "--release",
        "--quiet",
        "-p",
        "egress-agent",
    ];
    run_in(root, &argv)?;
    Ok(root.join("target/release/egress-agent"))
}

/// Where cgroup2 is mounted, from /proc/mounts.
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| PathBuf::from(f[1]))
        .context("no cgroup2 filesystem is mounted (see /proc/mounts)")
}

/// Runs a command on the host (not in the namespace), failing on a non-zero status.
pub fn run_quiet(argv: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]);
    stdout_of(cmd, argv)
}

/// Runs `cmd` (which is `argv`) to completion with no stdin; its stdout, or an error that
/// names the command and carries its stderr.
fn stdout_of(mut cmd: Command, argv: &[&str]) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{}`", argv.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command in `dir` with inherited output, failing on a non-zero status.
pub fn run_in(dir: &Path, argv: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(argv[0])
        .args(&argv[1..])
        .current_dir(dir)
        .status()
        .with_context(|| format!("cannot start `{}`", argv.join(" ")))?;
    if !status.success() {
        bail!("`{}` failed ({status})", argv.join(" "));
    }
    Ok(())
}

/// Installs the peers' Debian packages that are missing, starting no daemon machine-wide
/// (a temporary /usr/sbin/policy-rc.d exiting 101, unless one already exists).
pub fn ensure_packages(pkgs: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| {
            Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| !String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("==> installing {}", missing.join(" "));
    let prc = Path::new("/usr/sbin/policy-rc.d");
    let own = !prc.exists();
    if own {
        fs::write(prc, "#!/bin/sh\nexit 101\n")?;
        run_quiet(&["chmod", "+x", "/usr/sbin/policy-rc.d"])?;
    }
    let install = || -> anyhow::Result<()> {
        let mut args = vec![
            "env",
            "DEBIAN_FRONTEND=noninteractive",
            "apt-get",
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
        ];
        args.extend(&missing);
        if run_quiet(&args).is_err() {
            run_quiet(&[
                "env",
                "DEBIAN_FRONTEND=noninteractive",
                "apt-get",
                "update",
                "-qq",
            ])?;
            run_quiet(&args)?;
        }
        Ok(())
    };
    let r = install();
    if own {
        let _ = fs::remove_file(prc);
    }
    r
}
