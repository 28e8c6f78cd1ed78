//! What the agent reports: Prometheus metrics and health endpoints ([`metrics`]) and the flow
//! log of kernel verdicts ([`flows`]).

pub mod flows;
pub mod kernel;
pub mod metrics;
