//! The local admin API the CLI talks to: one JSON request per line on a unix socket that only
//! root can open (mode 0600), answered with one JSON line (`flows --follow`: a stream of them).
//! Who asked is taken from the socket's peer credentials and logged with every change.

use std::{os::unix::fs::PermissionsExt, path::Path, sync::Arc};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::warn;

use super::protocol::{parse_destination, EgressRow, Request, Response, Status, WorkloadStatus};
use crate::{
    control::{Applied, Control, ControlError},
    policy::ObjectRef,
    telemetry::flows::Hub,
};

/// Longest request line accepted (a policy file travels inside one).
const MAX_REQUEST: usize = 64 * 1024 * 1024;

impl From<Result<Applied, ControlError>> for Response {
    fn from(r: Result<Applied, ControlError>) -> Self {
        match r {
            Ok(a) => Response::ok(a),
            Err(e) => Response::err(&e, e.is_invalid()),
        }
    }
}

/// Binds the admin socket: root-only directory and socket. A live socket means another agent
/// runs with it: refused. A stale one (nobody answers) is replaced.
pub async fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            anyhow::bail!(
                "{}: another egress-agent is serving this admin socket",
                path.display()
            );
        }
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

pub async fn serve(
    listener: UnixListener,
    control: Arc<Control>,
    hub: Arc<Hub>,
    programs: Vec<String>,
) {
    let programs = Arc::new(programs);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (control, hub, programs) = (control.clone(), hub.clone(), programs.clone());
        tokio::spawn(async move {
            if let Err(e) = handle(stream, control, hub, programs).await {
                warn!(error = %e, "admin request failed");
            }
        });
    }
}

fn who(stream: &UnixStream) -> String {
    match stream.peer_cred() {
        Ok(c) => {
            let pid = c.pid().unwrap_or(0);
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            format!("uid {} pid {pid} ({})", c.uid(), comm.trim())
        }
        Err(_) => "unknown".into(),
    }
}

async fn handle(
    stream: UnixStream,
    control: Arc<Control>,
    hub: Arc<Hub>,
    programs: Arc<Vec<String>>,
) -> std::io::Result<()> {
    let who = who(&stream);
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut r = BufReader::new(tokio::io::AsyncReadExt::take(r, MAX_REQUEST as u64));
    r.read_line(&mut line).await?;
    let arrived = std::time::Instant::now();
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => return reply(&mut w, &Response::err(format!("bad request: {e}"), true)).await,
    };
    let resp = match req {
        Request::Flows { follow } => {
            // Subscribe first, so nothing falls between the recent ones and the stream.
            let mut rx = hub.subscribe();
            for f in hub.recent() {
                reply(&mut w, &Response::ok(f)).await?;
            }
            if !follow {
                return Ok(());
            }
            loop {
                match rx.recv().await {
                    Ok(f) => reply(&mut w, &Response::ok(f)).await?,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        reply(
                            &mut w,
                            &Response::err(format!("{n} flows dropped: reader too slow"), false),
                        )
                        .await?
                    }
                    Err(_) => return Ok(()),
                }
            }
        }
        req => {
            let c = control.clone();
            let who2 = who.clone();
            tokio::task::spawn_blocking(move || dispatch(&c, &hub, req, &who2, &programs, arrived))
                .await
                .unwrap_or_else(|e| Response::err(format!("internal error: {e}"), false))
        }
    };
    reply(&mut w, &resp).await
}

async fn reply(w: &mut tokio::net::unix::OwnedWriteHalf, resp: &Response) -> std::io::Result<()> {
    let mut s = serde_json::to_string(resp).unwrap_or_else(|_| "{}".into());
    s.push('\n');
    w.write_all(s.as_bytes()).await
}

