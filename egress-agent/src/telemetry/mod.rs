//! What the agent reports: the metrics registry and its endpoint, `/healthz` and `/readyz`
//! ([`metrics`]), the kernel's counters encoded at scrape time ([`kernel`]) from a snapshot read
//! off the runtime ([`snapshot`]), the label types
//! the components share ([`labels`]), the flow log of kernel verdicts ([`flows`]) and giving
//! memory back after peaks ([`trim`]).

pub mod audit;
pub mod flows;
pub mod history;
pub mod kernel;
pub mod labels;
pub mod metrics;
pub mod relay;
pub mod snapshot;
pub mod trim;

#[cfg(test)]
mod tests;
