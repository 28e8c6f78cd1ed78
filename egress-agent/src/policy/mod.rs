//! The policy's way in: YAML documents (a file, the admin socket) or Kubernetes objects become
//! [`document::Document`]s ([`document`], the one YAML reader), typed policy objects
//! ([`mod@parse`], the model in [`model`] and [`scalar`]) that are checked alone and together
//! ([`validate`]), then compiled into the kernel's map entries ([`mod@compile`]), kept as the
//! live set of objects ([`store`]), and shared while in force ([`live`]). The proxy's verdicts
//! on hosts and HTTP requests are in [`verdict`], on the HTTP route rules of [`routes`].
//!
//! The files depend on each other in one direction only: `scalar` ← `names` ← `model` ← `validate` ←
//! `parse` ← `store` ← `saver`; `error` ← `document` ← `parse`, `store`; `model` ← `compile` ← `live`;
//! `model` ← `routes` ← `validate`, `compile` ← `verdict`.

pub mod anp;
pub mod compile;
pub mod convert;
pub mod document;
pub mod error;
pub mod fsm_gateway;
pub mod gateway_spec;
pub mod http_route;
pub mod live;
pub mod model;
pub mod names;
pub mod netpol;
pub mod parse;
pub mod preview;
pub mod routes;
pub mod saver;
pub mod scalar;
pub mod selector;
pub mod sockets_spec;
pub mod store;
pub mod tiers;
pub mod validate;
pub mod verdict;

pub use compile::*;
pub use document::{documents, Document};
pub use error::ConfigError;
pub use live::Live;
pub use model::*;
pub use names::{DnsSpec, HostBinding};
pub use parse::{load, parse, parse_unlinked};
pub use scalar::*;
pub use store::Store;
pub use verdict::HostVerdict;
