//! The compiled policy in force, shared by the control loop (which replaces it), the proxy (which
//! judges hosts with it and re-judges open connections when it changes) and the flow log.

use std::sync::{Arc, RwLock};

use super::compile::Compiled;

/// The compiled policy in force, shared with the proxy and the flow log; subscribers learn
/// of every change (the proxy re-judges its open connections).
pub struct Live {
    policy: RwLock<Arc<Compiled>>,
    changes: tokio::sync::watch::Sender<u64>,
}

impl Live {
    pub fn new(c: Compiled) -> Arc<Self> {
        Arc::new(Self {
            policy: RwLock::new(Arc::new(c)),
            changes: tokio::sync::watch::channel(0).0,
        })
    }

    pub fn get(&self) -> Arc<Compiled> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set(&self, c: Arc<Compiled>) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = c;
        self.changes.send_modify(|n| *n += 1);
    }

    /// Notified after every change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }
}
