//! The egress node agent. The folders follow the data's way: [`policy`] (documents to a
//! validated, compiled policy) → [`control`] (every change, applied atomically) → [`datapath`]
//! (the kernel's maps, programs, cgroups and pod namespaces) → [`proxy`] and [`gateway`]
//! (redirected connections) → [`telemetry`] (metrics, flows). [`k8s`] feeds the policy and the
//! pods from the API server; [`admin`] is the operator's CLI and local API; [`run`] starts it.
pub mod admin;
pub mod control;
pub mod datapath;
pub mod dns;
pub mod gateway;
pub mod k8s;
pub mod policy;
pub mod proxy;
pub mod run;
pub mod telemetry;