fn dispatch(
    c: &Control,
    hub: &Hub,
    req: Request,
    who: &str,
    programs: &[String],
    arrived: std::time::Instant,
) -> Response {
    match req {
        Request::History { since_ms } => Response::ok(hub.history.since(since_ms)),
        Request::Preview {
            file,
            text,
            replace,
            kubernetes,
            workload,
            since_ms,
        } => {
            let candidate = c.candidate(&text, &file, replace, kubernetes);
            super::preview::serve(c, &hub.history, candidate, &file, workload, since_ms)
        }
        Request::Status => Response::ok(status(c, programs)),
        Request::SetEgress { enable } => c.set_enable_egress(enable, who, arrived).into(),
        Request::Apply { file, text } => {
            let t0 = std::time::Instant::now();
            let r = c.apply(&text, &file, who);
            tracing::debug!(file, ms = t0.elapsed().as_millis() as u64, "apply request");
            r.into()
        }
        Request::Delete { name } => match name.parse::<ObjectRef>() {
            Ok(id) => c.delete(&id, who).into(),
            Err(e) => Response::err(e, true),
        },
        Request::List => Response::ok(list(c)),
        Request::Check {
            workload,
            destination,
            protocol,
        } => {
            let w = match workload.parse::<ObjectRef>() {
                Ok(w) => w,
                Err(e) => return Response::err(e, true),
            };
            let (ip, port) = match parse_destination(&destination) {
                Ok(d) => d,
                Err(e) => return Response::err(e, true),
            };
            let p = match protocol.as_str() {
                "tcp" => egress_common::proto::TCP,
                "udp" => egress_common::proto::UDP,
                other => {
                    return Response::err(format!("unknown protocol {other:?} (tcp or udp)"), true)
                }
            };
            match c.check(&w, ip, port, p) {
                Ok(r) => Response::ok(r),
                Err(e) => Response::err(&e, e.is_invalid()),
            }
        }
        Request::Flows { .. } => Response::err("flows is streamed", false),
        Request::Dns => match c.names.get() {
            Some(n) => Response::ok(n.view()),
            None => Response::ok(crate::dns::DnsView::default()),
        },
    }
}

fn status(c: &Control, programs: &[String]) -> Status {
    let p = c.live.get();
    let (entries, generation) = {
        let mut dp = c.datapath();
        let gen = dp.active().map(|(_, m)| m.generation).unwrap_or(0);
        (dp.map_entries(), gen)
    };
    Status {
        enable_egress: p.config.enable_egress != 0,
        fail_mode: if p.config.fail_open != 0 {
            "open"
        } else {
            "closed"
        },
        audit_mode: p.config.audit_mode != 0,
        generation,
        rules: p.rules.len(),
        workloads: p
            .workloads
            .iter()
            .map(|(w, id)| WorkloadStatus {
                name: w.to_string(),
                id: *id,
                cgroup: c.root.workload_dir(w).display().to_string(),
            })
            .collect(),
        map_entries: entries
            .into_iter()
            .map(|(n, k)| (n.to_string(), k))
            .collect(),
        programs: programs.to_vec(),
        cgroup_root: c.root.path.display().to_string(),
        proxy_port: p.config.proxy_port,
        sockets_allowed: egress_common::sockets::KINDS
            .into_iter()
            .filter(|k| p.config.sockets_allowed & k != 0)
            .map(egress_common::sockets::kind_name)
            .collect(),
        packet_sockets: crate::datapath::sockets::packet_sockets(
            programs,
            p.config.sockets_allowed,
        ),
    }
}

fn list(c: &Control) -> Vec<EgressRow> {
    let p = c.live.get();
    let wname = |id: &u32| {
        p.workloads
            .iter()
            .find(|(_, i)| i == id)
            .map(|(w, _)| w.to_string())
            .unwrap_or_default()
    };
    p.rules
        .iter()
        .zip(1u32..)
        .map(|(r, id)| EgressRow {
            name: r.name(),
            rule_id: id,
            action: format!("{:?}", r.action).to_lowercase(),
            via: format!("{:?}", r.via).to_lowercase(),
            mode: if r.audit { "audit" } else { "enforce" }.into(),
            sources: r.workloads.iter().map(wname).collect(),
            destinations: r
                .hosts
                .iter()
                .map(|h| h.to_string())
                .chain(r.cidrs.iter().map(|c| c.to_string()))
                .collect(),
            ports: r
                .ports
                .iter()
                .map(|(lo, hi, p)| {
                    let pr = egress_common::proto::name(*p);
                    if lo == hi {
                        format!("{lo}/{pr}")
                    } else {
                        format!("{lo}-{hi}/{pr}")
                    }
                })
                .collect(),
        })
        .collect()
}
