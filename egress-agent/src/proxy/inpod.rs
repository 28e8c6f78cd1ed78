//! The proxy inside pods: a listener in each pod's own network namespace (ztunnel's "inpod"
//! model), so the redirect target is the pod's own 127.0.0.1/[::1]:<proxy port> and no node
//! address is exposed to pods.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use tracing::{info, warn};

use super::Proxy;
use crate::datapath::podnet;

/// A network namespace of its own the proxy listens in: a pod's.
pub trait InPod: Clone + Send + Sync + 'static {
    /// The pod, for the log.
    fn label(&self) -> String;
    fn netns_path(&self) -> PathBuf;
}

impl InPod for podnet::Pod {
    fn label(&self) -> String {
        self.workload.to_string()
    }
    fn netns_path(&self) -> PathBuf {
        podnet::Pod::netns_path(self)
    }
}

/// Keeps a proxy listener open inside every pod's network namespace (the redirect target
/// there is the pod's own 127.0.0.1/[::1]:<proxy port>).
pub async fn serve_pods<P: InPod>(
    pods: tokio::sync::watch::Receiver<Vec<P>>,
    relay: Arc<Proxy>,
    port: u16,
) {
    serve_in_pods(pods, "proxy", move |p: &P, path: &Path| {
        let ls = podnet::bind_in(path, port).and_then(|ls| {
            ls.into_iter()
                .map(tokio::net::TcpListener::from_std)
                .collect::<std::io::Result<Vec<_>>>()
        })?;
        info!(pod = %p.label(), netns = %path.display(), port, "proxy listening inside the pod");
        Ok(relay.clone().serve(ls))
    })
    .await
}

/// Keeps a server `what` running inside every pod's network namespace: `start` opens its
/// sockets there and gives the future that serves them; it is dropped when the pod goes.
pub async fn serve_in_pods<P, F, Fut>(
    mut pods: tokio::sync::watch::Receiver<Vec<P>>,
    what: &'static str,
    start: F,
) where
    P: InPod,
    F: Fn(&P, &Path) -> std::io::Result<Fut>,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut serving: std::collections::HashMap<PathBuf, tokio::task::AbortHandle> =
        std::collections::HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let want = pods.borrow_and_update().clone();
        serving.retain(|path, task| {
            let keep = want.iter().any(|p| p.netns_path() == *path);
            if !keep {
                task.abort();
            }
            keep
        });
        for p in want {
            let path = p.netns_path();
            if serving.contains_key(&path) {
                continue;
            }
            match start(&p, &path) {
                Ok(serve) => {
                    serving.insert(path, tasks.spawn(serve));
                }
                Err(e) => {
                    warn!(pod = %p.label(), netns = %path.display(), error = %e, what, "cannot open this server inside the pod; what the kernel steers to it is refused")
                }
            }
        }
        if pods.changed().await.is_err() {
            break;
        }
    }
}
