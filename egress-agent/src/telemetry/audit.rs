//! `egress_audit_total{policy,workload,layer}`: connections a policy in audit mode (or the
//! mesh-wide `auditMode`) would have refused and that were let through, counted where they
//! were judged: `kernel` (the socket hooks, from their verdict events) or `proxy` (hosts).

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

/// Where an audited verdict was reached.
#[allow(non_camel_case_types)] // the variant names are the label values
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Layer {
    kernel,
    proxy,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuditLabels {
    /// The Egress (`namespace/name`) that would have refused; empty: no rule matched and
    /// `enableEgress` is false (mesh-wide `auditMode`).
    pub policy: String,
    pub workload: String,
    pub layer: Layer,
}

/// The audit counter, shared by the flow log (kernel verdicts) and the proxy.
#[derive(Clone, Debug, Default)]
pub struct AuditMetrics {
    audited: Family<AuditLabels, Counter>,
}

impl AuditMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "egress_audit",
            "Connections that a policy in audit mode (or auditMode) would have refused, let through",
            m.audited.clone(),
        );
        m
    }

    pub fn count(&self, policy: &str, workload: &str, layer: Layer, n: u64) {
        self.audited
            .get_or_create(&AuditLabels {
                policy: policy.into(),
                workload: workload.into(),
                layer,
            })
            .inc_by(n);
    }
}
